"""KV-head variants and KV-cache sizing: the formula against storage, BlockManager and the scheduler; MHA
expansion exact and mean-pooling as computed by hand (tiny models); SmolLM2 MHA token-identical, MQA runs."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.core.config import ModelConfig
from engine.kv_memory import cli as kv_cli
from engine.kv_memory.quality import agreement, perplexity
from engine.kv_memory.sizing import (
    admission_engine,
    allocate,
    blocks_for,
    count_admitted,
    formula_held_bytes,
    formula_max_seqs,
    formula_pool_bytes,
    measured_held_bytes,
    rss_growth,
    size,
    synthetic_config,
)
from engine.kv_memory.variants import convert_kv_heads, divisors, regroup_kv, variant_config, variant_name

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}  # name -> (heads, kv heads)
LAYERS, HEAD_DIM, BLOCK = 3, 8, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: two OpenMP threads spinning against other processes run several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def k_weight(path: Path, layer: int = 0, name: str = "k_proj.weight") -> torch.Tensor:
    return load_file(path / "model.safetensors")[f"model.layers.{layer}.self_attn.{name}"]


# ---- accounting: formula == storage == BlockManager == scheduler -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pool_and_sequence_bytes_equal_the_formula(shape, dtype):
    heads, kv = SHAPES[shape]
    config = synthetic_config(LAYERS, heads, kv, HEAD_DIM)
    per_token = 2 * LAYERS * kv * HEAD_DIM * torch.empty((), dtype=dtype).element_size()
    assert config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) == per_token
    cache = allocate(config, dtype, BLOCK, num_blocks=7)
    assert cache.pool_bytes() == formula_pool_bytes(config, dtype, BLOCK, 7) == 7 * BLOCK * per_token
    contexts = [1, 3, 4, 5, 8, 9, 27, 28]  # partly filled last blocks and exact multiples
    held = measured_held_bytes(cache, contexts)
    for c in contexts:
        assert held[c] == formula_held_bytes(config, dtype, BLOCK, c) == math.ceil(c / BLOCK) * BLOCK * per_token


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_size_row_is_exact_for_every_kv_head_count(dtype):
    base = synthetic_config(LAYERS, 6, 6, HEAD_DIM)
    for kv in divisors(6):
        row = size(variant_config(base, kv), dtype, [5, 17, 50], budget=10_000, block_size=BLOCK, measure_rss=False)
        assert row.exact, row
        assert row.pool_device == "cpu" and row.pool_blocks == blocks_for(50, BLOCK)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("budget", [50_000, 123_457, 1_000_000])
def test_admitted_sequences_equal_budget_over_blocks_per_sequence(shape, budget):
    heads, kv = SHAPES[shape]
    config = synthetic_config(LAYERS, heads, kv, HEAD_DIM)
    engine = admission_engine(config, torch.float32, BLOCK, budget, max_model_len=4096)
    block_bytes = BLOCK * config.kv_bytes_per_token(4)
    for context in (4, 7, 33, 100):
        pool_blocks = budget // block_bytes
        expected = pool_blocks // math.ceil(context / BLOCK)
        if expected == 1 and pool_blocks == math.ceil(context / BLOCK):
            continue  # the pool is exactly one sequence: see test_one_sequence_exactly_the_pool
        formula = formula_max_seqs(config, torch.float32, BLOCK, budget, context)
        assert count_admitted(engine, context) == expected == formula
    assert engine.blocks.allocator.num_free == engine.blocks.allocator.num_blocks  # all aborted again


def test_admission_count_matches_a_real_engine_run(tmp_path):
    """Weightless schedule()-only counting equals what a real engine (tiny model, forward passes) admits."""
    make_checkpoint(tmp_path, num_heads=4, num_kv_heads=2, hidden=32)
    budget, context = 40 * BLOCK * ModelConfig.from_dir(tmp_path).kv_bytes_per_token(4), 10
    llm = LLM(tmp_path, block_size=BLOCK, kv_cache_memory=budget, max_num_seqs=10_000, max_num_batched_tokens=10_000)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for i in range(30):
        llm.engine.add_request([(i + j) % 256 for j in range(context)], params)
    first_step = llm.engine.step()  # admits everything that fits, prefills it and finishes it (max_tokens 1)
    probe = admission_engine(llm.config, torch.float32, BLOCK, budget, llm.max_model_len)
    assert len(first_step) == count_admitted(probe, context) == 40 // 3 == 13


def test_one_sequence_exactly_the_pool():
    """Documents the engine's up-front check: prompt + max_tokens must fit the pool, even though the one
    generated token's K/V is never written. Admitted is 0 or 1 (1 once that check stops counting it)."""
    config = synthetic_config(LAYERS, 4, 2, HEAD_DIM)
    budget = 4 * BLOCK * config.kv_bytes_per_token(4)
    engine = admission_engine(config, torch.float32, BLOCK, budget, max_model_len=4096)
    assert formula_max_seqs(config, torch.float32, BLOCK, budget, 4 * BLOCK) == 1
    assert count_admitted(engine, 4 * BLOCK) in (0, 1)
    assert count_admitted(engine, 4 * BLOCK - 1) == 1


def test_rss_grows_by_the_pool():
    config = synthetic_config(4, 8, 8, 64)
    num_blocks = 256  # 64 MiB of float32
    pool = formula_pool_bytes(config, torch.float32, 16, num_blocks)
    grown = rss_growth(config, torch.float32, 16, num_blocks)
    if grown is None:
        pytest.skip("no /proc on this platform")
    assert 0.95 * pool <= grown <= pool + 16 * 2**20


def test_huge_pools_are_sized_on_the_meta_device():
    config = synthetic_config(80, 64, 8, 128)  # a 70B-class shape: 320 KiB per bf16 token
    row = size(config, torch.bfloat16, [131072], budget=40 * 2**30, measure_rss=False)
    assert row.pool_device == "meta"
    assert row.pool_bytes_measured == row.pool_bytes_formula == 131072 * 327_680
    assert row.max_seqs_formula[131072] == 1


# ---- variants: tiny models ---------------------------------------------------------------------------------


def test_variant_names_and_divisors():
    base = synthetic_config(2, 9, 3, 8)
    assert divisors(9) == [1, 3, 9]
    assert [variant_name(variant_config(base, k)) for k in divisors(9)] == ["MQA-1", "GQA-3", "MHA-9"]
    with pytest.raises(ValueError, match="divide"):
        variant_config(base, 2)


def test_regroup_by_hand():
    """6 query heads over 2 KV heads (query h reads KV h // 3), head_dim 1, re-grouped to 3, 1 and 6."""
    k = torch.tensor([[10.0, 1.0], [20.0, 2.0]])  # [kv*D, hidden] with D = 1: KV head 0 = row 0
    assert torch.equal(regroup_kv(k, 6, 2, 3, 1), torch.tensor([[10.0, 1.0], [15.0, 1.5], [20.0, 2.0]]))
    assert torch.equal(regroup_kv(k, 6, 2, 1, 1), torch.tensor([[15.0, 1.5]]))
    assert torch.equal(regroup_kv(k, 6, 2, 6, 1), k.repeat_interleave(3, dim=0))
    assert torch.equal(regroup_kv(k[:, 0], 6, 2, 3, 1), torch.tensor([10.0, 15.0, 20.0]))  # a bias


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """6 query heads over 2 KV heads, head_dim 8, with q/k/v/o biases."""
    out = tmp_path_factory.mktemp("tiny_gqa")
    make_checkpoint(out, num_heads=6, num_kv_heads=2, hidden=48, attention_bias=True)
    return out


def test_mean_pooling_matches_a_hand_computation(tiny, tmp_path):
    convert_kv_heads(tiny, 3, tmp_path)
    d = 8
    for name in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"):
        old, new = k_weight(tiny, 1, name), k_weight(tmp_path, 1, name)
        head0, head1 = old[:d], old[d:]
        # new KV head j pools query heads 2j, 2j+1, which read old heads (2j)//3, (2j+1)//3
        assert torch.allclose(new[:d], head0) and torch.allclose(new[2 * d :], head1)
        assert torch.allclose(new[d : 2 * d], (head0 + head1) / 2)
    for name in ("q_proj.weight", "o_proj.weight", "q_proj.bias"):
        assert torch.equal(k_weight(tiny, 0, name), k_weight(tmp_path, 0, name))
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 3
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    # back to the original count: groups of identical heads come back bit for bit
    convert_kv_heads(tiny, 2, tmp_path / "same")
    assert torch.equal(k_weight(tiny), k_weight(tmp_path / "same"))


def test_tiny_mha_expansion_is_exact(tiny, tmp_path):
    convert_kv_heads(tiny, 6, tmp_path)
    original, mha = LLM(tiny), LLM(tmp_path)
    assert mha.config.num_key_value_heads == 6
    ids = list(b"The quick brown fox")
    assert torch.allclose(original.logits(ids), mha.logits(ids), atol=1e-5, rtol=0)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [list(b"hello"), list(b"paged attention"), [256, 40, 41]]
    expected = [o.token_ids for o in original.generate(prompts, params)]
    assert [o.token_ids for o in mha.generate(prompts, params)] == expected


def test_agreement_metrics():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (0.5, 0.75)
    assert agreement([[1, 2], [5, 6]], [[1, 2], [0, 6]]) == (0.5, 0.75)


# ---- CLI -------------------------------------------------------------------------------------------------------


def run_sub(capsys, *argv) -> str:
    parser = argparse.ArgumentParser(prog="kvmini")
    kv_cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_kv_heads_and_synthetic_sizing(tiny, tmp_path, capsys):
    out = run_sub(capsys, "kv-heads", tiny, "--kv-heads", 1, "--out", tmp_path)
    assert "MQA-1" in out and ModelConfig.from_dir(tmp_path).num_key_value_heads == 1
    out = run_sub(capsys, "kv-memory", "--layers", 2, "--heads", 4, "--kv-heads", 2, "--head-dim", 8,
                  "--context", 100, "--budget", "1M", "--dtype", "bfloat16")
    lines = [line.split() for line in out.splitlines()]
    rows = {cells[0]: cells for cells in lines if cells and cells[0] in ("MQA-1", "GQA-2*", "MHA-4")}
    assert set(rows) == {"MQA-1", "GQA-2*", "MHA-4"} and all(r[-1] == "yes" for r in rows.values())
    assert rows["GQA-2*"][1] == "128"  # 2 (K, V) * 2 layers * 2 heads * 8 dims * 2 bytes
    # 1 MiB / (16 * 128 B) = 512 blocks; 100 tokens = 7 blocks -> 73 sequences
    assert rows["GQA-2*"][-3:-1] == ["73", "73"]


def test_cli_model_dir_and_errors(tiny, capsys):
    out = run_sub(capsys, "kv-memory", tiny, "--context", 33, "--budget", "65536", "--only")
    assert "GQA-2*" in out and "MHA" not in out
    with pytest.raises(ValueError, match="divide"):
        run_sub(capsys, "kv-memory", tiny, "--kv-heads", 4)
    with pytest.raises(ValueError, match="all of"):
        run_sub(capsys, "kv-memory", "--layers", 2)
    assert kv_cli.parse_size("512M") == 512 * 2**20 and kv_cli.parse_size("1.5GiB") == 3 * 2**29
    assert kv_cli.parse_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        kv_cli.parse_size("lots")


def test_main_cli_wires_the_subcommands(tiny, capsys):
    from engine.cli import main

    code = main(["kv-memory", str(tiny), "--only", "--context", "16", "--budget", "65536"])
    assert code == 0 and "GQA-2*" in capsys.readouterr().out
    assert main(["kv-heads", str(tiny), "--kv-heads", "4", "--out", str(tiny.parent / "bad")]) == 2
    assert "divide" in capsys.readouterr().err


# ---- the real model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_variants(smollm2_dir, tmp_path_factory):
    """MHA-9 and MQA-1 copies of SmolLM2 (about 0.5 GB each; removed after the module)."""
    root = tmp_path_factory.mktemp("smollm2_variants")
    dirs = {kv: convert_kv_heads(smollm2_dir, kv, root / f"kv{kv}") for kv in (9, 1)}
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.real
def test_smollm2_mha_is_token_identical(smollm2_llm, smollm2_variants):
    mha = LLM(smollm2_variants[9], num_blocks=64)
    assert (mha.config.num_attention_heads, mha.config.num_key_value_heads) == (9, 9)
    tok = smollm2_llm.tokenizer
    ids = tok.encode("The paged KV cache stores keys and values in fixed-size blocks.")
    assert (smollm2_llm.logits(ids) - mha.logits(ids)).abs().max().item() < 1e-4
    prompts = [smollm2_llm.chat_prompt([{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Name three colours.", "Why is the sky blue?")]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ours = [o.token_ids for o in smollm2_llm.generate(prompts, params)]
    assert [o.token_ids for o in mha.generate(prompts, params)] == ours


@pytest.mark.real
def test_smollm2_mqa_loads_generates_and_has_a_perplexity(smollm2_variants, smollm2_llm, record_property):
    from pydoc_data.topics import topics  # the text bench.common.english_text() uses

    mqa = LLM(smollm2_variants[1], num_blocks=64)
    assert mqa.config.num_key_value_heads == 1
    assert mqa.kv_cache.bytes_per_token * 3 == smollm2_llm.kv_cache.bytes_per_token
    out = mqa.generate("Hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    text = mqa.tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))[:257]
    ppl = perplexity(mqa, text, window=257)
    record_property("mqa_perplexity", ppl.value)  # reported, not judged: mean-pooling without uptraining
    print(f"SmolLM2 MQA-1 perplexity over {ppl.tokens_scored} tokens: {ppl.value:.1f}")
    assert math.isfinite(ppl.value) and ppl.tokens_scored == 256
