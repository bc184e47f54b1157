"""OpenAI-style errors: `APIError`, the JSON body, and the exception handlers that produce it.

Every error response has the body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import CHAT_ROLES, INVALID_ROLE

log = logging.getLogger("kvmini.server")

# pydantic's names for union members show up in error locations; they are not request fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


class APIError(Exception):
    """An error the client can act on (or a server error), rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(status: int, message: str, **kwargs) -> bytes:
    """The JSON body of an error as bytes (for the raw ASGI middleware)."""
    return json.dumps(APIError(status, message, **kwargs).body()).encode()


def _is_tag(p) -> bool:
    """Whether a location element is pydantic's name for a union member (`str`, `list[int]`,
    `constrained-str`, a class name such as `TextPart` or `UserMessage`) rather than a request field."""
    return isinstance(p, str) and not (p.isidentifier() and p not in _TYPE_TAGS and not p[:1].isupper())


def param_from_loc(loc: tuple | list) -> str | None:
    """`("body", "messages", 0, "content", "str")` -> `"messages[0].content"` (None for the body itself)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            if out:
                out += f"[{p}]"
        elif not _is_tag(p):
            out += f".{p}" if out else p
    return out or None


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_type_error(e: dict) -> bool:
    return e.get("type", "").endswith("_type")


def _pick(errors: list[dict]) -> tuple[dict, list[str] | None]:
    """The error to report, and the union members it belongs to when the value matched none of them.

    A value that fails a union (`prompt`: a string, or a list of ids, ...) gets one error per member.
    The telling one is a member whose type matched but whose value did not (`prompt: []` is too short,
    `prompt: [-1]` has a negative id), deepest first; when no member's type matched (`content: null`),
    the answer is the list of members ("expected a string or an array of text parts")."""
    chosen, start = errors[0], 0
    while True:
        loc = chosen["loc"]
        i = next((k for k in range(start, len(loc)) if _is_tag(loc[k])), None)
        if i is None:
            return chosen, None
        prefix = tuple(loc[:i])
        siblings = [e for e in errors if tuple(e["loc"][:i]) == prefix and len(e["loc"]) > i and _is_tag(e["loc"][i])]
        tags = list(dict.fromkeys(e["loc"][i] for e in siblings))
        start = i + 1
        if len(tags) < 2:  # a discriminated union (one member tried) or a plain tag
            continue
        best = min(siblings, key=lambda e: (_is_type_error(e), -len(e["loc"])))
        if _is_type_error(best) and len(best["loc"]) == i + 1:
            return best, tags
        errors = [e for e in siblings if e["loc"][i] == best["loc"][i]]
        chosen = best


_NOUNS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "none": "null", "dict": "object"}


def _noun(tag: str, plural: bool = False) -> str:
    """`list[constrained-int]` -> "array of integers", `TextPart` -> "text part"."""
    wrapped = re.fullmatch(r"function-\w+\[[^,]*\(\), (.*)\]", tag)  # a validator around the type
    if wrapped:
        tag = wrapped.group(1)
    tag = tag.removeprefix("constrained-")
    if tag.startswith("list[") and tag.endswith("]"):
        return ("arrays" if plural else "array") + " of " + _noun(tag[5:-1], plural=True)
    if tag.startswith("dict["):
        word = "object"
    elif tag[:1].isupper():
        word = "".join(" " + c.lower() if c.isupper() else c for c in tag).strip()
    else:
        word = _NOUNS.get(tag, tag)
    return word + "s" if plural else word


def _expected(tags: list[str]) -> str:
    names = [_noun(t) for t in tags]
    names = [("an " if n[0] in "aeiou" else "a ") + n if n != "null" else n for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _got(x) -> str:
    return json.dumps(x)[:100] if _jsonable(x) else type(x).__name__


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first.get("msg")
        return APIError(400, f"request body is not valid JSON: {detail}", code="invalid_json")
    first, members = _pick(errors)
    kind, loc, got = first.get("type"), first.get("loc", ()), first.get("input")
    if kind == "extra_forbidden":  # the last element is the unknown key, whatever it looks like
        name = str(loc[-1])
        param = _join(param_from_loc(loc[:-1]), name if name.isidentifier() else json.dumps(name))
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param)
    param = param_from_loc(loc)
    if param is None:  # the body itself: absent, null, or not an object
        if kind == "missing" or got is None:
            return APIError(400, "the request body is missing: send a JSON object")
        if isinstance(got, (bytes, bytearray)):  # not sent as JSON, so not parsed
            return APIError(400, "the request body must be a JSON object sent with Content-Type: application/json")
        return APIError(400, f"the request body must be a JSON object (got {_got(got)})")
    if kind == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param)
    if kind == INVALID_ROLE:  # a chat message's role (see server/protocol.py)
        param += ".role"
        if isinstance(got, dict) and got.get("role") is None:
            return APIError(400, f"missing required parameter: {param}", param=param)
        role = got.get("role") if isinstance(got, dict) else got
        return APIError(400, f"invalid value for {param!r}: must be one of {', '.join(CHAT_ROLES)} (got {_got(role)})",
                        param=param)
    if members is not None:
        return APIError(400, f"invalid value for {param!r}: expected {_expected(members)} (got {_got(got)})",
                        param=param)
    return APIError(400, f"invalid value for {param!r}: {first.get('msg')} (got {_got(got)})", param=param)


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def install_handlers(app: FastAPI, on_rejected=None) -> None:
    """Turn every error FastAPI/Starlette can raise into an OpenAI-style body.

    `on_rejected(path, status)` is called for each error answer, 4xx and 5xx (metrics)."""

    def note(request: Request, status: int) -> None:
        if on_rejected is not None and status != 499:  # 499: the client left (counted as aborted)
            on_rejected(request.url.path, status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        note(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = validation_error(exc)
        note(request, err.status)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}")
        elif exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read the body
            cause = exc.__cause__
            err = APIError(400, f"request body is not valid JSON: {type(cause).__name__}: {cause}"[:300],
                           code="invalid_json")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        err.headers = dict(exc.headers or {}) or None
        note(request, err.status)
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        note(request, 500)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()
