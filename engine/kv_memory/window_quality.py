"""What sink + window eviction (engine/cache/kv_policy.py) costs in quality: perplexity and greedy agreement.

Perplexity: the text's first `prefill` tokens are prefilled (full attention, as every request's prompt), then
each next token is fed alone through a session, so every scored token is predicted by one decode step that
reads what the policy kept (with `prefill` = sink + window, eviction starts within two blocks). The full cache
is scored the same way, so the variants differ only in what attention reads.

Greedy agreement: long text prompts (longer than sink + window, so the first decode step already evicts),
128 greedy tokens with and without the policy (engine/kv_memory/quality.py `agreement`).

Run on the default model by bench/kv_window.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from engine.api.llm import LLM
from engine.cache.kv_policy import KVPolicy
from engine.kv_memory.quality import agreement
from engine.sampling.params import SamplingParams


@dataclass(frozen=True)
class WindowQuality:
    policy: str  # "full" or the policy's string form
    perplexity: float
    tokens_scored: int
    seconds: float  # wall time of the perplexity run
    greedy_prefix: float | None = None  # agreement with the full cache (None for the full cache itself)
    greedy_overall: float | None = None
    greedy_seconds: float | None = None


def fed(llm: LLM, token_ids: list[int], prefill: int, policy: KVPolicy | None) -> tuple[list[float], list[int]]:
    """Negative log-likelihood of each token after the first `prefill`, fed one at a time, and the model's
    argmax before each (its greedy choice there). With a head-aware engine (`LLM(head_plan=...)`) the engine's
    eviction applies and `policy` must be None."""
    params = SamplingParams(temperature=0.0, kv_policy=policy)
    nll, argmax = [], []
    with llm.session(token_ids[:prefill], params=params) as s:
        for t in token_ids[prefill:]:
            step = s.feed([t])[0]
            nll.append(-step.logprobs.logprob)
            argmax.append(int(step.logits.argmax()))
    return nll, argmax


def fed_nll(llm: LLM, token_ids: list[int], prefill: int, policy: KVPolicy | None) -> list[float]:
    """Negative log-likelihood of each token after the first `prefill`, fed one at a time."""
    return fed(llm, token_ids, prefill, policy)[0]


def forced_agreement(llm: LLM, prompts: list[list[int]], reference: list[list[int]],
                     policy: KVPolicy | None) -> float:
    """Teacher-forced greedy agreement: each reference token fed after its prompt, one at a time (so every
    prediction is a decode step reading what eviction kept); the fraction the model's argmax matches."""
    hits = total = 0
    for prompt, ref in zip(prompts, reference, strict=True):
        _, argmax = fed(llm, prompt + ref, len(prompt), policy)
        hits += sum(a == r for a, r in zip(argmax, ref, strict=True))
        total += len(ref)
    return hits / total


def window_perplexity(llm: LLM, token_ids: list[int], prefill: int,
                      policy: KVPolicy | None) -> tuple[float, int, float]:
    """(perplexity, tokens scored, seconds) of `token_ids[prefill:]` (see the module docstring)."""
    start = time.perf_counter()
    nll = fed_nll(llm, token_ids, prefill, policy)
    return math.exp(sum(nll) / len(nll)), len(nll), time.perf_counter() - start


def greedy_tokens(llm: LLM, prompts: list[list[int]], new_tokens: int, policy: KVPolicy | None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, kv_policy=policy)
    return [out.token_ids for out in llm.generate(prompts, params)]


def measure(llm: LLM, token_ids: list[int], policies: list[KVPolicy], *, prefill: int, prompts: list[list[int]],
            new_tokens: int = 128) -> list[WindowQuality]:
    """The full cache, then each policy: perplexity of `token_ids[prefill:]`, greedy agreement on `prompts`."""
    ppl, n, seconds = window_perplexity(llm, token_ids, prefill, None)
    reference = greedy_tokens(llm, prompts, new_tokens, None)
    rows = [WindowQuality("full", ppl, n, seconds)]
    for policy in policies:
        ppl, n, seconds = window_perplexity(llm, token_ids, prefill, policy)
        start = time.perf_counter()
        prefix, overall = agreement(reference, greedy_tokens(llm, prompts, new_tokens, policy))
        rows.append(WindowQuality(str(policy), ppl, n, seconds, prefix, overall, time.perf_counter() - start))
    return rows
