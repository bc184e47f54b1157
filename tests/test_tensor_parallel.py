"""Tensor parallelism (engine/exec) on tiny checkpoints: 2 gloo ranks on this CPU give the greedy tokens of
one rank in float32, capture the same attention, and hold half the cache each. More in test_tensor_parallel_ranks.py.

Every multi-rank LLM starts real processes (a few seconds), so each configuration is built once per module; one
process holds one tensor-parallel group at a time, and pytest keeps one instance of a parametrized module fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine import LLM
from engine.capture.request import AttentionCapture, Span
from engine.sampling.params import SamplingParams

pytest.importorskip("transformers")
from test_model import build_tiny  # noqa: E402 - tiny checkpoints with random norms and biases

REPO = Path(__file__).resolve().parent.parent
THREADS = 1  # per rank: two ranks already fill this two-core box
PROMPTS = [[5], list(range(20, 27)), list(range(40, 80)), [(i * 7) % 250 for i in range(130)]]  # 130 > 8 blocks
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

# name -> (checkpoint, LLM options of both sides); 2 ranks each
CASES = {
    "mha": (dict(num_kv_heads=4, num_heads=4), {}),
    # Each rank holds one KV head under four query heads (MQA per rank); the o_proj bias must be added once.
    "gqa-8-heads-bias": (dict(num_kv_heads=2, num_heads=8, hidden=64, attention_bias=True), {}),
    # Biased q/k/v split by head, the tied head split by vocabulary (259 rows: padded to 260), an 8-bit cache.
    "qwen2-bias-tied-int8-cache": (dict(arch="qwen2", num_kv_heads=2, num_heads=4, tie=True),
                                   dict(kv_cache_dtype="int8")),
}


def start(model_dir: Path, ranks: int, **options) -> LLM:
    return LLM(model_dir, dtype="float32", threads=THREADS, tensor_parallel_size=ranks, **options)


def tokens(llm: LLM, prompts, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def assert_stopped(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # exited and reaped: no orphan, no zombie
            os.kill(pid, 0)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    """(one rank, two ranks) on the same tiny checkpoint; the two-rank LLM is closed after the module."""
    checkpoint, options = CASES[request.param]
    model_dir = tmp_path_factory.mktemp(request.param)
    build_tiny(model_dir, **checkpoint)
    one, two = start(model_dir, 1, **options), start(model_dir, 2, **options)
    yield one, two
    pids = [p.pid for p in two.workers.processes]
    two.close()
    assert_stopped(pids)


def test_two_ranks_give_the_tokens_and_logits_of_one(pair) -> None:
    one, two = pair
    assert tokens(two, PROMPTS) == tokens(one, PROMPTS)
    ids = PROMPTS[3]
    assert (two.logits(ids) - one.logits(ids)).abs().max().item() < 1e-4
    # Each rank's pool holds its own KV heads: half the bytes, the same blocks.
    assert two.kv_cache.num_blocks == one.kv_cache.num_blocks
    assert two.kv_cache.pool_bytes() * 2 == one.kv_cache.pool_bytes()


def test_two_ranks_agree_on_logprobs_eviction_and_sessions(pair) -> None:
    one, two = pair
    scored = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    a, b = one.generate(PROMPTS[1:3], scored), two.generate(PROMPTS[1:3], scored)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert np.allclose([p.logprob for p in x.prompt_logprobs[1:]], [p.logprob for p in y.prompt_logprobs[1:]],
                           atol=1e-4)
    # StreamingLLM eviction: 60 prompt + 100 new tokens through a 4 + 32 token window (blocks freed, sinks rotated).
    window = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, kv_policy="sink_window:4:32:streaming")
    assert tokens(two, [list(range(60, 120))], window) == tokens(one, [list(range(60, 120))], window)
    steps = []
    for llm in (one, two):
        with llm.session(PROMPTS[1]) as s:
            fed = s.feed([3, 4, 5])
            steps.append(([f.token_id for f in fed], [s.step().token_id for _ in range(5)]))
    assert steps[0] == steps[1]


CAPTURES = [
    AttentionCapture(),
    AttentionCapture(layers=(1,), heads=(3, 0, 2), top_k=3, spans=(Span("a", 0, 2),)),
    AttentionCapture(heads=(1, 2), prefill_matrix=True, scores=True, value_norms=True, head_stats=True),
]


@pytest.mark.parametrize("capture", CAPTURES, ids=["all", "heads-top-spans", "matrix-scores-norms-stats"])
def test_captured_attention_joins_every_ranks_heads(pair, capture: AttentionCapture) -> None:
    one, two = pair
    params = SamplingParams(temperature=0.0, max_tokens=3)
    a, b = (llm.generate(PROMPTS[1:3], params, capture=capture) for llm in (one, two))
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and len(x.attention) == len(y.attention) == 3
        for rx, ry in zip(x.attention, y.attention):
            assert rx.heads == ry.heads
            for name in ("layers", "scores", "value_norms", "prefill"):
                mx, my = getattr(rx, name) or {}, getattr(ry, name) or {}
                assert mx.keys() == my.keys()
                # Ranks > 0 keep no value norms across steps: each step they norm every key again, as the 8-bit
                # cache returns it, where one rank kept the prompt's norms of its unrounded values.
                rtol = 1e-2 if name == "value_norms" and one.kv_cache.kv_cache_dtype != "auto" else 1e-4
                for layer in mx:
                    np.testing.assert_allclose(mx[layer], my[layer], rtol=rtol, atol=1e-5, err_msg=f"{name} {layer}")
            if rx.top is not None:
                assert all((rx.top[layer].positions == ry.top[layer].positions).all() for layer in rx.top)
            if rx.spans is not None:
                assert all(np.allclose(rx.spans.layers[k], ry.spans.layers[k], atol=1e-5) for k in rx.spans.layers)
        if x.head_stats is not None:
            for name, values in x.head_stats.scores().items():
                np.testing.assert_allclose(values, y.head_stats.scores()[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_kv_memory_sizes_one_rank(capsys) -> None:
    from engine.cli import main

    shape = ["kv-memory", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--only"]
    assert main(shape) == 0
    whole = capsys.readouterr().out.splitlines()[-1].split()
    assert main(shape + ["--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    per_rank = out.splitlines()[-1].split()
    assert "per rank of 2" in out and per_rank[0] == whole[0] == "GQA-2*"
    assert int(per_rank[1].replace(",", "")) * 2 == int(whole[1].replace(",", ""))  # bytes per token
    assert per_rank[5:7] == whole[5:7]  # the same sequences fit
    assert main(shape + ["--tensor-parallel-size", "4"]) == 2
    assert "does not divide the model's 2 KV heads" in capsys.readouterr().err
