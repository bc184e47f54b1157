"""Request validation, written once for the library (`LLM`, `LLMEngine`, `Session`) and the server.

Everything a step runs must be unable to fail because of one request's input: a bad value is refused
when the request is made, never discovered inside a batched step (where it used to abort every request
of the batch). Each check raises `RequestError` carrying the path of the bad field
(`stop_token_ids[0]`, `messages[2].content`), which the server turns into a 400 naming it.

The rules:
* text (prompts, stop strings, chat messages) is valid Unicode: no lone surrogate, which UTF-8 (and so
  the tokenizer) cannot carry;
* token ids (prompt, stop_token_ids, forced tokens) are ints in [0, vocab_size);
* integers lie in the range where they mean something (`check_int`; e.g. a seed in torch's
  [-2**63, 2**64), top_k below 2**31);
* floats are finite, in range, and representable in float32, the dtype the sampler computes in
  (1e300 would become inf there and 1e-300 zero);
* context (`check_length`, `resolve_max_tokens`): a prompt has at least one token; a sequence never
  holds more than max_model_len tokens; prompt + max_tokens fits the context and the whole KV pool (with a
  kv_policy, the prompt and the policy's sink + window blocks must fit the pool; max_tokens need not).
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import RequestError, RequestTooLargeError

if TYPE_CHECKING:
    from engine.kv_policy import KVPolicy

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MIN, SEED_END = -(2**63), 2**64  # torch.Generator.manual_seed's range
INT32_END = 2**31


@dataclass(frozen=True)
class ContextLimits:
    """What bounds one request: the vocabulary, the context length and the KV pool."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_seq_len(self) -> int:
        """The longest sequence that can run at all: the context length, or less when the pool is smaller."""
        return min(self.max_model_len, self.pool_tokens)

    def max_seq_len_with(self, kv_policy: KVPolicy | None) -> int:
        """`max_seq_len`; a sequence that evicts (a kv_policy) is bounded by the context length alone."""
        return self.max_seq_len if kv_policy is None else self.max_model_len


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
        end_s = f"< {_int_str(end)}" if end is not None else ""
        raise RequestError(param, f"{param} must be {' and '.join(s for s in (lo_s, end_s) if s)}, got {_int_str(value)}")
    return value


def check_float(param: str, value: object, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with `lo_open`) that float32 represents without
    overflowing to inf or flushing a non-zero value to zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(param, f"{param} must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**128:
        raise RequestError(param, f"{param} is out of range, got {_int_str(value)}")
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


def _int_str(n: int) -> str:
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
            raise RequestError(f"{param}[{i}]", f"{param}[{i}]: token id {_int_str(t)} is outside the vocabulary "
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


# ---- context --------------------------------------------------------------------------------------------


def check_length(param: str, num_tokens: int, max_model_len: int, what: str = "the prompt") -> None:
    """A sequence may hold 1..max_model_len tokens."""
    if num_tokens < 1:
        raise RequestError(param, f"{what} is empty: give at least one token")
    if num_tokens > max_model_len:
        raise RequestError(param, f"{what} has {num_tokens} tokens, more than the context length ({max_model_len})",
                           code="context_length_exceeded")


def resolve_max_tokens(num_prompt: int, max_tokens: int | None, limits: ContextLimits, *,
                       prompt_param: str = "prompt", max_tokens_param: str = "max_tokens",
                       kv_policy: KVPolicy | None = None) -> int:
    """The number of tokens the request may generate, checked against the context and the KV pool.

    `max_tokens=None` means as many as fit: up to the context length, but never more than the pool can
    hold for this one request (the pool is often smaller than the model's context). A request with a
    kv_policy holds a bounded number of blocks, so only its prompt and its sink + window must fit the pool."""
    check_length(prompt_param, num_prompt, limits.max_model_len)
    if kv_policy is not None:
        _check_window_fits(num_prompt, kv_policy, limits, prompt_param)
    if max_tokens is None:
        room = limits.max_seq_len_with(kv_policy) - num_prompt
        if room < 1:
            raise RequestError(prompt_param, f"the prompt has {num_prompt} tokens: no room left to generate "
                                             f"(context length {limits.max_model_len}, KV cache "
                                             f"{limits.pool_tokens} tokens)", code="context_length_exceeded")
        return room
    check_int(max_tokens_param, max_tokens, 1)
    total = num_prompt + max_tokens
    if total > limits.max_model_len:
        raise RequestError(max_tokens_param, f"prompt ({num_prompt} tokens) + {max_tokens_param} ({max_tokens}) = "
                                             f"{total} tokens is more than the context length "
                                             f"({limits.max_model_len})", code="context_length_exceeded")
    need = -(-(total - 1) // limits.block_size)  # the last token's K/V are never written
    if need > limits.num_blocks and kv_policy is None:
        raise RequestTooLargeError(max_tokens_param, f"the request needs {need} KV blocks ({total} tokens) but the "
                                                     f"whole cache has {limits.num_blocks}; lower {max_tokens_param} "
                                                     "or give the cache more memory", code="request_too_large")
    return max_tokens


def _check_window_fits(num_prompt: int, kv_policy: KVPolicy, limits: ContextLimits, prompt_param: str) -> None:
    """A windowed request holds its whole prompt (prefilled with full attention), then at most its sink and
    window blocks: each must fit the pool on its own, or the request could never run."""
    prompt_blocks = -(-num_prompt // limits.block_size)
    if prompt_blocks > limits.num_blocks:
        raise RequestTooLargeError(prompt_param, f"the prompt needs {prompt_blocks} KV blocks ({num_prompt} tokens) "
                                                 f"but the whole cache has {limits.num_blocks}: a kv_policy evicts "
                                                 "only while decoding", code="request_too_large")
    window_blocks = kv_policy.max_blocks(limits.block_size)
    if window_blocks > limits.num_blocks:
        raise RequestTooLargeError("kv_policy", f"kv_policy {kv_policy} keeps up to {window_blocks} KV blocks of "
                                                f"{limits.block_size} tokens but the whole cache has "
                                                f"{limits.num_blocks}; lower its sink or window",
                                   code="request_too_large")


def check_request(ids: list[int], params: Any, limits: ContextLimits, *, prompt_param: str = "prompt",
                  max_tokens_param: str = "max_tokens", kv_policy: KVPolicy | None = None) -> int:
    """Everything about a generation request that depends on the model: its prompt ids (already in the
    vocabulary), its stop token ids, its length against the context and the pool. Returns max_tokens.
    `kv_policy`: the policy the request runs with (the engine's default when it gives none); default
    `params.kv_policy`."""
    for i, t in enumerate(params.stop_token_ids or ()):
        if not 0 <= t < limits.vocab_size:
            p = f"stop_token_ids[{i}]"
            raise RequestError(p, f"{p}: token id {_int_str(t)} is outside the vocabulary (size {limits.vocab_size})")
    for t in getattr(params, "logit_bias", None) or ():
        if t >= limits.vocab_size:
            p = f"logit_bias[{t}]"
            raise RequestError(p, f"{p}: token id {_int_str(t)} is outside the vocabulary (size {limits.vocab_size})")
    if kv_policy is None:
        kv_policy = getattr(params, "kv_policy", None)
    return resolve_max_tokens(len(ids), params.max_tokens, limits, prompt_param=prompt_param,
                              max_tokens_param=max_tokens_param, kv_policy=kv_policy)
