"""Structured outputs: a request's tokens constrained to JSON, any object or one that matches a JSON schema.

Built on llguidance (one of vLLM's and SGLang's structured-output backends, and llama.cpp's optional one): a
JSON schema compiles in about a millisecond and a next-token mask takes about 10 µs on the CPU
(docs/PERFORMANCE.md measures it against xgrammar and outlines-core: `bench/structured.py`).

* `StructuredOutput`  what a request asks for: `SamplingParams.structured_output` (JSON, any object or one that
                      matches a schema, or a Lark grammar: tool calls, engine/text/tool_calls.py).
* `GrammarCompiler`   one per engine: llguidance's view of the tokenizer, built on first use, and the compiled
                      grammars, cached by schema (a bounded LRU; thread-safe: the server compiles in a worker
                      thread, so that a bad schema is refused before the engine thread sees the request and
                      the engine thread finds the grammar compiled).
* `GrammarMatcher`    one per constrained sequence: writes the next token's allowed-token bitmask, advances
                      with each sampled token, and `is_finished` once nothing but EOS may follow.
* `TokenMasks`        one step's bitmasks for the constrained rows of a batch, and the sampler's side: the
                      disallowed tokens' logits set to -inf.

The JSON is written as Python's `json.dumps` writes it: `", "` between items, `": "` after keys, no other
whitespace: a layout models see often, and one a small model cannot spin out into endless newlines. EOS is allowed exactly when the JSON is complete; the engine ends the request as soon as nothing
else may follow, without a step for the EOS token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.core.errors import RequestError
from engine.text.tokenizer import Tokenizer

# llguidance's JSON options: json.dumps' layout (see the module docstring).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per engine (a template matcher each: a few hundred KB at most)
BITS = 32  # tokens per bitmask word
MAX_ERROR_CHARS = 1000  # of llguidance's message in a RequestError (it can quote the parser's state)
# JSON nesting (objects and arrays) a schema may have. llguidance refuses deeper schemas itself from ~500 levels,
# but Python's json.dumps of the cache key fails first (RecursionError), so the depth is checked here, without
# recursion. A schema of 50 nested objects is 100 levels.
MAX_SCHEMA_DEPTH = 128


@dataclass
class StructuredOutput:
    """What a request's output must be (vLLM's `StructuredOutputsParams`, its JSON and grammar parts). Give
    exactly one:

    json: a JSON schema, as a dict or as its JSON text; the output is JSON that matches it.
    json_object: True for any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    grammar: a Lark grammar in llguidance's dialect (`%json {...}` embeds a schema, `rule[lazy]` ends at the
             first match): what tool calls compile to (engine/text/tool_calls.py).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    grammar: str | None = None
    key: str = field(default="", init=False, repr=False, compare=False)  # the grammar cache's key

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise RequestError("structured_output.json_object", f"json_object must be a bool, "
                                                                f"got {type(self.json_object).__name__}")
        if [self.json is not None, self.json_object, self.grammar is not None].count(True) != 1:
            raise RequestError("structured_output", "give exactly one of json (a JSON schema), json_object=True "
                                                    "and grammar (a Lark grammar)")
        if self.json_object:
            self.key = "json_object"
            return
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise RequestError("structured_output.grammar", f"grammar must be a string, "
                                                                f"got {type(self.grammar).__name__}")
            self.key = "lark:" + self.grammar
            return
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise RequestError("structured_output.json", f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(self.json, dict):
            raise RequestError("structured_output.json", f"the JSON schema must be a JSON object, "
                                                         f"got {type(self.json).__name__}")
        check_schema_depth(self.json, "structured_output.json")
        try:
            self.key = json.dumps(self.json, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RequestError("structured_output.json", f"the JSON schema is not JSON: {e}") from None

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match (json_object: any object; None for a grammar)."""
        return {"type": "object"} if self.json_object else self.json


def check_schema_depth(schema: Any, param: str, limit: int = MAX_SCHEMA_DEPTH) -> None:
    """RequestError naming `param` when `schema` nests objects and arrays deeper than `limit` (walked with a
    stack, never recursion: a hostile schema cannot overflow it)."""
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise RequestError(param, f"the JSON schema nests deeper than {limit} levels (objects and arrays)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


class GrammarError(RuntimeError):
    """A matcher refused a token or failed (llguidance's limits reached): ends that request alone
    (finish_reason "error")."""


class GrammarMatcher:
    """One sequence's position in its grammar (an llguidance matcher)."""

    def __init__(self, matcher: Any, vocab_size: int, on_error: Callable[[], None] | None = None):
        self._matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: the bitmask covers ids 0 .. vocab_size - 1
        self._on_error = on_error  # the compiler drops the template this matcher was copied from

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the tokens allowed next into `row`, a contiguous int32 CPU tensor of
        `bitmask_words(vocab_size)` words: bit i of word w allows token BITS * w + i."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token_id: int) -> None:
        """Advance with the sampled token; GrammarError when the grammar refuses it (the mask allows only
        tokens it accepts, so this means the matcher failed)."""
        # An exhausted llguidance lexer ("too many expressions constructed") leaves a mask of EOS alone, which
        # it then accepts: is_error() is what tells that the output is not complete.
        if not self._matcher.consume_token(token_id) or self._matcher.is_error():
            if self._on_error is not None:
                self._on_error()
            reason = self._matcher.get_error().split("\n", 1)[0][:MAX_ERROR_CHARS]  # not the parser's state dump
            raise GrammarError(f"the grammar failed at token {token_id}: {reason}")

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing but EOS may follow (or EOS was accepted)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer; one per engine (nothing global)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int], cache_size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer  # read only on first use: engines that never constrain need nothing of it
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._llg_tokenizer: Any = None
        self._templates: OrderedDict[str, Any] = OrderedDict()  # key -> a fresh matcher, copied per request
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one request. A schema llguidance cannot compile raises `RequestError`
        naming `structured_output.json`."""
        # Copies share the template's lexer: when one fails (its lexer's limits reached), the template goes,
        # and the next request compiles afresh instead of inheriting the exhausted lexer.
        return GrammarMatcher(self._template(spec).deep_copy(), self.vocab_size, lambda: self.forget(spec))

    def forget(self, spec: StructuredOutput) -> None:
        """Drop `spec`'s compiled grammar from the cache (nothing to do when it is not there)."""
        with self._lock:
            self._templates.pop(spec.key, None)

    def compile(self, spec: StructuredOutput) -> None:
        """Compile `spec`'s grammar into the cache (nothing to do when it is there); `RequestError` as `matcher`."""
        self._template(spec)

    def _template(self, spec: StructuredOutput) -> Any:
        with self._lock:
            template = self._templates.get(spec.key)
            if template is not None:
                self._templates.move_to_end(spec.key)
                return template
        template = self._compile(spec)  # unlocked: a long compile never holds up another request's lookup
        with self._lock:
            self._templates[spec.key] = template
            self._templates.move_to_end(spec.key)
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template

    def _compile(self, spec: StructuredOutput) -> Any:
        import llguidance

        if spec.grammar is not None:
            param, what = "structured_output.grammar", "invalid grammar"
        else:
            param = "structured_output.json_object" if spec.json_object else "structured_output.json"
            what = "invalid JSON schema"
        try:
            if spec.grammar is not None:
                grammar = llguidance.grammar_from("lark", spec.grammar)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.schema, overrides=JSON_LAYOUT)
        except ValueError as e:
            raise RequestError(param, f"{what}: {str(e)[:MAX_ERROR_CHARS]}") from None
        matcher = llguidance.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        # The first mask builds the lexer, and finds the errors construction leaves for it: a request
        # is refused here, never at a step.
        scratch = torch.empty(bitmask_words(self.vocab_size), dtype=torch.int32)
        GrammarMatcher(matcher, self.vocab_size).fill_bitmask(scratch)
        if matcher.is_error():
            raise RequestError(param, f"{what}: {matcher.get_error()[:MAX_ERROR_CHARS]}")
        return matcher

    @property
    def llg_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (each token's bytes; special tokens never spelled by a grammar),
        built once: about 0.4 s for a 49k vocabulary."""
        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = _llg_tokenizer(self.tokenizer, self.eos_token_ids)
            return self._llg_tokenizer


def _llg_tokenizer(tokenizer: Tokenizer, eos_token_ids: list[int]) -> Any:
    import llguidance

    tokens, special = [], set(tokenizer.special_token_ids)
    for i in range(tokenizer.vocab_size):
        try:
            tokens.append(tokenizer.token_bytes(i))
        except IndexError:  # an id the vocabulary skips: never allowed
            tokens.append(b"")
            special.add(i)

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        eos_token_id = eos_token_ids[0]
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = sorted(special)

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: bytes) -> list[int]:
            return tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=tokenizer.vocab_size,
                                  eos_token=eos_token_ids)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + BITS - 1) // BITS


@dataclass
class TokenMasks:
    """One step's allowed tokens for the constrained rows of a batch: `bitmask[j]` is row `rows[j]`'s
    (bit i of word w allows token BITS * w + i). Ids at or past `vocab_size` (the tokenizer's; the model's
    logits can be wider) are never allowed."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), bitmask_words(vocab_size)], on the CPU
    vocab_size: int

    @classmethod
    def from_matchers(cls, matchers: Sequence[GrammarMatcher | None]) -> TokenMasks | None:
        """The masks of the rows that have a matcher (None when no row has one: the step costs nothing)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        vocab_size = matchers[rows[0]].vocab_size
        bitmask = torch.empty(len(rows), bitmask_words(vocab_size), dtype=torch.int32)
        for j, i in enumerate(rows):
            matchers[i].fill_bitmask(bitmask[j])
        return cls(rows, bitmask, vocab_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set every disallowed logit of the masked rows of `logits` [B, V] to -inf, in place."""
        return apply_masks(logits, self.rows, self.bitmask, self.vocab_size)


# Byte value -> its 8 bits as additive logits: 0 (allowed) or -inf. On the CPU, adding this is several times
# faster than masked_fill with a bool mask (bench/structured.py). A constant, never written.
_BYTE_PENALTY = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def mask_penalty(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 bitmask [n, words] -> float32 [n, width]: 0 where a token is allowed, -inf where not."""
    # Little-endian words (every platform torch runs on): byte k holds tokens 8k .. 8k+7, lowest bit first.
    byte_values = bitmask.contiguous().view(torch.uint8).view(-1).int()
    table = _BYTE_PENALTY.to(bitmask.device)
    return table.index_select(0, byte_values).view(bitmask.shape[0], -1)[:, :width]


def apply_masks(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`TokenMasks.apply`: rows[j] of `logits` [B, V] keeps only the tokens bitmask[j] allows, in place.
    Logits must be finite (inf + -inf is NaN)."""
    width = min(vocab_size, logits.shape[1])
    penalty = mask_penalty(bitmask.to(logits.device, non_blocking=True), width)
    if list(rows) == list(range(logits.shape[0])):
        logits[:, :width].add_(penalty)
        logits[:, width:] = float("-inf")
    else:
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[:, :width].index_add_(0, idx, penalty)
        logits[idx, width:] = float("-inf")
    return logits
