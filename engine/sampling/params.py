"""`SamplingParams`: one request's decoding parameters, with vLLM's fields and defaults, checked when made
(the rules that need the model, such as the vocabulary and the context, are engine/api/validation.py's).
The batched sampler that applies them is engine/sampling/sampler.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.cache.kv_policy import KVPolicy
from engine.core.checks import INT32_END, SEED_END, SEED_MIN, check_bool, check_float, check_int, check_text
from engine.core.errors import RequestError
from engine.text.structured import StructuredOutput

# vLLM's _SAMPLING_EPS: temperatures below this are treated as greedy (dividing by them overflows).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


def _str_list(param: str, value: object) -> list[str]:
    """None, a string or a list of strings, as a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise RequestError(param, f"{param} must be a string, a list of strings or None, got {type(value).__name__}")


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops (vLLM-compatible names and defaults).

    temperature: 0 (anything < 1e-5) = greedy. top_k: 0 or -1 = off. top_p: nucleus mass in (0, 1].
    min_p: keep tokens with prob >= min_p * max prob. repetition_penalty: over prompt and output
    tokens, 1 = off. presence/frequency_penalty: over output tokens only, 0 = off.
    seed: per-request generator (see `make_generator`). max_tokens: None = up to the context length.
    min_tokens: eos / stop_token_ids / stop strings are suppressed until this many tokens exist.
    stop: strings that end generation (normalised to a list; not included in the output).
    stop_token_ids: extra ids that end generation (normalised to a list). ignore_eos: keep going
    past eos. logprobs: top-n logprobs to return (0 = only the chosen token's), None = none.
    prompt_logprobs: the same for every prompt token after the first (vLLM's; what OpenAI's `echo` with
    `logprobs` returns): from the model's raw logits, as `LLM.logits` gives them; such a request computes its
    whole prompt (no prefix-cache reuse), as in vLLM.
    logit_bias: {token id: bias in [-100, 100]} added to the raw logits before penalties and sampling
    (OpenAI's; +100 all but forces a token, -100 bans it).
    structured_output: the output must be JSON (any object, or one matching a JSON schema): see
    engine/text/structured.py. The grammar decides when the output ends, so min_tokens does not apply.
    kv_policy: sink + window eviction, `"sink_window:4:1020"` (`:streaming` for StreamingLLM's positions) or a
    `KVPolicy` (engine/cache/kv_policy.py); None = the engine's default (`LLM(kv_policy=...)`, else keep every token).
    speculative: False = never draft tokens for this request when the engine speculates (engine/sampling/speculative.py);
    its tokens are the same either way, this only decides how many steps they take.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_output: StructuredOutput | None = None
    kv_policy: KVPolicy | str | None = None
    speculative: bool = True
    # logit_bias as (ids, values) tensors, built once: the sampler adds them at every step.
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Rules that need no model; `engine.api.validation.check_request` adds the vocabulary and context ones.
        self.temperature = check_float("temperature", self.temperature, 0.0)
        check_int("top_k", self.top_k, -1, INT32_END)
        self.top_p = check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.min_p = check_float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty, 0.0, lo_open=True)
        self.presence_penalty = check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_int("seed", self.seed, SEED_MIN, SEED_END, allow_none=True)
        check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError("min_tokens", f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                                             f"got {self.min_tokens}")
        self.stop = _str_list("stop", self.stop)
        for i, s in enumerate(self.stop):
            check_text(f"stop[{i}]", s)
            if not s:
                raise RequestError(f"stop[{i}]", "stop strings must be non-empty, got ''")
        ids = self.stop_token_ids
        if ids is not None and not isinstance(ids, (list, tuple)):
            raise RequestError("stop_token_ids", f"stop_token_ids must be a list of ints or None, "
                                                 f"got {type(ids).__name__}")
        self.stop_token_ids = [check_int(f"stop_token_ids[{i}]", t, 0) for i, t in enumerate(ids or ())]
        check_bool("ignore_eos", self.ignore_eos)
        check_bool("skip_special_tokens", self.skip_special_tokens)
        check_bool("speculative", self.speculative)
        check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS + 1, allow_none=True)
        check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS + 1, allow_none=True)
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise RequestError("structured_output", f"structured_output must be a StructuredOutput or None, "
                                                    f"got {type(self.structured_output).__name__}")
        self.kv_policy = KVPolicy.coerce(self.kv_policy)
        if self.logit_bias:
            self._bias = (torch.tensor(list(self.logit_bias), dtype=torch.long),
                          torch.tensor(list(self.logit_bias.values()), dtype=torch.float32))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (never) .. 100 (only this token)
MAX_LOGIT_BIAS_ENTRIES = 1024


def _logit_bias(bias) -> dict[int, float] | None:
    """`{token id: bias}` added to the raw logits before anything else (OpenAI's `logit_bias`)."""
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise RequestError("logit_bias", f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise RequestError("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(bias)}")
    return {check_int(f"logit_bias[{t!r}]", t, 0): check_float(f"logit_bias[{t}]", v, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
            for t, v in bias.items()}
