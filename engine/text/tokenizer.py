"""Tokenizer for HF-format model directories, matching what transformers 5.23's AutoTokenizer produces.

Two backends behind one `Tokenizer`:
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
from typing import Any, Protocol

from engine.core.errors import CheckpointError

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Named special tokens HF's tokenizer classes fall back to when tokenizer_config.json names none.
_LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_CLASS_DEFAULTS = {
    "LlamaTokenizer": _LLAMA_DEFAULTS,
    "GPT2Tokenizer": {name: "<|endoftext|>" for name in ("bos_token", "eos_token", "unk_token")},
}
# transformers 5.23's LlamaTokenizer reads `add_bos_token` with a default of False (the v4 slow tokenizer
# defaulted to True): a tokenizer.model directory whose config omits the key gets no BOS from HF.
_SPM_DEFAULT_ADD_BOS = False
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # sentencepiece's visible space, "▁"


# --------------------------------------------------------------------------------------------- config files


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


def _generation_eos_ids(model_dir: Path) -> list[int]:
    """EOS ids from generation_config.json then config.json (each an int, a list, or absent)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = _read_json(path).get("eos_token_id")
            ids += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    return ids


def _generation_bos_id(model_dir: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file() and isinstance(value := _read_json(path).get("bos_token_id"), int):
            return value
    return None


# --------------------------------------------------------------------------------------------- backends


class _Backend(Protocol):
    vocab_size: int
    special_ids: frozenset[int]  # ids that decode(skip_special_tokens=True) drops
    byte_ids: frozenset[int]  # <0xNN> tokens a ByteFallback decoder merges with their neighbours

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def id_to_token(self, i: int) -> str | None: ...
    def token_to_id(self, s: str) -> int | None: ...


@dataclass(eq=False)
class _TokenizersBackend:
    """`tokenizer.json` through the HF `tokenizers` library; its post_processor decides BOS/EOS, as in HF."""

    tok: Any  # tokenizers.Tokenizer
    special_ids: frozenset[int] = frozenset()
    byte_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, path: Path, cfg: TokenizerConfig) -> tuple["_TokenizersBackend", dict[str, str]]:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            text = path.read_text(encoding="utf-8")
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(path, f"cannot load tokenizer.json: {e}") from None
        # HF turns off any truncation/padding baked into tokenizer.json for a plain encode() call.
        tok.no_truncation()
        tok.no_padding()
        klass = cfg.tokenizer_class
        if klass == "LlamaTokenizer" and '"ByteLevel"' in text:
            klass = "TokenizersBackend"  # HF's AutoTokenizer loads Llama-3-style byte-level files generically
        if klass == "LlamaTokenizer":
            _apply_llama_pipeline(tok, cfg)
        named = cfg.named_tokens(_CLASS_DEFAULTS.get(klass or "", {}))
        _add_missing_tokens(tok, cfg.added_tokens, named.values())
        special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        return cls(tok, special, _byte_fallback_ids(tok)), named

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)


def _apply_llama_pipeline(tok: Any, cfg: TokenizerConfig) -> None:
    """Rebuild the text pipeline the way transformers 5.23's LlamaTokenizer does.

    For a non-byte-level tokenizer.json declared as LlamaTokenizer, HF keeps only vocab, merges, added tokens
    and post_processor from the file and replaces normalizer, pre_tokenizer and decoder with its own, so an old
    file's `Prepend("▁")` normalizer is dropped in favour of `Metaspace(prepend_scheme=...)`.
    """
    from tokenizers import decoders, pre_tokenizers

    scheme = _prepend_scheme(cfg)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)


def _prepend_scheme(cfg: TokenizerConfig) -> str:
    # HF: add_prefix_space defaults to True; legacy=True prepends "▁" after every added token, not just once.
    if cfg.add_prefix_space is False:
        return "never"
    return "always" if cfg.legacy else "first"


def _add_missing_tokens(tok: Any, specs: Iterable[AddedTokenSpec], named: Iterable[str]) -> None:
    """Register config-declared added tokens and named special tokens the file lacks, as HF's init does."""
    from tokenizers import AddedToken

    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    extra = [
        AddedToken(s.content, lstrip=s.lstrip, rstrip=s.rstrip, normalized=False, special=s.special)
        for s in specs
        if s.content not in present
    ]
    if extra:
        tok.add_tokens(extra)
    present |= {t.content for t in extra}
    missing = [AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(named) if s not in present]
    if missing:
        tok.add_special_tokens(missing)


def _byte_fallback_ids(tok: Any) -> frozenset[int]:
    if tok.decoder is None or "ByteFallback" not in repr(tok.decoder):
        return frozenset()
    return frozenset(i for s, i in tok.get_vocab(with_added_tokens=False).items() if _BYTE_PIECE.fullmatch(s))


@dataclass(eq=False)
class _SentencePieceBackend:
    """`tokenizer.model` through sentencepiece, made to tokenize exactly like transformers 5.23's LlamaTokenizer.

    HF converts the model to a `tokenizers` BPE with no normalizer, so we strip sentencepiece's own normalization
    (dummy prefix, whitespace collapsing, NFKC charsmap) and re-apply HF's rules: added tokens are cut out of the
    text first, then "▁" is prepended per the Metaspace scheme ("first": only to text starting the input and not
    already starting with a space).
    """

    sp: Any  # sentencepiece.SentencePieceProcessor
    pieces: list[str]  # id -> token string, added tokens included
    added: dict[str, AddedTokenSpec]
    split_re: re.Pattern[str] | None
    scheme: str
    bos_id: int | None
    eos_id: int | None
    special_ids: frozenset[int]
    byte_ids: frozenset[int]

    @classmethod
    def load(cls, path: Path, cfg: TokenizerConfig) -> tuple["_SentencePieceBackend", dict[str, str]]:
        sp, kinds = _load_sentencepiece(path)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        named = cfg.named_tokens({k: v for k, v in _LLAMA_DEFAULTS.items() if v in pieces})
        added = _spm_added_tokens(pieces, kinds, cfg.added_tokens, named.values())
        for spec in sorted(added.values(), key=lambda s: s.id):
            if spec.id >= len(pieces):
                pieces += [""] * (spec.id - len(pieces) + 1)
            pieces[spec.id] = spec.content
        ids = {s: i for i, s in enumerate(pieces)}
        add_bos = cfg.add_bos_token if cfg.add_bos_token is not None else _SPM_DEFAULT_ADD_BOS
        return cls(
            sp=sp,
            pieces=pieces,
            added=added,
            split_re=_split_pattern(added.values()),
            scheme=_prepend_scheme(cfg),
            bos_id=ids.get(named.get("bos_token", "")) if add_bos else None,
            eos_id=ids.get(named.get("eos_token", "")) if cfg.add_eos_token else None,
            special_ids=frozenset(s.id for s in added.values() if s.special),
            byte_ids=frozenset(i for i, k in enumerate(kinds) if k == _BYTE),
        ), named

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [] if self.bos_id is None or not add_special_tokens else [self.bos_id]
        for start, chunk, spec in _split_added(text, self.split_re, self.added):
            ids += [spec.id] if spec else self._encode_text(chunk, at_start=start == 0)
        if self.eos_id is not None and add_special_tokens:
            ids.append(self.eos_id)
        return ids

    def _encode_text(self, chunk: str, at_start: bool) -> list[int]:
        # Metaspace's rule: prepend "▁" unless the chunk already starts with one (a space becomes "▁").
        prepend = self.scheme == "always" or (self.scheme == "first" and at_start)
        if prepend and not chunk.startswith((" ", _SPACE)):
            chunk = " " + chunk
        return self.sp.encode(chunk)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        n, skip = len(self.pieces), self.special_ids if skip_special_tokens else frozenset()
        # Unknown ids are dropped silently, as the tokenizers library does.
        tokens = [self.pieces[i] for i in ids if 0 <= i < n and i not in skip and self.pieces[i]]
        text = _byte_fallback_join([t.replace(_SPACE, " ") for t in tokens])
        # HF's decoder strips the one space the prepend scheme added to the front of the text.
        return text[1:] if self.scheme != "never" and text.startswith(" ") else text

    def id_to_token(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) and self.pieces[i] else None

    def token_to_id(self, s: str) -> int | None:
        if s in self.added:
            return self.added[s].id
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.pieces[i] else i


# sentencepiece piece types (sentencepiece_model.proto): NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, BYTE=6
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6


def _load_sentencepiece(path: Path) -> tuple[Any, list[int]]:
    """Load the model with sentencepiece's normalizer turned off (HF's LlamaTokenizer has none)."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # needs protobuf, as HF's conversion does

    try:
        proto = model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        if not proto.pieces:
            raise ValueError("no pieces")
        spec = proto.normalizer_spec
        spec.name, spec.precompiled_charsmap = "identity", b""
        spec.add_dummy_prefix, spec.remove_extra_whitespaces = False, False
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as e:  # protobuf DecodeError, sentencepiece RuntimeError, ...
        raise CheckpointError(path, f"cannot load sentencepiece model: {e}") from None
    return sp, [p.type for p in proto.pieces]


def _spm_added_tokens(
    pieces: list[str], kinds: list[int], specs: Iterable[AddedTokenSpec], named: Iterable[str]
) -> dict[str, AddedTokenSpec]:
    """Strings HF matches literally: control/user-defined pieces, <unk>, config added tokens, named tokens."""
    added = {
        p: AddedTokenSpec(i, p, special=k != _USER_DEFINED)
        for i, (p, k) in enumerate(zip(pieces, kinds))
        if k in (_UNKNOWN, _CONTROL, _USER_DEFINED)
    }
    added |= {s.content: s for s in specs}
    index = {p: i for i, p in enumerate(pieces)}
    next_id = max([len(pieces) - 1, *(s.id for s in added.values())]) + 1
    for content in named:
        if content not in added:
            if content not in index:  # HF appends a named token missing from the vocab
                index[content], next_id = next_id, next_id + 1
            added[content] = AddedTokenSpec(index[content], content, special=True)
    return added


def _split_pattern(specs: Iterable[AddedTokenSpec]) -> re.Pattern[str] | None:
    # Longest first so the alternation picks the longest token at the leftmost match, as HF's matcher does.
    alts = []
    for s in sorted(specs, key=lambda s: -len(s.content)):
        if s.content:
            alts.append(("\\s*" if s.lstrip else "") + f"({re.escape(s.content)})" + ("\\s*" if s.rstrip else ""))
    return re.compile("|".join(alts)) if alts else None


def _split_added(
    text: str, pattern: re.Pattern[str] | None, added: dict[str, AddedTokenSpec]
) -> list[tuple[int, str, AddedTokenSpec | None]]:
    """Cut text into (start offset, chunk, added token or None) pieces, dropping empty chunks."""
    out: list[tuple[int, str, AddedTokenSpec | None]] = []
    pos = 0
    for m in pattern.finditer(text) if pattern else ():
        if m.start() > pos:
            out.append((pos, text[pos : m.start()], None))
        content = next(g for g in m.groups() if g is not None)
        out.append((m.start(), content, added[content]))
        pos = m.end()
    if pos < len(text):
        out.append((pos, text[pos:], None))
    return out


def _byte_fallback_join(tokens: list[str]) -> str:
    """tokenizers' ByteFallback + Fuse: a run of <0xNN> tokens is UTF-8, or one U+FFFD per byte if invalid."""
    out: list[str] = []
    run = bytearray()
    for t in tokens:
        if _BYTE_PIECE.fullmatch(t):
            run.append(int(t[3:5], 16))
            continue
        if run:
            out.append(_bytes_or_replacement(run))
            run = bytearray()
        out.append(t)
    if run:
        out.append(_bytes_or_replacement(run))
    return "".join(out)


def _bytes_or_replacement(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


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

    backend: _Backend = field(repr=False)
    named_tokens: dict[str, str]  # {"bos_token": "<s>", ...}: exposed to chat templates
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    chat_templates: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        d = Path(model_dir)
        cfg = TokenizerConfig.from_dir(d)
        backend: _Backend
        if (d / "tokenizer.json").is_file():
            backend, named = _TokenizersBackend.load(d / "tokenizer.json", cfg)
        elif (d / "tokenizer.model").is_file():
            backend, named = _SentencePieceBackend.load(d / "tokenizer.model", cfg)
        else:
            raise CheckpointError(d, "no tokenizer.json or tokenizer.model in the model directory")
        ids = {name: backend.token_to_id(s) for name, s in named.items()}
        eos = [ids.get("eos_token"), *_generation_eos_ids(d)]
        bos = ids.get("bos_token")
        return cls(
            backend=backend,
            named_tokens=named,
            bos_token_id=bos if bos is not None else _generation_bos_id(d),
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
