"""oneDNN-packed linear layers: same numbers as F.linear, used by default on CPU, and optional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import make_checkpoint
from engine import LLM, SamplingParams
from engine.model.packed_linear import PackedLinear, can_pack

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not can_pack(CPU, torch.float32), reason="this PyTorch build has no oneDNN packing")


BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not can_pack(CPU, torch.bfloat16), reason="oneDNN packs bfloat16 only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; "
                                               "this CPU has neither, so no bfloat16 layer is packed here and there is "
                                               "nothing to compare (test_bfloat16_packing_follows_the_cpu checks the "
                                               "refusal; the float32 cases still run)"))


def test_bfloat16_packing_follows_the_cpu():
    """An AVX2-only CPU (AMD Zen 3) refuses to pack bfloat16: the model then keeps dense layers, never fails."""
    if can_pack(CPU, torch.bfloat16):
        PackedLinear(torch.randn(32, 32, dtype=torch.bfloat16))
    else:
        with pytest.raises(RuntimeError, match="bf16"):
            PackedLinear(torch.randn(32, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_equals_f_linear(dtype, bias, rows):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(200, generator=g))
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    want, got = F.linear(x, linear.weight, linear.bias), packed(x)
    assert got.dtype == dtype and got.shape == (rows, 200)
    # bfloat16 accumulates in float32 either way; float32 may sum in another order.
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert torch.equal(packed.weight, linear.weight)  # the dense view round-trips exactly


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "gqa-tied"
    make_checkpoint(out, num_kv_heads=2, layers=2, hidden=64, tie=True)
    return out


def test_llm_packs_on_cpu_by_default_and_can_opt_out(tiny_dir):
    packed, plain = LLM(tiny_dir), LLM(tiny_dir, pack_weights=False)
    assert isinstance(packed.model.layers[0].qkv_proj, PackedLinear)
    assert isinstance(packed.model.lm_head, PackedLinear)  # a tied head gets its own packed copy
    assert torch.equal(packed.model.lm_head.weight, packed.model.embed_tokens.weight)
    assert isinstance(plain.model.layers[0].qkv_proj, nn.Linear) and plain.model.lm_head is None
    assert isinstance(LLM(tiny_dir, dtype="float16").model.layers[0].down_proj, nn.Linear)  # not packable
    ids = list(range(3, 40))
    assert (packed.logits(ids) - plain.logits(ids)).abs().max().item() < 1e-5
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert packed.generate(ids, params)[0].token_ids == plain.generate(ids, params)[0].token_ids
