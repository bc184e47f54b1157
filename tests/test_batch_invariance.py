"""Batch invariance (engine/model/invariance.py): a request's tokens, logprobs and captured attention are bitwise the
same alone and inside any batch: other prompts of 5-500 tokens prefilling while it decodes, small token
budgets (chunked prefill), a pool so small that sequences are preempted and recomputed, prefix-cache hits,
through `LLM.generate` and a `Session`, in float32 and in bfloat16 with every weight quantization.

"Alone" is an engine of its own with the default scheduler: the same request must not care which engine
settings or neighbours it meets. The real-model tests are the issue's reproduction (SmolLM2 in bfloat16 with
`quantization="auto"`, the server's default), which differed from the 2nd-6th token without invariance.
"""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM, AttentionCapture, SamplingParams
from engine.model.invariance import (
    CHECKED_ROWS,
    RowCheck,
    RowPlan,
    RowTile,
    apply_plan,
    prompt_tile,
    tile_boundary_below,
)
from engine.model.packed_linear import DenseLinear

BLOCK = 16
# (dtype, quantization): float32 dense, and bfloat16 dense and with each weight-only quantization.
MODES = [("float32", None), ("bfloat16", None), ("bfloat16", "auto"), ("bfloat16", "int8"), ("bfloat16", "int4")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GQA checkpoint (hidden 64: every linear layer takes int4's groups of 32)."""
    path = tmp_path_factory.mktemp("invariance") / "gqa"
    make_checkpoint(path, num_kv_heads=2, num_heads=4, hidden=64, layers=2, seed=3)
    return path


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def canaries() -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded requests, short and long prompts, with top logprobs so every logit row is compared."""
    return [
        (prompt(5, 1), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)),
        (prompt(37, 2), SamplingParams(temperature=0.9, seed=11, max_tokens=24, ignore_eos=True, logprobs=3)),
        (prompt(130, 3), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)),
        (prompt(300, 4), SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True,
                                        logprobs=3)),
    ]


def fillers(n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    """Other requests of 5..500 prompt tokens and 1..40 new ones, some sampled without a seed."""
    rng = random.Random(seed)
    return [(prompt(rng.randint(5, 500), 100 + seed * 50 + i),
             SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=rng.randint(1, 40), ignore_eos=True))
            for i in range(n)]


def signature(out) -> tuple:
    """Everything a request's result is made of: its tokens, and every logprob with its top-n alternatives."""
    return tuple(out.token_ids), tuple((lp.token_id, lp.logprob, tuple(lp.top)) for lp in out.logprobs or ())


def run(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple]:
    outs = llm.generate([p for p, _ in requests], [s for _, s in requests])
    return [signature(o) for o in outs]


def alone(model, mode, requests) -> list[tuple]:
    dtype, quantization = mode
    llm = LLM(model, dtype=dtype, quantization=quantization, block_size=BLOCK)
    return [run(llm, [r])[0] for r in requests]


# ---- the tiny model: every mode, every kind of neighbourhood -----------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-{m[1] or 'dense'}")
def test_requests_are_the_same_alone_and_in_any_batch(tiny, mode):
    dtype, quantization = mode
    reference = alone(tiny, mode, canaries())
    # One engine, a small token budget: prompts are chunked and prefill beside other sequences' decode rows.
    busy = LLM(tiny, dtype=dtype, quantization=quantization, block_size=BLOCK, max_num_batched_tokens=48)
    mixed = fillers(12, seed=1)
    requests = mixed[:5] + canaries()[:2] + mixed[5:9] + canaries()[2:] + mixed[9:]
    got = run(busy, requests)
    assert [got[5], got[6], got[11], got[12]] == reference
    # Again, now with the canaries' prompt blocks in the prefix cache (and other neighbours).
    before = busy.blocks.prefix_hits
    got = run(busy, fillers(6, seed=2) + canaries())
    assert got[6:] == reference
    assert busy.blocks.prefix_hits > before  # the second pass did reuse cached prompt blocks


@pytest.mark.parametrize("mode", [MODES[0], MODES[2]], ids=["float32", "bfloat16-auto"])
def test_preempted_and_recomputed_requests_are_unchanged(tiny, mode):
    dtype, quantization = mode
    reference = alone(tiny, mode, canaries())
    # 40 blocks of 16 tokens for 8 sequences of up to 500: the newest are preempted and recomputed, often.
    small = LLM(tiny, dtype=dtype, quantization=quantization, block_size=BLOCK, num_blocks=40,
                max_num_batched_tokens=64)
    got = run(small, canaries() + fillers(4, seed=3))
    assert small.engine.scheduler.num_preemptions > 0
    assert got[:4] == reference
    assert small.blocks.allocator.num_used == 0


def test_a_session_computes_what_generate_does(tiny):
    """Step by step (one decode row per step) and through the engine, the same logits and tokens."""
    llm = LLM(tiny, dtype="bfloat16", quantization="auto", block_size=BLOCK)
    ids, params = canaries()[2]
    out = llm.generate(ids, params)[0]
    busy = LLM(tiny, dtype="bfloat16", quantization="auto", block_size=BLOCK, max_num_batched_tokens=32)
    background = busy.engine
    for p, s in fillers(4, seed=4):
        background.add_request(p, s)
    with busy.session(ids, params=SamplingParams(temperature=0.0, logprobs=3)) as session:
        for i in range(len(out.token_ids)):
            background.step()  # other requests share the pool and the weights, step after step
            step = session.step()
            assert step.token_id == out.token_ids[i]
            assert (step.logprobs.logprob, step.logprobs.top) == (out.logprobs[i].logprob, out.logprobs[i].top)


def test_captured_attention_is_the_same_alone_and_batched(tiny):
    capture = AttentionCapture(layers=[0, 1], top_k=4, scores=True)
    ids, params = prompt(70, 9), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def rows(llm: LLM, others: list) -> list:
        outs = llm.generate([ids] + [p for p, _ in others], [params] + [s for _, s in others], capture=capture)
        out = outs[0]
        return [(a.query_position, {layer: (t.positions.tolist(), t.probs.tolist()) for layer, t in a.top.items()},
                 {layer: s.tolist() for layer, s in a.scores.items()}) for a in out.attention], out.token_ids

    single = rows(LLM(tiny, dtype="bfloat16", quantization="auto", block_size=BLOCK), [])
    busy = LLM(tiny, dtype="bfloat16", quantization="auto", block_size=BLOCK, max_num_batched_tokens=40)
    assert rows(busy, fillers(6, seed=5)) == single


def test_without_invariance_the_fast_path_still_matches_to_rounding(tiny):
    """`batch_invariant=False` keeps the batch's fastest kernels: the same model, rounding apart."""
    fast = LLM(tiny, dtype="float32", block_size=BLOCK, batch_invariant=False)
    exact = LLM(tiny, dtype="float32", block_size=BLOCK)
    ids = prompt(90, 6)
    steps = []
    for llm in (fast, exact):
        with llm.session(ids) as s:
            steps.append(torch.stack([s.step().logits for _ in range(8)]))
    assert torch.allclose(steps[0], steps[1], atol=1e-4, rtol=0)


# ---- the pieces ------------------------------------------------------------------------------------------


def test_prompt_tiles_cover_every_position_once():
    for position in range(0, 400):
        start, size = prompt_tile(position)
        assert start <= position < start + size
        assert prompt_tile(start) == (start, size)  # a tile starts where the grid says
    assert [prompt_tile(p) for p in (0, 16, 32, 64, 128)] == [(0, 16), (16, 16), (32, 32), (64, 64), (128, 64)]
    assert tile_boundary_below(0, 100) == 64 and tile_boundary_below(70, 100) == 100


def test_row_check_finds_a_kernel_whose_rows_move_with_the_batch():
    weight = torch.randn(48, 32)

    def steady(x):  # one reduction per output, the same code whatever the row count
        return (x.unsqueeze(1) * weight).sum(-1)

    def moving(x):  # rounds like a kernel that changes its reduction order above 8 rows
        return steady(x) * (1 + 1e-6 * (x.shape[0] > 8))

    check = RowCheck()
    assert check.invariant_rows(("steady",), steady, 32, torch.float32, torch.device("cpu")) == CHECKED_ROWS
    assert check.invariant_rows(("moving",), moving, 32, torch.float32, torch.device("cpu")) == 1


def test_a_row_gives_the_same_result_as_decode_row_and_anywhere_in_a_tile():
    layer = DenseLinear(32, 48)
    layer.invariant_rows = 1  # as if the check had failed: tiles are padded, decode rows go one by one
    x = torch.randn(40, 32)
    plan = RowPlan([RowTile(0, 7), RowTile(7, 9, size=16, offset=5), RowTile(16, 24, size=32, offset=0)])
    got = apply_plan(layer, x, plan)
    padded = torch.zeros(16, 32)
    padded[5:14] = x[7:16]
    assert torch.equal(got[7:16], layer.row_fn(padded)[5:14])
    for i in range(7):
        assert torch.equal(got[i], layer.row_fn(x[i : i + 1])[0])


# ---- the real model: the reproduction ------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_default_server_settings_are_batch_invariant(smollm2_dir):
    """bfloat16 with `quantization="auto"` (what `kvmini serve` runs): four greedy prompts alone, then
    inside one `generate` with 8 other prompts, then preempted in a pool of 16 blocks."""
    texts = ["The capital of France is", "A B C A B C A B", "def fib(n):", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)
    llm = LLM(smollm2_dir, dtype="bfloat16", quantization="auto")
    reference = [signature(llm.generate(t, params)[0]) for t in texts]
    others = [" ".join(["Tell me about the sea."] * k) for k in range(1, 9)]
    batched = llm.generate(texts[:2] + others + texts[2:], params)
    assert [signature(o) for o in batched[:2] + batched[-2:]] == reference
    small = LLM(smollm2_dir, dtype="bfloat16", quantization="auto", num_blocks=16, max_num_batched_tokens=64)
    preempted = small.generate(others[4:] + texts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [signature(o) for o in preempted[4:]] == reference
