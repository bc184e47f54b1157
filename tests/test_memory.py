"""Memory stays flat when the engine meets many input shapes (issue 12).

oneDNN compiles a primitive for every matmul shape it runs (the packed linear layers, the quantized layers'
dense path, bfloat16 prefill attention) and caches it, at 0.6-1.5 MB apiece: a server that met every prompt
length grew by about 1 GB. engine/model/packed_linear.py caps the caches and pads large row counts to a few sizes.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.model.packed_linear import PackedLinear, bucket_rows, can_pack, run_bucketed
from engine.model.quant import Int4Linear, Int8Linear

CPU = torch.device("cpu")


def rss_mb() -> float:
    """This process's resident set size (VmRSS) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("this test reads the process's memory from Linux's /proc/self/status, which has no VmRSS line "
                "on this system")


def test_bucket_rows_pads_little_and_to_few_sizes():
    assert [bucket_rows(n) for n in (1, 16, 17, 33, 64, 65, 100, 129, 512, 513)] == [
        1, 16, 18, 36, 64, 72, 104, 144, 512, 576]
    sizes = [bucket_rows(n) for n in range(1, 4097)]
    assert all(n <= b < n * 1.125 for n, b in zip(range(1, 4097), sizes))
    assert len(set(sizes[64:512])) == 24  # prefill chunks up to the default 512 tokens: 24 shapes


def test_onednn_caches_are_capped_at_import():
    # engine/model/packed_linear.py sets both unless the user already had; oneDNN reads them later, once.
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        assert int(os.environ[name]) >= 1


@pytest.mark.skipif(not can_pack(CPU, torch.bfloat16),
                    reason="PackedLinear, compared here with F.linear, needs oneDNN's packed bfloat16 layout, which "
                           "this PyTorch build or CPU lacks (no mkldnn, or no AVX-512)")
@pytest.mark.parametrize("rows", [65, 100, 300])
def test_padded_rows_give_the_same_result(rows):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(192, 96, generator=g), torch.randn(192, generator=g)
    x = torch.randn(rows, 96, generator=g)
    got = PackedLinear(weight, bias)(x)
    assert got.shape == (rows, 192)
    assert (got - F.linear(x, weight, bias)).abs().max().item() <= 1e-4
    assert run_bucketed(lambda t: t * 2, x.view(1, rows, 96)).shape == (1, rows, 96)
    for layer in (Int8Linear(weight, bias, torch.float32), Int4Linear(weight, bias, torch.float32)):
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-4)  # the dense path


@pytest.mark.real
@pytest.mark.slow
def test_rss_stays_flat_over_many_prompt_lengths(smollm2_dir):
    """240 prompt lengths, one generated token each: without the cap every length adds about seven
    primitives (four linear shapes, the head, two attention matmuls), and RSS grew by ~500 MB."""
    # oneDNN-packed layers (the quantized ones behave alike); float32 where this CPU cannot pack bfloat16, whose
    # dense layers are then slow (AVX2 only) and not oneDNN's packed primitives this test is about.
    llm = LLM(smollm2_dir, dtype="bfloat16" if can_pack(CPU, torch.bfloat16) else "float32")
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def run(n: int) -> None:
        llm.generate([rng.randrange(100, 40000) for _ in range(n)], params)

    for n in (1, 8, 64, 240):  # warm-up: the allocator's and oneDNN's first buffers
        run(n)
    before = rss_mb()
    lengths = list(range(1, 241))
    rng.shuffle(lengths)
    for n in lengths:
        run(n)
    growth = rss_mb() - before
    assert growth < 100, f"RSS grew by {growth:.0f} MB over {len(lengths)} prompt lengths (from {before:.0f} MB)"
