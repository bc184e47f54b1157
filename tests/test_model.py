"""The model's logits against transformers (the oracle): tiny random checkpoints of every supported shape, the
half-precision dtypes, and the real SmolLM2 (loaded by transformers straight from its GGUF file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import make_checkpoint
from engine import LLM
from engine.core.errors import CheckpointError

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 7, 40, 130)  # 130 > 32 = original_max_position_embeddings of the llama3 case; > 8 blocks of 16
TINY_ATOL = 1e-4
REAL_ATOL = 1e-3

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
LINEAR_SCALING = {"rope_type": "linear", "factor": 4.0}

CASES = {
    "mha": dict(num_kv_heads=4, num_heads=4),
    "gqa": dict(num_kv_heads=2, num_heads=4),
    "mqa": dict(num_kv_heads=1, num_heads=4),
    "gqa-tied": dict(num_kv_heads=2, num_heads=4, tie=True),
    "mqa-tied": dict(num_kv_heads=1, num_heads=4, tie=True),
    "head-dim-24": dict(num_kv_heads=2, num_heads=4, hidden=64, head_dim=24),
    "rope-llama3": dict(num_kv_heads=2, num_heads=4, rope_scaling=LLAMA3_SCALING),
    "rope-linear": dict(num_kv_heads=2, num_heads=4, rope_scaling=LINEAR_SCALING),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2, num_heads=4),
    "qwen2-bias-tied-mqa": dict(arch="qwen2", num_kv_heads=1, num_heads=4, tie=True),
}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls are dominated by thread hand-off on small CPU boxes (x100 slower on 2 cores): use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_constant_params(model: torch.nn.Module, seed: int = 1) -> None:
    """HF initialises norms to 1 and biases to 0, which would hide a norm or bias we forgot to load."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.3)


def build_tiny(out: Path, **kwargs) -> torch.nn.Module:
    """make_checkpoint, then randomise norms/biases and save again; returns the HF model (the oracle)."""
    model = make_checkpoint(out, **kwargs)
    randomize_constant_params(model)
    model.save_pretrained(out)
    return model.eval()


def token_sequences(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def small_llm(model_dir: Path, dtype: str = "float32") -> LLM:
    return LLM(model_dir, dtype=dtype, num_blocks=16)  # logits() never touches the cache: keep it tiny


# --------------------------------------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def tiny_case(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    model = build_tiny(out, **CASES[request.param])
    return request.param, out, model


def test_tiny_logits_match_hf(tiny_case) -> None:
    _, model_dir, hf = tiny_case
    llm = small_llm(model_dir)
    assert llm.config.vocab_size == hf.config.vocab_size
    for ids in token_sequences(hf.config.vocab_size):
        ours = llm.logits(ids)
        assert ours.dtype == torch.float32 and ours.shape == (len(ids), hf.config.vocab_size)
        diff = max_abs_diff(ours, hf_logits(hf, ids))
        assert diff < TINY_ATOL, f"length {len(ids)}: max |ours - hf| = {diff:.3g}"


def test_tiny_configs_are_what_the_cases_claim(tiny_case) -> None:
    """Guards the parametrisation itself: each case really exercises the feature it is named after."""
    name, model_dir, hf = tiny_case
    c = small_llm(model_dir).config
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, CASES[name]["num_kv_heads"])
    assert c.head_dim == hf.model.layers[0].self_attn.head_dim
    assert c.tie_word_embeddings == CASES[name].get("tie", False) == hf.config.tie_word_embeddings
    if "llama3" in name:
        assert c.rope_scaling.rope_type == "llama3" and c.rope_scaling.original_max_position_embeddings == 32
        assert max(LENGTHS) > 32
    if "linear" in name:
        assert c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 4.0
    if "qwen2" in name:
        assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias
    if "head-dim" in name:
        assert c.head_dim == 24 and c.head_dim * c.num_attention_heads != c.hidden_size


def test_rope_scaling_changes_logits(tmp_path) -> None:
    """The scaled cases would pass vacuously if scaling were a no-op at these lengths: it is not."""
    ids = token_sequences(259, lengths=(130,))[0]
    plain = small_llm(_tiny(tmp_path / "plain")).logits(ids)
    scaled = small_llm(_tiny(tmp_path / "llama3", rope_scaling=LLAMA3_SCALING)).logits(ids)
    assert max_abs_diff(plain[40:], scaled[40:]) > 1e-2


def _tiny(out: Path, **kwargs) -> Path:
    build_tiny(out, num_kv_heads=2, num_heads=4, **kwargs)
    return out


def test_llama_attention_bias_matches_hf(tmp_path) -> None:
    """Llama with attention_bias=True carries q/k/v *and* o_proj biases (unlike Qwen2, which has no o_proj bias)."""
    hf = build_tiny(tmp_path, num_kv_heads=2, num_heads=4, attention_bias=True)
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    llm = small_llm(tmp_path)
    for ids in token_sequences(hf.config.vocab_size, lengths=(7, 40)):
        diff = max_abs_diff(llm.logits(ids), hf_logits(hf, ids))
        assert diff < TINY_ATOL, f"length {len(ids)}: max |ours - hf| = {diff:.3g}"


def test_llama_mlp_bias_is_supported_or_refused(tmp_path) -> None:
    """A Llama config with mlp_bias=True must either match HF or be refused; silently dropping the biases is wrong."""
    from transformers import LlamaConfig, LlamaForCausalLM

    make_checkpoint(tmp_path)  # tokenizer + config to start from
    cfg = LlamaConfig.from_pretrained(tmp_path)
    cfg.mlp_bias = True
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    randomize_constant_params(hf)
    hf.save_pretrained(tmp_path)
    try:
        llm = small_llm(tmp_path)
    except CheckpointError as e:
        assert "bias" in str(e)
        return
    ids = token_sequences(hf.config.vocab_size, lengths=(7,))[0]
    diff = max_abs_diff(llm.logits(ids), hf_logits(hf, ids))
    assert diff < TINY_ATOL, f"mlp biases were ignored: max |ours - hf| = {diff:.3g}"


# --------------------------------------------------------------------------------------------- dtypes

# bf16 keeps 8 mantissa bits (~4e-3 relative), fp16 11 (~5e-4). Logits here span about +-9 and the rounding
# compounds through two layers: measured drift is ~0.3 (bf16) and ~0.06 (fp16) max abs, the same as HF's own
# half-precision model shows. Tolerance: max |half - float32| below 0.6 (bf16) / 0.15 (fp16) and no worse than
# 1.5x HF's drift in the same dtype (+0.02); greedy argmax must agree on at least 90% of positions.
HALF_TOLERANCE = {"bfloat16": 0.6, "float16": 0.15}


@pytest.fixture(scope="module")
def gqa_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa-dtypes")
    return out, build_tiny(out, num_kv_heads=2, num_heads=4)


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE))
def test_half_dtypes_close_to_float32(gqa_case, dtype: str) -> None:
    model_dir, hf = gqa_case
    torch_dtype = getattr(torch, dtype)
    hf_half = type(hf)(hf.config).to(torch_dtype).eval()
    hf_half.load_state_dict(hf.state_dict())
    reference = small_llm(model_dir, "float32")
    llm = small_llm(model_dir, dtype)
    assert llm.model.embed_tokens.weight.dtype == torch_dtype
    assert llm.model.layers[0].qkv_proj.weight.dtype == torch_dtype
    assert llm.kv_cache.k[0].dtype == llm.kv_cache.v[0].dtype == torch_dtype
    for ids in token_sequences(llm.config.vocab_size, lengths=(7, 130), seed=3):
        want, got = reference.logits(ids), llm.logits(ids)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        diff = max_abs_diff(got, want)
        hf_diff = max_abs_diff(hf_logits(hf_half, ids), want)
        assert 0 < diff < HALF_TOLERANCE[dtype], f"{dtype}, length {len(ids)}: max diff {diff:.3g}"
        assert diff <= 1.5 * hf_diff + 0.02, f"{dtype}: ours drifts {diff:.3g} from float32, HF only {hf_diff:.3g}"
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.9, f"{dtype}: argmax agrees on only {agree:.0%} of positions"


# --------------------------------------------------------------------------------------------- SmolLM2

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nThe complexity of this function is exponential because "
    "each call spawns two more calls, so the total number of calls grows like the Fibonacci sequence itself.",
]


@pytest.fixture(scope="module")
def gguf_reference_model(smollm2_gguf: Path):
    """transformers dequantising the GGUF itself: independent of our converter."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def gguf_reference_tokenizer(smollm2_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.real
def test_smollm2_logits_match_gguf_reference(smollm2_llm, gguf_reference_model, gguf_reference_tokenizer) -> None:
    lengths = []
    for prompt in PROMPTS:
        ids = smollm2_llm.tokenizer.encode(prompt)
        assert ids == gguf_reference_tokenizer(prompt).input_ids
        lengths.append(len(ids))
        ours, theirs = smollm2_llm.logits(ids), hf_logits(gguf_reference_model, ids)
        diff = max_abs_diff(ours, theirs)
        assert diff < REAL_ATOL, f"{prompt[:20]!r} ({len(ids)} tokens): max |ours - hf| = {diff:.3g}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert lengths[0] <= 2 and lengths[-1] > 60, lengths


@pytest.mark.real
def test_smollm2_conversion_agrees_with_hf_gguf_loading(smollm2_hf, gguf_reference_model, smollm2_llm) -> None:
    """HF on our converted directory and HF on the GGUF compute the same logits, so our conversion is faithful."""
    ids = smollm2_llm.tokenizer.encode(PROMPTS[2])
    diff = max_abs_diff(hf_logits(smollm2_hf, ids), hf_logits(gguf_reference_model, ids))
    assert diff < REAL_ATOL, f"converted-dir HF vs GGUF HF: max diff {diff:.3g}"


# A mix the byte-level BPE must get exactly right: contractions, digits, code, CJK, emoji, odd whitespace.
TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 9:45pm; we'll leave at 10.",
    "import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return x @ x.T  # matmul\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "机器学习是人工智能的一个分支。東京は日本の首都です。서울은 한국의 수도입니다.",
    "Party time 🎉🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin tone 👋🏿 ✨",
    "spaces:    four, then        eight, trailing      ",
    "\n\n\nthree newlines, then two\n\n, then CRLF\r\n and a lone \r",
    "\ttab\t\ttwo tabs\n\t\t\tindent three",
    " \t \n mixed \u00a0non-breaking\u2003em-space",
    "<|im_start|>assistant\nspecial tokens inline<|im_end|><|endoftext|>",
    "1234567890 3.14159 1e-10 0x1F 2,147,483,647",
    "Ünïcödé àccénts, ß, Ø, ł, ñ — and “smart quotes” … ellipsis",
    "",
]

MESSAGES_WITH_SYSTEM = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? 🤔"},
]
MESSAGES_NO_SYSTEM = [{"role": "user", "content": "Write a haiku about\ttabs\n\nand  spaces."}]


@pytest.mark.real
def test_smollm2_tokenizer_ids_match_gguf_reference(smollm2_llm, gguf_reference_tokenizer) -> None:
    """Our engine tokenizer (not just tokenizer.json) against the tokenizer transformers builds from the GGUF."""
    ours, ref = smollm2_llm.tokenizer, gguf_reference_tokenizer
    for text in TOKENIZER_CORPUS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids), text
    assert ours.encode("\n".join(TOKENIZER_CORPUS)) == ref("\n".join(TOKENIZER_CORPUS)).input_ids


@pytest.mark.real
@pytest.mark.parametrize("messages", [MESSAGES_WITH_SYSTEM, MESSAGES_NO_SYSTEM], ids=["system", "no-system"])
def test_smollm2_chat_template_matches_gguf_reference(smollm2_llm, gguf_reference_tokenizer, messages) -> None:
    ref = gguf_reference_tokenizer
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    got = smollm2_llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n")
    want_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert smollm2_llm.chat_prompt(messages) == list(want_ids)
