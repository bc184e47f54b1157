"""The two tokenizer backends behind `Tokenizer` (engine/text/tokenizer.py): `tokenizer.json` through the HF
`tokenizers` library, `tokenizer.model` through sentencepiece made to behave like transformers' LlamaTokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.core.errors import CheckpointError
from engine.text.tokenizer_files import AddedTokenSpec, TokenizerConfig

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


class Backend(Protocol):
    vocab_size: int
    special_ids: frozenset[int]  # ids that decode(skip_special_tokens=True) drops
    byte_ids: frozenset[int]  # <0xNN> tokens a ByteFallback decoder merges with their neighbours

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def id_to_token(self, i: int) -> str | None: ...
    def token_to_id(self, s: str) -> int | None: ...


@dataclass(eq=False)
class TokenizersBackend:
    """`tokenizer.json` through the HF `tokenizers` library; its post_processor decides BOS/EOS, as in HF."""

    tok: Any  # tokenizers.Tokenizer
    special_ids: frozenset[int] = frozenset()
    byte_ids: frozenset[int] = frozenset()

    @classmethod
    def load(cls, path: Path, cfg: TokenizerConfig) -> tuple["TokenizersBackend", dict[str, str]]:
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
class SentencePieceBackend:
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
    def load(cls, path: Path, cfg: TokenizerConfig) -> tuple["SentencePieceBackend", dict[str, str]]:
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
