"""Request validation against the model and its KV pool, written once for the library (`LLM`, `LLMEngine`)
and the server: a prompt fits the context, prompt + max_tokens fits the context and the whole pool (with a
kv_policy, the prompt and the policy's sink + window blocks must fit the pool; max_tokens need not), stop
token ids and logit_bias keys lie in the vocabulary.

Everything a step runs must be unable to fail because of one request's input: a bad value is refused
when the request is made, never discovered inside a batched step (where it used to abort every request
of the batch). The field-level checks live in engine/core/checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.core.checks import check_int, check_length, int_str
from engine.core.errors import RequestError, RequestTooLargeError

if TYPE_CHECKING:
    from engine.cache.kv_policy import KVPolicy


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
            raise RequestError(p, f"{p}: token id {int_str(t)} is outside the vocabulary (size {limits.vocab_size})")
    for t in getattr(params, "logit_bias", None) or ():
        if t >= limits.vocab_size:
            p = f"logit_bias[{t}]"
            raise RequestError(p, f"{p}: token id {int_str(t)} is outside the vocabulary (size {limits.vocab_size})")
    if kv_policy is None:
        kv_policy = getattr(params, "kv_policy", None)
    return resolve_max_tokens(len(ids), params.max_tokens, limits, prompt_param=prompt_param,
                              max_tokens_param=max_tokens_param, kv_policy=kv_policy)
