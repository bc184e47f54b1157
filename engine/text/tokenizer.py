"""Tokenizer for HF-format model directories, matching what transformers 5.23's AutoTokenizer produces.

Two backends behind one `Tokenizer` (engine/text/tokenizer_backends.py; the config files they follow are read
by engine/text/tokenizer_files.py):
  * `tokenizer.json` -> the HF `tokenizers` library (preferred when both files exist, as HF does);
  * `tokenizer.model` -> `sentencepiece`, wrapped to behave like HF's `LlamaTokenizer` (added tokens written
    literally in the text are recognised, HF's leading-space rule, BOS/EOS from `tokenizer_config.json`).

Chat templates render through a jinja2 sandbox configured like HF's, and `IncrementalDetokenizer` streams text
whose deltas always concatenate to exactly `Tokenizer.decode` of the whole sequence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.core.errors import CheckpointError
from engine.text.tokenizer_backends import Backend, SentencePieceBackend, TokenizersBackend
from engine.text.tokenizer_files import TokenizerConfig, generation_bos_id, generation_eos_ids

# --------------------------------------------------------------------------------------------- chat templates


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> Any:
    """Compile like transformers' `_compile_jinja_template`: same sandbox, options, filter and globals."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}` only marks assistant spans for HF's training masks; rendering keeps its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # jinja's own tojson HTML-escapes; HF's (and so every published template) expects plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# --------------------------------------------------------------------------------------------- public API


@dataclass(eq=False)
class Tokenizer:
    """Encode/decode/chat-template for one model directory; build with `Tokenizer.from_dir`."""

    backend: Backend = field(repr=False)
    named_tokens: dict[str, str]  # {"bos_token": "<s>", ...}: exposed to chat templates
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    chat_templates: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        cfg = TokenizerConfig.from_dir(d)
        backend: Backend
        if (d / "tokenizer.json").is_file():
            backend, named = TokenizersBackend.load(d / "tokenizer.json", cfg)
        elif (d / "tokenizer.model").is_file():
            backend, named = SentencePieceBackend.load(d / "tokenizer.model", cfg)
        else:
            raise CheckpointError(d, "no tokenizer.json or tokenizer.model in the model directory")
        ids = {name: backend.token_to_id(s) for name, s in named.items()}
        eos = [ids.get("eos_token"), *generation_eos_ids(d)]
        bos = ids.get("bos_token")
        return cls(
            backend=backend,
            named_tokens=named,
            bos_token_id=bos if bos is not None else generation_bos_id(d),
            eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
            pad_token_id=ids.get("pad_token"),
            chat_templates=cfg.chat_templates,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (HF's `len(tokenizer)`)."""
        return self.backend.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return self.backend.special_ids

    @property
    def chat_template(self) -> str | None:
        """The template used when no tools are passed (HF's "default")."""
        return self.chat_templates.get("default")

    @property
    def bos_token(self) -> str | None:
        return self.named_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.named_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        token = self.backend.id_to_token(int(i))
        if token is None:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return token

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, also when it holds only part of a UTF-8 character (where
        `decode([id])` gives U+FFFD): a `<0xNN>` byte piece, or a byte-level BPE piece (GPT-2's byte
        alphabet). What OpenAI's logprobs `bytes` field holds."""
        text = self.decode([token_id])
        if token_id in self.special_token_ids:
            return text.encode("utf-8")
        piece = self.id_to_token(token_id)
        if (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            return bytes([int(m[1], 16)])
        if "\u2581" in piece:  # sentencepiece / Metaspace: "▁" is the space that decoding one token drops
            return piece.replace("\u2581", " ").encode("utf-8")
        if "\ufffd" in text and all(c in _BYTE_LEVEL_DECODER for c in piece):
            return bytes(_BYTE_LEVEL_DECODER[c] for c in piece)
        return text.encode("utf-8")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template; `tokenize=True` encodes without BOS/EOS (as HF)."""
        # HF switches to a checkpoint's "tool_use" template when tools are given.
        use_tools = kwargs.get("tools") is not None and "tool_use" in self.chat_templates
        template = self.chat_templates.get("tool_use" if use_tools else "default")
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja); format the prompt yourself or use a chat/instruct checkpoint"
            )
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # HF drops None-valued keys (e.g. OpenAI's content=None) so templates see them as undefined.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.named_tokens, **kwargs}
        text = _compile_chat_template(template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )
        # The template already wrote BOS etc. where it wants them.
        return self.encode(text, add_special_tokens=False) if tokenize else text


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in
    (printable Latin-1 as itself, the other bytes from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_LEVEL_DECODER = {c: b for b, c in bytes_to_unicode().items()}  # byte-level piece -> its bytes


@dataclass(eq=False)
class IncrementalDetokenizer:
    """Streams text for generated ids; all `add` deltas plus `flush()` equal `tokenizer.decode(ids)` exactly.

    The prefix/read-offset scheme of vLLM: decode a window starting at `_prefix_offset` (tokens already shown,
    kept so sentencepiece's leading-space handling sees context) and emit what the new tokens appended to it.
    Text is held back while it ends in U+FFFD (an incomplete UTF-8 character) or while the last visible token is
    a <0xNN> byte piece, because tokenizers' ByteFallback decodes a whole run of bytes at once and a following
    byte could still turn already-valid text into replacement characters.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = False
    ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _prefix_text: str = ""

    def add(self, token_id: int) -> str:
        """Append one id; return the newly finished text (possibly empty)."""
        self.ids.append(int(token_id))
        if self._byte_run_open():
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back; call once generation has ended."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._decode(self._prefix_offset, len(self.ids))
        if len(text) <= len(self._prefix_text) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(self._prefix_text) :]
        # The next window starts at the tokens just shown: they end on a complete character.
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.ids[start:stop], self.skip_special_tokens)

    def _byte_run_open(self) -> bool:
        """Whether the last token that decoding keeps is a byte piece (its run of bytes may still grow)."""
        backend = self.tokenizer.backend
        if not backend.byte_ids:
            return False
        skipped = backend.special_ids if self.skip_special_tokens else frozenset()
        for i in reversed(range(self._read_offset, len(self.ids))):
            if self.ids[i] not in skipped:
                return self.ids[i] in backend.byte_ids
        return False
