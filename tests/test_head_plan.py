"""Head-aware eviction (engine/cache/head_plan.py): plans, two pools, equivalence with per-head masks, refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.cache.head_plan import HeadPlan
from engine.cache.kv_policy import KVPolicy
from engine.capture.head_labels import HeadLabel
from engine.capture.request import AttentionCapture
from engine.cli import main as kvmini
from engine.core.errors import RequestError

BLOCK = 4
POLICY = KVPolicy(4, 8)  # 1 sink block + 8 window tokens
SAME_PLAN = HeadPlan(((0,), (0,)), 2)  # both layers: KV head 0 full, KV head 1 windowed (one HF mask fits)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("head_plan") / "gqa"
    return out, make_checkpoint(out, num_kv_heads=2, num_heads=4, layers=2, hidden=64)


@pytest.fixture(scope="module")
def full(tiny):
    return LLM(tiny[0], block_size=BLOCK, num_blocks=256)


def head_aware(tiny, plan=SAME_PLAN, policy=POLICY, **kwargs) -> LLM:
    return LLM(tiny[0], block_size=BLOCK, kv_policy=policy, head_plan=plan, **({"num_blocks": 256} | kwargs))


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kwargs)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def label(layer: int, head: int, name: str, secondary: str | None = None) -> HeadLabel:
    return HeadLabel(layer, head, name, 0.5, {}, secondary)


# ---- plans -------------------------------------------------------------------------------------------------


def test_plan_from_labels_keeps_a_kv_head_when_any_of_its_query_heads_needs_it(tiny, tmp_path):
    from engine.core.config import ModelConfig

    config = ModelConfig.from_dir(tiny[0])  # 2 layers, 4 query heads over 2 KV heads
    labels = [label(0, 0, "sink"), label(0, 1, "induction"), label(0, 2, "local"), label(0, 3, "sink"),
              label(1, 0, "local"), label(1, 1, "sink"), label(1, 2, "sink", secondary="long-range"),
              label(1, 3, "previous-token")]
    plan = HeadPlan.from_labels(labels, config)
    assert plan.full_kv_heads == ((0,), (1,)) and plan.full_fraction == 0.5
    assert plan.window_kv_heads(1) == (0,)
    assert HeadPlan.from_labels(labels, config, keep_labels=("local",)).full_kv_heads == ((1,), (0,))
    assert HeadPlan.load(plan.save(tmp_path / "plan.json")) == plan
    with pytest.raises(ValueError, match="cover 7 heads"):
        HeadPlan.from_labels(labels[:-1], config)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "kvmini-head-plan/1", "num_kv_heads": 2,
                                                   "full_kv_heads": [[0], "1"]}))
    with pytest.raises(ValueError, match="full_kv_heads"):
        HeadPlan.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="distinct, sorted"):
        HeadPlan(((1, 0),), 2)


def test_engine_options_are_checked(tiny):
    with pytest.raises(ValueError, match="head_plan needs kv_policy"):
        LLM(tiny[0], head_plan=SAME_PLAN)
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        head_aware(tiny, HeadPlan(((0,), (0,), (0,)), 2))
    with pytest.raises(ValueError, match="keeps no KV head's full cache"):
        head_aware(tiny, HeadPlan(((), ()), 2))
    with pytest.raises(ValueError, match="tensor_parallel_size"):  # refused before any rank starts
        head_aware(tiny, tensor_parallel_size=2)


# ---- against references ------------------------------------------------------------------------------------


def per_head_mask(num_tokens: int, num_prompt: int, windowed_heads: list[bool]) -> torch.Tensor:
    """HF's additive `[1, H, T, T]` mask: causal for full heads; for windowed ones, decode row p reads the
    sink blocks and the blocks from its window's first one (eviction's block granularity)."""
    causal = torch.tril(torch.ones(num_tokens, num_tokens, dtype=torch.bool))
    window = causal.clone()
    sink_end = POLICY.sink_blocks(BLOCK) * BLOCK
    for p in range(num_prompt, num_tokens):
        window[p, sink_end : POLICY.first_window_block(p + 1, BLOCK) * BLOCK] = False
    allowed = torch.stack([window if w else causal for w in windowed_heads])
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).unsqueeze(0)


def test_equals_hf_with_each_windowed_head_masked(tiny, full):
    """Full heads read every key, windowed heads their sink + window: HF's forward with a per-head mask."""
    _, hf = tiny
    llm, p = head_aware(tiny), prompt(9, seed=4)
    out = llm.generate(p, greedy(30, logprobs=1))[0]
    tokens = p + out.token_ids
    mask = per_head_mask(len(tokens) - 1, len(p), [False, False, True, True])  # query heads 2, 3: KV head 1
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([tokens[:-1]]), attention_mask=mask).logits[0, len(p) - 1 :], -1)
    assert ref.argmax(-1).tolist() == out.token_ids
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    torch.testing.assert_close(ours, ref.gather(1, torch.tensor(out.token_ids).view(-1, 1)).squeeze(1),
                               atol=1e-4, rtol=1e-4)
    assert out.token_ids != full.generate(p, greedy(30))[0].token_ids  # the windowed heads did lose keys
    assert llm.blocks.allocator.num_used == llm.blocks.window.blocks.allocator.num_used == 0


def test_a_window_covering_the_sequence_equals_the_full_cache(tiny, full):
    """Different plans per layer, nothing evicted: the two pools together are the one full cache."""
    llm = head_aware(tiny, HeadPlan(((1,), (0, 1)), 2), KVPolicy(4, 200))
    ps = [prompt(5 + 6 * i, seed=10 + i) for i in range(3)]
    want = [o.token_ids for o in full.generate(ps, greedy(40))]
    assert [o.token_ids for o in llm.generate(ps, greedy(40))] == want
    with llm.session(ps[0], params=SamplingParams(temperature=0.0)) as s:
        assert [s.step().token_id for _ in range(10)] == want[0][:10]


def test_window_pool_stays_bounded_and_everything_comes_back(tiny):
    # 1 KiB blocks in each pool; the window pool gets 160 / 4 blocks for one whole sequence (a prompt or a
    # recompute is prefilled in both pools) + 4 for the window of each 160-token sequence the full pool holds
    # (one), the full pool the rest.
    llm = head_aware(tiny, num_blocks=None, kv_cache_memory=112 * 2**10, max_num_seqs=2, max_model_len=160)
    window = llm.blocks.window.blocks
    assert (window.kv_cache.num_blocks, llm.blocks.kv_cache.num_blocks) == (44, 68)
    peak = []
    original = window.reserve
    window.reserve = lambda table, n: (original(table, n), peak.append(len(table.live_blocks)))
    outs = llm.generate([prompt(6, seed=1), prompt(7, seed=2)], greedy(120))
    assert all(len(o.token_ids) == 120 and o.finish_reason == "length" for o in outs)
    assert max(peak) <= POLICY.max_blocks(BLOCK)  # 127 tokens, at most 4 window blocks each
    assert llm.blocks.allocator.num_used == window.allocator.num_used == 0
    stats = llm.engine.stats()
    assert stats["kv_window_blocks_total"] == window.kv_cache.num_blocks and stats["kv_window_blocks_used"] == 0


def test_preemption_and_batching_lose_nothing(tiny):
    """A full pool too small for all: sequences are preempted and recomputed; every block comes back."""
    llm = head_aware(tiny, num_blocks=24, max_num_seqs=4)
    ps = [prompt(6, seed=20 + i) for i in range(4)]
    outs = llm.generate(ps, greedy(40))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [len(o.token_ids) for o in outs] == [40] * 4 and all(o.error is None for o in outs)
    assert llm.blocks.allocator.num_used == llm.blocks.window.blocks.allocator.num_used == 0


def test_requests_cannot_set_a_policy_or_capture(tiny):
    llm, p = head_aware(tiny), prompt(6)
    with pytest.raises(RequestError) as e:
        llm.engine.add_request(p, greedy(5, kv_policy="sink_window:4:8"))
    assert e.value.param == "kv_policy" and "head-aware" in str(e.value)
    with pytest.raises(RequestError) as e:
        llm.engine.add_request(p, greedy(5), capture=AttentionCapture(layers=[0]))
    assert e.value.param == "attention"
    with pytest.raises(RequestError) as e:
        llm.session(p, capture=AttentionCapture(layers=[0]))
    assert e.value.param == "attention"


def test_cli_plans_and_generates_with_the_plan(tiny, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("the cat sat on the mat. " * 40)
    plan_path = tmp_path / "plan.json"
    assert kvmini(["head-plan", str(tiny[0]), "--text", str(text), "--tokens", "64", "--out", str(plan_path),
                   "--keep", "induction,copying,duplicate,long-range,syntax,sink,local,diffuse,mixed"]) == 0
    plan = HeadPlan.load(plan_path)
    assert plan.num_layers == 2 and plan.num_full > 0
    assert "keep a full cache" in capsys.readouterr().out
    assert kvmini(["generate", "--model", str(tiny[0]), "--prompt", "hello", "--max-tokens", "20", "--quantization",
                   "none", "--head-plan", str(plan_path), "--kv-policy", "sink_window:4:8"]) == 0
    assert kvmini(["head-plan", str(tiny[0]), "--out", str(plan_path), "--keep", "nonsense"]) != 0
    assert "--keep takes labels" in capsys.readouterr().err


# ---- sizing (bench/kv_memory.py's eviction table) ----------------------------------------------------------


def test_sequences_generated_to_a_context_follow_the_blocks_they_hold():
    from engine.cache.blocks import BlockManager
    from engine.cache.head_pools import head_aware_blocks, head_aware_pools
    from engine.cache.pools import CacheConfig, KVCache
    from engine.kv_memory.sizing import generated_seqs, peak_blocks, synthetic_config

    config = synthetic_config(layers=2, heads=4, kv_heads=2, head_dim=8)  # 2 x 2 x 2 x 8 x 4 = 256 B/token
    cache = CacheConfig(block_size=BLOCK, kv_cache_memory=64 * 2**10, kv_cache_dtype="auto")
    blocks = BlockManager(KVCache(config, cache, torch.float32, "meta"), enable_prefix_caching=False)
    assert peak_blocks(blocks, 100) == (25, 0)
    assert peak_blocks(blocks, 100, POLICY) == (POLICY.max_blocks(BLOCK), 0)  # 1 sink + 2 window + 1
    assert generated_seqs(blocks, 100) == (64 // 25, 25 * 1024)
    assert generated_seqs(blocks, 100, POLICY)[0] == 64 // 4
    # Head-aware: half the KV heads full; the window pool sized for 2 windows and one 100-token prefill.
    aware = head_aware_blocks(config, cache, torch.float32, "meta", SAME_PLAN, POLICY, 2, 100)
    assert head_aware_pools(config, cache, torch.float32, SAME_PLAN, POLICY, 2, 100) == (
        aware.kv_cache.num_blocks, aware.window.blocks.kv_cache.num_blocks) == (128 - 33, 33)
    assert peak_blocks(aware, 100) == (25, 4)
    assert generated_seqs(aware, 100) == (95 // 25, 25 * 512 + 4 * 512)
    assert blocks.allocator.num_used == aware.allocator.num_used == aware.window.blocks.allocator.num_used == 0


def test_server_runs_a_head_aware_engine(tiny):
    httpx = pytest.importorskip("httpx")
    from live_server import LiveServer

    from server import ServerSettings, create_app

    llm = head_aware(tiny)
    with LiveServer(create_app(llm, ServerSettings())) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        body = {"prompt": prompt(10), "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        r = http.post("/v1/completions", json={**body, "kv_policy": "sink_window:4:8"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_policy"
        r = http.post("/generate", json={"prompt": "hi", "attention": {"layers": [0]}, "stream": False})
        assert r.status_code == 400 and r.json()["error"]["param"] == "attention"
        assert "kvmini_requests_running" in http.get("/metrics").text
    assert llm.blocks.allocator.num_used == llm.blocks.window.blocks.allocator.num_used == 0
