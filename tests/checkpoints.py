"""Tiny random HF checkpoints built in the test (with `transformers`), plus a byte-level tokenizer."""

from __future__ import annotations

import math

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_byte_tokenizer(out: Path) -> int:
    """A byte-level BPE with the 256 byte symbols and no merges; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def make_checkpoint(
    out: Path,
    arch: str = "llama",
    num_kv_heads: int = 2,
    num_heads: int = 4,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    head_dim: int | None = None,
    rope_scaling: dict | None = None,
    attention_bias: bool = False,
    seed: int = 0,
    init_std: float = 0.2,
    max_position_embeddings: int = 512,
):
    """Save a random LlamaForCausalLM / Qwen2ForCausalLM with a byte tokenizer; returns the HF model.

    `init_std` is larger than HF's default so logits are far from uniform and greedy choices are clear.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(out)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        bos_token_id=256,
        eos_token_id=258,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        cfg = LlamaConfig(**common, head_dim=head_dim, rope_scaling=rope_scaling, attention_bias=attention_bias)
        model = LlamaForCausalLM(cfg)
    model.eval()
    model.save_pretrained(out)
    return model


def marked_embeddings(cfg, head_dim: int, bos: int, bos_constant: bool = True, seed: int = 0):
    """For checkpoints whose heads are set by hand: every embedding is [1, is_bos, unit random vector] (the
    same norm for every token, so after RMSNorm dim 0 is one constant everywhere and dim 1 marks BOS);
    BOS is [1, 1, 0...], or [0, 1, 0...] without `bos_constant` (then nothing reads BOS's dim 0).

    Returns the `[vocab, hidden]` embeddings, the RoPE frequencies of the `head_dim // 2` rotary pairs,
    and `unit`: what dims 0 and 1 become after RMSNorm (weight 1) of such a norm-sqrt(2) embedding."""
    hidden, half = cfg.hidden_size, head_dim // 2
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    g = torch.Generator().manual_seed(seed)
    emb = torch.zeros(cfg.vocab_size, hidden)
    emb[:, 0] = 1.0
    rand = torch.randn(cfg.vocab_size, hidden - 2, generator=g)
    emb[:, 2:] = rand / rand.norm(dim=1, keepdim=True)
    emb[bos, 0 if not bos_constant else 1 :] = 0.0
    emb[bos, 1] = 1.0
    return emb, freqs, math.sqrt(hidden / 2)
