"""Continuous batching: batched == alone, preemption, prefix caching, abort, chunked prefill."""

from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "gqa"
    make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64)
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def run_alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return llm.generate(prompt, params)[0].token_ids


def run_staggered(llm: LLM, items: list[tuple[list[int], SamplingParams]], every: int = 3) -> dict[str, list[int]]:
    """Add one request every `every` steps, so requests join a batch that is already decoding."""
    engine, pending, done, rids, step = llm.engine, list(items), {}, [], 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            rids.append(engine.add_request(*pending.pop(0)))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        step += 1
    return [done[r] for r in rids]


def test_batched_equals_alone_with_staggered_arrivals(tiny_dir):
    llm = LLM(tiny_dir, block_size=4, num_blocks=512, max_num_seqs=8, max_num_batched_tokens=64)
    items = [(p, greedy(10 + 3 * i)) for i, p in enumerate(prompts(10))]
    alone = [run_alone(llm, p, sp) for p, sp in items]
    assert run_staggered(llm, items) == alone
    assert llm.blocks.allocator.num_used == 0


def test_seeded_sampling_same_alone_and_batched(tiny_dir):
    llm = LLM(tiny_dir)
    ps = prompts(4, seed=1)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=20, ignore_eos=True) for i in range(4)]
    alone = [run_alone(llm, p, sp) for p, sp in zip(ps, params)]
    batched = [o.token_ids for o in llm.generate(ps, params)]
    assert batched == alone


def test_preemption_by_recompute_keeps_outputs(tiny_dir):
    # 12 blocks of 4 tokens = 48 slots; 6 requests needing ~20-30 tokens each cannot all fit at once.
    small = LLM(tiny_dir, block_size=4, num_blocks=12, max_num_seqs=6, enable_prefix_caching=False)
    big = LLM(tiny_dir, block_size=4, num_blocks=512)
    items = [(p[:12], greedy(16)) for p in prompts(6, seed=2) if len(p) >= 12][:4]
    items += [([7, 8, 9, 10, 11, 12, 13, 14, 15, 16], greedy(20)), ([1, 2, 3], greedy(24))]
    alone = [run_alone(big, p, sp) for p, sp in items]
    outs = small.generate([p for p, _ in items], [sp for _, sp in items])
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert small.blocks.allocator.num_used == 0
    assert small.blocks.allocator.num_free == 12


def test_prefix_cache_hits_and_same_output(tiny_dir):
    shared = list(range(40, 40 + 48))  # 3 full blocks of 16
    ps = [shared + [i, i + 1, i + 2] for i in range(5)]
    cached = LLM(tiny_dir)
    uncached = LLM(tiny_dir, enable_prefix_caching=False)
    want = [o.token_ids for o in uncached.generate(ps[:1], greedy(12))] + [
        run_alone(uncached, p, greedy(12)) for p in ps[1:]
    ]
    first = cached.generate(ps[0], greedy(12))[0]
    assert first.num_cached_prompt_tokens == 0
    rest = cached.generate(ps[1:], greedy(12))
    assert [first.token_ids] + [o.token_ids for o in rest] == want
    assert all(o.num_cached_prompt_tokens == 48 for o in rest)
    assert cached.blocks.prefix_hits >= 3 * 4
    assert cached.engine.stats()["prefix_cache_hit_rate"] > 0.5
    assert cached.blocks.allocator.num_used == 0


def test_abort_frees_own_blocks_not_shared_ones(tiny_dir):
    llm = LLM(tiny_dir, block_size=4, num_blocks=64)
    shared = list(range(100, 116))  # 4 full blocks
    engine = llm.engine
    a = engine.add_request(shared + [1, 2], greedy(30))
    for _ in range(3):
        engine.step()
    b = engine.add_request(shared + [3, 4], greedy(30))
    for _ in range(3):
        engine.step()
    seq_a = engine.requests[a].seq
    seq_b = engine.requests[b].seq
    shared_blocks = set(seq_a.block_table.blocks[:4])
    assert shared_blocks == set(seq_b.block_table.blocks[:4])  # b reused a's prefix blocks
    own_a = set(seq_a.block_table.blocks) - shared_blocks
    final = engine.abort(a)
    assert final.finish_reason == "abort"
    alloc = llm.blocks.allocator
    assert all(alloc.ref_counts[blk] == 0 for blk in own_a)
    assert all(alloc.ref_counts[blk] == 1 for blk in shared_blocks)  # still held by b
    while engine.has_unfinished():
        engine.step()
    assert alloc.num_used == 0


def test_chunked_prefill_matches_unchunked(tiny_dir):
    long_prompt = prompts(1, seed=3)[0] * 5
    chunked = LLM(tiny_dir, max_num_batched_tokens=16)
    whole = LLM(tiny_dir, max_num_batched_tokens=4096)
    assert run_alone(chunked, long_prompt, greedy(8)) == run_alone(whole, long_prompt, greedy(8))
    # the long prompt must not freeze a decoding request: both make progress within the same steps
    engine = chunked.engine
    short = engine.add_request([1, 2, 3], greedy(40))
    engine.step()
    engine.add_request(long_prompt * 2, greedy(4))
    advanced = 0
    for _ in range(5):
        advanced += sum(1 for o in engine.step() if o.request_id == short)
    assert advanced == 5
    while engine.has_unfinished():
        engine.step()


def test_capture_inside_a_batch(tiny_dir):
    from engine import AttentionCapture

    llm = LLM(tiny_dir)
    ps = prompts(3, seed=4)
    cap = AttentionCapture(layers=[1], heads=[0, 3])
    alone = llm.generate(ps[0], greedy(5), capture=cap)[0]
    engine = llm.engine
    rid = engine.add_request(ps[0], greedy(5), capture=cap)
    others = [engine.add_request(p, greedy(5)) for p in ps[1:]]
    rows = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                rows += out.attention
            else:
                assert out.attention is None and out.request_id in others
    assert len(rows) == len(alone.attention) == 5
    for got, want in zip(rows, alone.attention):
        assert got.query_position == want.query_position
        assert list(got.layers) == [1] and got.layers[1].shape == (2, got.query_position + 1)
        assert abs(got.layers[1] - want.layers[1]).max() < 1e-5


def test_group_by_length_bounds_padding_and_keys():
    from engine.model.attention import group_by_length

    assert group_by_length([], 10, 100) == []
    assert group_by_length([5], 0, 1) == [1]  # a lone sequence is never split
    assert group_by_length([3, 3, 3, 4], 0, 100) == [3, 1]  # no padding allowed: equal lengths only
    assert group_by_length([1, 2, 3, 10], 3, 100) == [3, 1]  # [1,2,3] pads 3; adding 10 would pad 24
    assert group_by_length([10, 10, 10, 10], 1000, 25) == [2, 2]  # at most 25 keys per multi-row batch
    lens = sorted([7, 90, 91, 300, 301, 302, 1000])
    sizes = group_by_length(lens, 16, 10_000)
    assert sum(sizes) == len(lens)
    start = 0
    for n in sizes:
        run = lens[start : start + n]
        assert n * max(run) - sum(run) <= 16
        start += n


def test_decode_split_into_length_groups_matches_one_batch(tiny_dir, monkeypatch):
    """Rows attended in many small padded batches give the tokens and attention of one big batch."""
    import engine.exec.runner as runner
    from engine import AttentionCapture

    llm = LLM(tiny_dir, block_size=4, num_blocks=512)
    ps = prompts(6, seed=7)
    cap = AttentionCapture(layers=[0, 1])
    one_batch = llm.generate(ps, greedy(12), capture=cap)
    monkeypatch.setattr(runner, "DECODE_MAX_PADDING", 0)  # every distinct length is its own batch
    monkeypatch.setattr(runner, "DECODE_MAX_KEYS", 1)
    split = llm.generate(ps, greedy(12), capture=cap)
    assert len({len(p) for p in ps}) > 3  # the split really happens
    for a, b in zip(one_batch, split):
        assert a.token_ids == b.token_ids
        for ra, rb in zip(a.attention, b.attention):
            assert ra.query_position == rb.query_position
            assert max(float(abs(ra.layers[i] - rb.layers[i]).max()) for i in (0, 1)) < 1e-5  # float32 rounding of different batch shapes
    assert llm.blocks.allocator.num_used == 0


def test_prefill_sdpa_path_matches_explicit_path(tiny_dir, monkeypatch):
    """Long chunks switch from explicit scores to SDPA: same logits and tokens, with and without a prefix."""
    import engine.model.attention as attention

    llm = LLM(tiny_dir, block_size=4, num_blocks=512, max_num_batched_tokens=16)  # 50 tokens: 4 chunks
    ids = prompts(1, seed=11)[0] + list(range(50))
    explicit_logits = llm.logits(ids)
    explicit_tokens = run_alone(llm, ids, greedy(8))
    monkeypatch.setattr(attention, "PREFILL_MAX_EXPLICIT_SCORES", 0)
    assert (llm.logits(ids) - explicit_logits).abs().max().item() < 1e-5
    assert run_alone(llm, ids, greedy(8)) == explicit_tokens


@pytest.mark.parametrize(
    "text, stop_id, want",
    [
        ("é", 258, "é"),  # eos right after a 2-byte character the detokenizer still holds
        ("a\xc3", 258, "a\ufffd"),  # an unfinished character: what decode gives, not nothing
        ("aé", 7, "aé"),  # a stop token id: its own text is not output
    ],
)
def test_stop_token_releases_held_bytes(tiny_dir, monkeypatch, text, stop_id, want):
    """The byte tokenizer holds text while a UTF-8 character may be incomplete; a stop ends that."""
    import torch

    from engine.sampling.sampler import SamplerOutput

    llm = LLM(tiny_dir)
    raw = text.encode("latin-1") if "\xc3" in text else text.encode()
    script = [llm.tokenizer.token_to_id(_byte_symbol(b)) for b in raw] + [stop_id]
    tokens = iter(script)
    monkeypatch.setattr(llm.engine, "_sample", lambda logits, reqs: SamplerOutput(torch.tensor([next(tokens)])))
    out = llm.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[7]))[0]
    assert out.finish_reason == "stop" and out.token_ids == script
    assert out.text == want == llm.tokenizer.decode(script[:-1])
    assert llm.blocks.allocator.num_used == 0


def _byte_symbol(b: int) -> str:
    """GPT-2's printable stand-in for byte `b` (what byte-level BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + sum(1 for x in range(b) if x not in printable))
