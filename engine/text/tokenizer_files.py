"""The tokenizer files of an HF-format model directory: tokenizer_config.json (named and added tokens,
BOS/EOS flags, chat templates, also from chat_template.jinja / .json) and generation_config.json's EOS and BOS
ids, read and checked (a malformed file is a CheckpointError naming it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.errors import CheckpointError

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedTokenSpec:
    """One entry of `added_tokens_decoder`: a string matched literally in text before subword encoding."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """The parts of `tokenizer_config.json` (and `chat_template.jinja`) that change tokenization."""

    tokenizer_class: str | None = None
    named: dict[str, str] = field(default_factory=dict)  # e.g. {"bos_token": "<s>"}, only those given
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_prefix_space: bool | None = None
    legacy: bool | None = None
    added_tokens: tuple[AddedTokenSpec, ...] = ()
    chat_templates: dict[str, str] = field(default_factory=dict)  # name -> template; the plain one is "default"

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TokenizerConfig":
        path = model_dir / "tokenizer_config.json"
        raw = _read_json(path) if path.is_file() else {}
        named = {name: s for name in NAMED_TOKENS if (s := _token_content(raw.get(name), path, name))}
        klass = raw.get("tokenizer_class")
        return cls(
            tokenizer_class=klass.removesuffix("Fast") if isinstance(klass, str) else None,
            named=named,
            add_bos_token=raw.get("add_bos_token"),
            add_eos_token=raw.get("add_eos_token"),
            add_prefix_space=raw.get("add_prefix_space"),
            legacy=raw.get("legacy"),
            added_tokens=_added_tokens(raw.get("added_tokens_decoder") or {}, path),
            chat_templates=_chat_templates(model_dir, raw.get("chat_template"), path),
        )

    def named_tokens(self, class_defaults: dict[str, str]) -> dict[str, str]:
        """Named special tokens after HF's per-class defaults (config values win)."""
        return {**class_defaults, **self.named}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"{path.name} must hold a JSON object")
    return raw


def _token_content(value: Any, path: Path, name: str) -> str | None:
    # Special tokens are stored either as plain strings or as serialized AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(path, f"'{name}' must be a string or an object with 'content'")


def _added_tokens(raw: dict[str, Any], path: Path) -> tuple[AddedTokenSpec, ...]:
    specs = []
    for key, tok in raw.items():
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not str(key).isdigit():
            raise CheckpointError(path, f"malformed added_tokens_decoder entry {key!r}")
        specs.append(
            AddedTokenSpec(
                id=int(key),
                content=tok["content"],
                special=bool(tok.get("special", True)),
                lstrip=bool(tok.get("lstrip", False)),
                rstrip=bool(tok.get("rstrip", False)),
            )
        )
    return tuple(sorted(specs, key=lambda s: s.id))


def _chat_templates(model_dir: Path, raw: Any, path: Path) -> dict[str, str]:
    # Like HF, a standalone chat_template.jinja takes priority over the copy in tokenizer_config.json.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in raw):
        return {t.get("name", "default"): t["template"] for t in raw}  # [{"name": ..., "template": ...}, ...]
    raise CheckpointError(path, "'chat_template' must be a string or a list of {name, template}")


def generation_eos_ids(model_dir: Path) -> list[int]:
    """EOS ids from generation_config.json then config.json (each an int, a list, or absent)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = _read_json(path).get("eos_token_id")
            ids += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    return ids


def generation_bos_id(model_dir: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file() and isinstance(value := _read_json(path).get("bos_token_id"), int):
            return value
    return None
