"""Sink + window eviction (engine/cache/kv_policy.py): bounded memory, equivalence, positions, batching, validation."""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.cache.blocks import EVICTED, BlockManager, BlockTable
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import CacheConfig, KVCache
from engine.capture.request import AttentionCapture
from engine.core.config import ModelConfig, RopeScaling
from engine.core.errors import RequestError, RequestTooLargeError
from engine.model.attention import SinkRotation, rotate_sink_keys
from engine.model.llama import RopeTable, apply_rope, rope_inv_freq

BLOCK, POOL = 4, 8  # the small pool: 32 tokens
SINK_WINDOW = "sink_window:4:8"  # 1 sink block + 8 window tokens: at most 1 + 2 + 1 = 4 blocks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_policy") / "gqa"
    hf = make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64)
    return out, hf


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_policy") / "one_layer"
    hf = make_checkpoint(out, num_kv_heads=2, layers=1, hidden=64, seed=1)
    return out, hf


@pytest.fixture(scope="module")
def small(tiny):
    return LLM(tiny[0], block_size=BLOCK, num_blocks=POOL)


@pytest.fixture(scope="module")
def big(tiny):
    return LLM(tiny[0], block_size=BLOCK, num_blocks=512)


def greedy(n: int, kv_policy=None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, kv_policy=kv_policy)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


# ---- policy and block manager ------------------------------------------------------------------------------


def test_parse_round_trips_and_block_arithmetic():
    p = KVPolicy.parse("sink_window:4:1020")
    assert p == KVPolicy(4, 1020) and str(p) == "sink_window:4:1020" and not p.streaming
    s = KVPolicy.parse("sink_window:4:1020:streaming")
    assert s.streaming and KVPolicy.parse(str(s)) == s
    assert KVPolicy(4, 12).sink_blocks(4) == 1 and KVPolicy(5, 12).sink_blocks(4) == 2
    assert KVPolicy(0, 12).sink_blocks(4) == 0
    assert KVPolicy(4, 12).max_blocks(4) == 5
    # 30 tokens: the window is tokens 18..29, so blocks 4.. are read; blocks 1..3 are evicted.
    assert KVPolicy(4, 12).first_window_block(30, 4) == 4
    assert KVPolicy(4, 12).first_window_block(10, 4) == 1  # nothing to evict yet


def test_block_manager_evicts_and_skips_sentinels():
    cfg = ModelConfig("LlamaForCausalLM", 300, 32, 32, 1, 4, 2, 8)
    bm = BlockManager(KVCache(cfg, CacheConfig(block_size=4, num_blocks=16), torch.float32, "cpu"))
    policy, table = KVPolicy(4, 8), BlockTable()
    bm.reserve(table, 29)
    bm.commit(table, list(range(29)), 28)
    assert bm.evict(table, policy, 29) == 4  # window 21..28: blocks 5.. kept, blocks 1..4 evicted
    assert table.blocks[1:5] == [EVICTED] * 4 and len(table.blocks) == 8
    assert bm.allocator.num_used == 4 and bm.held_bytes(table) == 4 * bm.kv_cache.bytes_per_block
    child = bm.fork(table)
    assert child.blocks == table.blocks and bm.allocator.num_used == 4
    bm.release(child)
    bm.release(table)
    assert bm.allocator.num_used == 0 and table.blocks == []
    # A recompute lays out the sink and the window only; a chunk stops before the gap and skips it.
    bm.reserve_window(table, policy, 29)
    assert table.blocks[1:5] == [EVICTED] * 4 and bm.allocator.num_used == 4 == bm.blocks_to_recompute(policy, 29)
    assert bm.held_run(table, 0) == 4
    table.num_cached_tokens = 4
    bm.skip_evicted(table)
    assert table.num_cached_tokens == 20 and bm.held_run(table, 20) is None
    bm.release(table)
    assert bm.allocator.num_free == 16


# ---- bounded memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["original", "streaming"])
def test_generates_four_times_the_pool_in_bounded_memory(small, positions):
    policy = KVPolicy(4, 8, positions)
    pool_tokens = BLOCK * POOL
    engine, peak = small.engine, 0
    rid = engine.add_request(prompt(10), greedy(4 * pool_tokens, policy))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final = out
        peak = max(peak, small.blocks.allocator.num_used)
    assert final.request_id == rid and final.finish_reason == "length" and final.error is None
    assert len(final.token_ids) == 4 * pool_tokens
    assert peak <= policy.max_blocks(BLOCK)
    assert small.blocks.allocator.num_used == 0


def test_window_covering_the_sequence_equals_the_full_cache(big):
    p = prompt(20, seed=3)
    full = big.generate(p, greedy(40))[0].token_ids
    for positions in ("original", "streaming"):
        assert big.generate(p, greedy(40, KVPolicy(4, 60, positions)))[0].token_ids == full
    # A prompt longer than sink + window is prefilled whole; eviction starts at the first decode step.
    assert big.generate(p, greedy(1, KVPolicy(4, 8)))[0].token_ids == full[:1]
    assert big.generate(p, greedy(40, KVPolicy(4, 12)))[0].token_ids != full


# ---- against independent references -----------------------------------------------------------------------


def window_mask(num_tokens: int, num_prompt: int, policy: KVPolicy, block_size: int) -> torch.Tensor:
    """The additive `[1, 1, T, T]` mask of windowed decoding: prompt rows causal, decode row p reads the sink
    blocks and the blocks from its window's first one (the block granularity of eviction)."""
    allowed = torch.tril(torch.ones(num_tokens, num_tokens, dtype=torch.bool))
    sink_end = policy.sink_blocks(block_size) * block_size
    for p in range(num_prompt, num_tokens):
        window_start = policy.first_window_block(p + 1, block_size) * block_size
        allowed[p, sink_end:window_start] = False
    return torch.zeros(num_tokens, num_tokens).masked_fill(~allowed, float("-inf")).view(1, 1, num_tokens, num_tokens)


def test_original_positions_equal_masked_full_attention(tiny, big):
    """Every decode step of "original" equals HF's full forward with each row masked to its window."""
    _, hf = tiny
    policy, p = KVPolicy(4, 8), prompt(9, seed=4)
    out = big.generate(p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, kv_policy=policy,
                                         logprobs=3))[0]
    tokens = p + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([tokens[:-1]]), attention_mask=window_mask(len(tokens) - 1, len(p), policy, BLOCK))
    logprobs = torch.log_softmax(ref.logits[0, len(p) - 1 :].float(), -1)
    assert logprobs.argmax(-1).tolist() == out.token_ids
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    theirs = logprobs.gather(1, torch.tensor(out.token_ids).view(-1, 1)).squeeze(1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "streaming"])
def test_one_layer_step_equals_a_forward_over_the_kept_tokens(one_layer, positions):
    """With one layer a token's K/V depend on its embedding and position only, so a windowed step equals a
    plain forward over the kept tokens: at their original positions, or renumbered 0.. (StreamingLLM)."""
    path, hf = one_layer
    llm = LLM(path, block_size=BLOCK, num_blocks=64)
    policy, p = KVPolicy(4, 8, positions), prompt(6, seed=5)
    forced = prompt(24, seed=6)
    with llm.session(p, params=SamplingParams(temperature=0.0, kv_policy=policy)) as s:
        steps = [s.feed([t])[0] for t in forced]
        assert s.seq.block_table.has_evicted
    tokens = p + forced
    n = len(tokens) - 1  # the last step's query is at position n - 1
    sink_end = policy.sink_blocks(BLOCK) * BLOCK
    kept = list(range(sink_end)) + list(range(policy.first_window_block(n, BLOCK) * BLOCK, n))
    positions_ids = kept if positions == "original" else list(range(len(kept)))
    with torch.no_grad():
        ref = hf(torch.tensor([[tokens[i] for i in kept]]), position_ids=torch.tensor([positions_ids])).logits
    torch.testing.assert_close(steps[-1].logits, ref[0, -1].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)])
def test_sink_rotation_equals_rope_at_the_shifted_position(scaling):
    head_dim, shift = 16, 37
    rope = RopeTable(rope_inv_freq(head_dim, 10000.0, scaling), torch.float32, 128)
    raw = torch.randn(5, 2, head_dim)  # [positions, KVH, D] before RoPE
    at = lambda pos: apply_rope(raw, *rope.lookup(torch.tensor(pos), max(pos)))  # noqa: E731
    keys = at([0, 1, 2, 3, 4]).transpose(0, 1).unsqueeze(0).contiguous()  # [1, KVH, L, D] as gathered
    cos, sin = rope.lookup(torch.tensor([shift]), shift)
    rotate_sink_keys(keys, SinkRotation([0], [3], cos.squeeze(1), sin.squeeze(1)))
    expected = at([shift, shift + 1, shift + 2, 3, 4]).transpose(0, 1)  # the sink moved, the rest did not
    torch.testing.assert_close(keys[0], expected, atol=1e-5, rtol=1e-5)


def test_streaming_differs_from_original_once_tokens_are_evicted(big):
    p, forced = prompt(6, seed=7), prompt(30, seed=8)
    logits = {}
    for positions in ("original", "streaming"):
        params = SamplingParams(temperature=0.0, kv_policy=KVPolicy(4, 8, positions))
        with big.session(p, params=params) as s:
            logits[positions] = [s.feed([t])[0].logits for t in forced]
    # Nothing is evicted before the sequence outgrows sink + window: both see the same keys.
    first_eviction = next(i for i in range(len(forced)) if KVPolicy(4, 8).first_window_block(len(p) + i, 4) > 1)
    for i in range(first_eviction):
        torch.testing.assert_close(logits["original"][i], logits["streaming"][i])
    assert not torch.allclose(logits["original"][-1], logits["streaming"][-1], atol=1e-3)


# ---- batching, preemption, prefix cache --------------------------------------------------------------------


def test_windowed_request_batched_with_normal_ones_changes_nothing(big):
    ps = [prompt(5 + 7 * i, seed=10 + i) for i in range(4)]
    params = [greedy(30), greedy(30, "sink_window:4:8"), greedy(25), greedy(30, "sink_window:4:8:streaming")]
    alone = [big.generate(p, sp)[0].token_ids for p, sp in zip(ps, params)]
    assert [o.token_ids for o in big.generate(ps, params)] == alone
    assert big.blocks.allocator.num_used == 0


def test_preempted_windowed_requests_recompute_their_window_in_bounded_memory(tiny, big):
    llm = LLM(tiny[0], block_size=BLOCK, num_blocks=POOL, max_num_seqs=4, enable_prefix_caching=False)
    layouts = []  # the block tables laid out to recompute preempted windowed sequences
    reserve_window = llm.blocks.reserve_window
    llm.blocks.reserve_window = lambda t, pol, n: (reserve_window(t, pol, n), layouts.append(list(t.blocks)))
    ps = [prompt(6, seed=20 + i) for i in range(4)]
    # The first request grows to the whole pool; the windowed ones, newer, are preempted after evicting.
    params = [greedy(24), greedy(60, SINK_WINDOW), greedy(60, SINK_WINDOW + ":streaming"), greedy(10)]
    outs = llm.generate(ps, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(EVICTED in blocks for blocks in layouts)  # recomputed without the tokens it had dropped
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert [len(o.token_ids) for o in outs] == [24, 60, 60, 10]
    # Requests without a policy recompute exactly: their tokens are those of a run alone.
    assert [outs[0].token_ids, outs[3].token_ids] == [big.generate(ps[i], params[i])[0].token_ids for i in (0, 3)]
    assert llm.blocks.allocator.num_used == 0


def test_blocks_written_after_an_eviction_never_enter_the_prefix_cache(tiny):
    # Generated tokens' blocks enter the prefix cache only without batch invariance (with it, only prompts').
    llm = LLM(tiny[0], block_size=BLOCK, num_blocks=64, batch_invariant=False)
    p = prompt(8, seed=30)
    windowed = llm.generate(p, greedy(40, "sink_window:4:8"))[0]
    # The same tokens as a plain prompt: only the blocks computed with full attention may be reused.
    again = llm.generate(p + windowed.token_ids, greedy(10))[0]
    fresh = LLM(tiny[0], block_size=BLOCK, num_blocks=64, enable_prefix_caching=False)
    assert again.token_ids == fresh.generate(p + windowed.token_ids, greedy(10))[0].token_ids
    # Blocks 0-2 were full before the first eviction (at 16 tokens); block 3 was finished after it.
    assert again.num_cached_prompt_tokens == 12


def test_engine_wide_default_and_session(tiny):
    llm = LLM(tiny[0], block_size=BLOCK, num_blocks=POOL, kv_policy=SINK_WINDOW)
    p = prompt(10, seed=40)
    out = llm.generate(p, greedy(3 * BLOCK * POOL))[0]
    assert len(out.token_ids) == 3 * BLOCK * POOL
    # A session with the same policy, one token at a time, reads what the engine read.
    with llm.session(p, params=SamplingParams(temperature=0.0, kv_policy=SINK_WINDOW)) as s:
        tokens = [s.step().token_id for _ in range(50)]
        with pytest.raises(ValueError, match="evicted"):
            s.rewind(1)
    assert tokens == out.token_ids[:50]
    assert llm.blocks.allocator.num_used == 0


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, param", [
    ("sink_window:4", "kv_policy"), ("window:4:8", "kv_policy"), ("sink_window:a:8", "kv_policy"),
    ("sink_window:4:0", "kv_policy.window"), ("sink_window:4:8:rotated", "kv_policy.positions"), (7, "kv_policy"),
])
def test_bad_policies_name_the_field(spec, param):
    with pytest.raises(RequestError) as e:
        SamplingParams(kv_policy=spec)
    assert e.value.param == param


def test_context_rules_with_a_policy(small):
    engine, p = small.engine, prompt(10)
    with pytest.raises(RequestTooLargeError) as e:
        engine.add_request(p, greedy(100))  # 110 tokens: more than the 32-token pool
    assert e.value.param == "max_tokens"
    engine.abort(engine.add_request(p, greedy(100, SINK_WINDOW)))  # bounded: accepted
    with pytest.raises(RequestError) as e:
        engine.add_request(p, greedy(small.max_model_len, SINK_WINDOW))
    assert e.value.param == "max_tokens" and e.value.code == "context_length_exceeded"
    with pytest.raises(RequestTooLargeError) as e:
        engine.add_request(p, greedy(10, "sink_window:4:32"))  # 1 + 8 + 1 blocks > 8
    assert e.value.param == "kv_policy"
    with pytest.raises(RequestTooLargeError) as e:
        engine.add_request(prompt(40), greedy(10, SINK_WINDOW))  # the prompt is prefilled whole
    assert e.value.param == "prompt"
    with pytest.raises(RequestError) as e:
        engine.add_request(p, greedy(10, SINK_WINDOW), capture=AttentionCapture(layers=[0]))
    assert e.value.param == "kv_policy"
    with pytest.raises(RequestError) as e:
        small.session(p, capture=AttentionCapture(layers=[0]), params=SamplingParams(kv_policy=SINK_WINDOW))
    assert e.value.param == "kv_policy"
    # max_tokens=None: up to the context length, not the pool.
    rid = engine.add_request(p, SamplingParams(max_tokens=None, kv_policy=SINK_WINDOW))
    assert engine.requests[rid].stop.max_new_tokens == small.max_model_len - len(p)
    engine.abort(rid)
    assert small.blocks.allocator.num_used == 0


# ---- server ------------------------------------------------------------------------------------------------


def test_http_kv_policy_field(tiny):
    httpx = pytest.importorskip("httpx")
    from live_server import LiveServer

    from server import ServerSettings, create_app

    llm = LLM(tiny[0], block_size=BLOCK, num_blocks=POOL)
    with LiveServer(create_app(llm, ServerSettings())) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        body = {"prompt": prompt(10), "max_tokens": 80, "temperature": 0, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 90 tokens > the 32-token pool
        r = http.post("/v1/completions", json={**body, "kv_policy": SINK_WINDOW})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 80
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "kv_policy": SINK_WINDOW}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        for bad in ("sink_window:4", "sink_window:4:0", "sink_window:4:64"):
            r = http.post("/v1/completions", json={**body, "kv_policy": bad})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("kv_policy"), (bad, r.json())
        r = http.post("/generate", json={"prompt": "hi", "kv_policy": SINK_WINDOW, "attention": {"layers": [0]},
                                         "stream": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_policy"


def test_smollm2_original_positions_equal_masked_full_attention(smollm2_llm, smollm2_hf):
    policy, num_prompt = KVPolicy(4, 40), 70
    tokens = prompt(num_prompt + 30, seed=50)
    with smollm2_llm.session(tokens[:num_prompt], params=SamplingParams(temperature=0.0, kv_policy=policy)) as s:
        ours = torch.stack([s.feed([t])[0].logits for t in tokens[num_prompt:]])
        assert s.seq.block_table.has_evicted
    mask = window_mask(len(tokens) - 1, num_prompt, policy, smollm2_llm.blocks.block_size)
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([tokens[:-1]]), attention_mask=mask).logits[0, num_prompt - 1 :]
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=1e-4)
