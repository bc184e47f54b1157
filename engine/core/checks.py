"""Argument checks every layer uses: ints, floats and bools in range, valid text, token ids, chat messages,
stop-string caps and sequence lengths. Each raises `RequestError` carrying the path of the bad field
(`stop_token_ids[0]`, `messages[2].content`), which the server turns into a 400 naming it.

The rules:
* text (prompts, stop strings, chat messages) is valid Unicode: no lone surrogate, which UTF-8 (and so
  the tokenizer) cannot carry;
* token ids (prompt, stop_token_ids, forced tokens) are ints in [0, vocab_size);
* integers lie in the range where they mean something (`check_int`; e.g. a seed in torch's
  [-2**63, 2**64), top_k below 2**31);
* floats are finite, in range, and representable in float32, the dtype the sampler computes in
  (1e300 would become inf there and 1e-300 zero);
* a sequence holds 1..max_model_len tokens (`check_length`).
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from engine.core.errors import RequestError

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MIN, SEED_END = -(2**63), 2**64  # torch.Generator.manual_seed's range
INT32_END = 2**31


# ---- scalars ------------------------------------------------------------------------------------------


def check_int(param: str, value: object, lo: int | None = None, end: int | None = None,
              allow_none: bool = False) -> int | None:
    """An int (not a bool) with lo <= value < end."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(param, f"{param} must be an integer{' or None' if allow_none else ''}, got {value!r}")
    if (lo is not None and value < lo) or (end is not None and value >= end):
        lo_s = f">= {lo}" if lo is not None else ""
        end_s = f"< {int_str(end)}" if end is not None else ""
        raise RequestError(param, f"{param} must be {' and '.join(s for s in (lo_s, end_s) if s)}, got {int_str(value)}")
    return value


def check_float(param: str, value: object, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`) that float32 represents without
    overflowing to inf or flushing a non-zero value to zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(param, f"{param} must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**128:
        raise RequestError(param, f"{param} is out of range, got {int_str(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise RequestError(param, f"{param} must be a finite number, got {value!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        hi_s = "" if math.isinf(hi) else f" and <= {hi}"
        raise RequestError(param, f"{param} must be {lo_s}{hi_s}, got {value!r}")
    try:
        f32 = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        f32 = math.inf
    if math.isinf(f32) or (v != 0 and f32 == 0):
        raise RequestError(param, f"{param}={value!r} is not representable in float32 (the sampler's dtype)")
    return v


def check_bool(param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RequestError(param, f"{param} must be a bool, got {value!r}")
    return value


def int_str(n: int) -> str:
    """Huge ints (2**70, 2**64) in a form a person reads."""
    if abs(n) >= 2**32 and n & (n - 1) == 0:
        return f"2**{n.bit_length() - 1}"
    return str(n)


# ---- text and token ids ---------------------------------------------------------------------------------


def check_text(param: str, text: object) -> str:
    """A str that UTF-8 can encode (a lone surrogate such as '\\ud800' cannot be tokenized)."""
    if not isinstance(text, str):
        raise RequestError(param, f"{param} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            param, f"{param} is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at index {e.start}"
        ) from None
    return text


def check_token_ids(param: str, ids: object, vocab_size: int) -> list[int]:
    """A list of ints, each in [0, vocab_size); the error names the first bad element (`prompt[3]`)."""
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
        raise RequestError(param, f"{param} must be a list of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)  # ints, numpy and torch integers
        except TypeError:
            raise RequestError(f"{param}[{i}]", f"{param}[{i}] must be an integer token id, got {t!r}") from None
        if not 0 <= t < vocab_size:
            raise RequestError(f"{param}[{i}]", f"{param}[{i}]: token id {int_str(t)} is outside the vocabulary "
                                                f"(size {vocab_size})")
        out.append(t)
    return out


def prompt_token_ids(prompt: object, tokenizer: Any, vocab_size: int, param: str = "prompt") -> list[int]:
    """A prompt's token ids: a string is checked and encoded, a list of ids is checked."""
    if isinstance(prompt, str):
        return tokenizer.encode(check_text(param, prompt))
    return check_token_ids(param, prompt, vocab_size)


def check_messages(messages: object, param: str = "messages") -> list[dict]:
    """A chat conversation: a non-empty list of {"role", "content", ...} with known roles and text content.

    Content is a string or a list of {"type": "text", "text": ...} parts; it may be absent only on an
    assistant message (OpenAI allows that next to tool calls). Other string fields must be valid text."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise RequestError(param, f"{param} must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RequestError(param, f"{param} must contain at least one message")
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, Mapping):
            raise RequestError(where, f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise RequestError(f"{where}.content", f"{where}.content is required for a {role} message "
                                                       "(a string or a list of text parts)")
        elif isinstance(content, str):
            check_text(f"{where}.content", content)
        elif isinstance(content, Sequence):
            if not content:
                raise RequestError(f"{where}.content", f"{where}.content must hold at least one text part")
            for j, part in enumerate(content):
                p = f"{where}.content[{j}]"
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(p, f"{p} must be a text part {{'type': 'text', 'text': '...'}}")
                check_text(f"{p}.text", part["text"])
        else:
            raise RequestError(f"{where}.content", f"{where}.content must be a string or a list of text parts, "
                                                   f"got {type(content).__name__}")
        for key, value in m.items():
            if isinstance(value, str):
                check_text(f"{where}.{key}", value)
    return list(messages)


def check_stop_limits(stop: Sequence[str], max_count: int, max_length: int, param: str = "stop") -> None:
    """A server's caps on stop strings: each one is checked against every new token's text."""
    if len(stop) > max_count:
        raise RequestError(param, f"{param} has {len(stop)} strings; this server allows at most {max_count}")
    for i, s in enumerate(stop):
        if len(s) > max_length:
            raise RequestError(f"{param}[{i}]", f"{param}[{i}] has {len(s)} characters; this server allows at most "
                                                f"{max_length}")


def check_length(param: str, num_tokens: int, max_model_len: int, what: str = "the prompt") -> None:
    """A sequence may hold 1..max_model_len tokens."""
    if num_tokens < 1:
        raise RequestError(param, f"{what} is empty: give at least one token")
    if num_tokens > max_model_len:
        raise RequestError(param, f"{what} has {num_tokens} tokens, more than the context length ({max_model_len})",
                           code="context_length_exceeded")
