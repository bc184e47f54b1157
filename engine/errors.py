"""Exception types the engine raises on bad input."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is malformed or unsupported; the message names the file and the field or tensor."""

    def __init__(self, path: str | object, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class CacheFullError(RuntimeError):
    """The paged KV cache has no free block for the request."""


class RequestError(ValueError):
    """A request the engine refuses. `param` is the path of the bad field (`"stop_token_ids[2]"`,
    `"messages[0].content"`; None when no one field is to blame); `code` a machine-readable reason
    (`"context_length_exceeded"`), as in OpenAI's error bodies."""

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class RequestTooLargeError(RequestError, CacheFullError):
    """The request needs more KV blocks than the whole pool has: it could never run."""
