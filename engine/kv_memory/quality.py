"""What fewer KV heads cost in quality: perplexity on fixed text and greedy agreement with the original."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.api.llm import LLM
from engine.sampling.params import SamplingParams


def english_text() -> str:
    """A fixed English text every Python install has: the language reference in `pydoc_data.topics`."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens_scored: int
    window: int


def perplexity(llm: LLM, token_ids: list[int], window: int = 1024) -> Perplexity:
    """exp(mean next-token NLL) over non-overlapping windows, each a fresh full prefill (`llm.logits`).

    The first token of each window has no context and is not scored, so every variant is scored on exactly
    the same (token, context) pairs.
    """
    nll, scored = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = llm.logits(chunk)
        nll += F.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        scored += len(chunk) - 1
    return Perplexity(math.exp(nll / scored), scored, window)


def greedy(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a fixed length (eos ignored, so every variant yields `new_tokens`)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


@dataclass(frozen=True)
class Agreement:
    """How closely a variant's greedy output follows the reference's, averaged over prompts."""

    prefix: float  # fraction of positions before the first differing token
    overall: float  # fraction of positions with the same token (contexts differ after a divergence)
    forced_top1: float  # the variant's argmax matches the reference token, fed the reference's own tokens


def agreement(reference: list[list[int]], variant: list[list[int]]) -> tuple[float, float]:
    """(prefix, overall) agreement of two sets of same-length continuations."""
    prefix, overall = [], []
    for ref, var in zip(reference, variant, strict=True):
        same = [a == b for a, b in zip(ref, var, strict=True)]
        first_diff = same.index(False) if False in same else len(same)
        prefix.append(first_diff / len(same))
        overall.append(sum(same) / len(same))
    return sum(prefix) / len(prefix), sum(overall) / len(overall)


def forced_top1(llm: LLM, prompts: list[list[int]], reference: list[list[int]]) -> float:
    """Teacher-forced agreement: one prefill of prompt + reference output, argmax at each output position."""
    hits = total = 0
    for prompt, ref in zip(prompts, reference, strict=True):
        logits = llm.logits(prompt + ref[:-1])
        predicted = logits[len(prompt) - 1 :].argmax(-1).tolist()
        hits += sum(p == r for p, r in zip(predicted, ref))
        total += len(ref)
    return hits / total


def compare(llm: LLM, prompts: list[list[int]], reference: list[list[int]]) -> Agreement:
    """Greedy-decode `prompts` with `llm` and compare with the reference continuations."""
    new_tokens = len(reference[0])
    prefix, overall = agreement(reference, greedy(llm, prompts, new_tokens))
    return Agreement(prefix, overall, forced_top1(llm, prompts, reference))


# ---- through the KV cache (quantized caches, eviction) ------------------------------------------------------
# `llm.logits` above never touches the cache, and one prefill attends to its own fresh K/V: neither sees what
# a quantized cache stores. These feed the text through a session a chunk at a time, so every chunk's
# attention reads the tokens before it from the cache, as decoding does (a chunk's own tokens are fresh, as
# in vLLM's fp8 cache; with 64-token chunks that is under 4 % of the keys at a 2048-token context).
CACHE_CHUNK = 64


def _fed(llm: LLM, token_ids: list[int], chunk: int) -> tuple[list[float], list[int]]:
    """Logprob of each token after the first, and the model's argmax before it, fed `chunk` tokens at a time."""
    logprobs, argmax = [], []
    with llm.session(token_ids[:1]) as s:
        for start in range(1, len(token_ids), chunk):
            for step in s.feed(token_ids[start : start + chunk]):
                logprobs.append(step.logprobs.logprob)
                argmax.append(int(step.logits.argmax()))
    return logprobs, argmax


def cached_perplexity(llm: LLM, token_ids: list[int], window: int = 2048, chunk: int = CACHE_CHUNK) -> Perplexity:
    """exp(mean next-token NLL) over non-overlapping windows, each read back from the KV cache (see above)."""
    nll, scored = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        piece = token_ids[start : start + window]
        if len(piece) < 2:
            break
        logprobs, _ = _fed(llm, piece, chunk)
        nll -= sum(logprobs)
        scored += len(logprobs)
    return Perplexity(math.exp(nll / scored), scored, window)


def cached_compare(llm: LLM, prompts: list[list[int]], reference: list[list[int]],
                   chunk: int = CACHE_CHUNK) -> Agreement:
    """`compare`, with the teacher-forced top-1 read through the cache too."""
    prefix, overall = agreement(reference, greedy(llm, prompts, len(reference[0])))
    hits = total = 0
    for prompt, ref in zip(prompts, reference, strict=True):
        _, argmax = _fed(llm, prompt + ref, chunk)
        predicted = argmax[len(prompt) - 1 :]  # argmax[i] is the prediction for token i + 1
        hits += sum(p == r for p, r in zip(predicted, ref, strict=True))
        total += len(ref)
    return Agreement(prefix, overall, hits / total)
