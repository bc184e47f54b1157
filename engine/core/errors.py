"""Exception types the engine raises: bad input, a full cache, an engine that can no longer run."""

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


class EngineDeadError(RuntimeError):
    """The engine can no longer run: a tensor-parallel rank exited, or the ranks fell out of step (a forward
    pass failed half-way through its collectives). Every later step raises it too; only a new engine helps."""
