"""What JSON-constrained decoding costs on the CPU, per structured-generation library, in one run.

For llguidance, xgrammar and outlines-core (each measured when importable: `pip install llguidance xgrammar
outlines-core` to compare; kvmini itself needs only llguidance) with the default model's tokenizer:

* setup: the library's view of the vocabulary, built once per tokenizer (from `Tokenizer.token_bytes`);
* compile: a schema to the library's compiled grammar, cold (a fresh compiler; for llguidance, which builds its
  lexer lazily, with the first mask, as engine/text/structured.py does), and a new per-request matcher from the
  compiled grammar (what a request costs once the engine has cached its grammar);
* per generated token: computing the allowed-token bitmask, and advancing the matcher with the chosen token,
  over a fixed valid JSON document tokenised as the model would write it (then EOS), fed token by token;
* the sampler's side (library-independent): the bitmask turned into -inf logits (`TokenMasks.apply`), and a
  greedy `Sampler.sample` with and without one masked row;
* the engine's side: decode steps of a batch with one request constrained against the same batch without
  (paired, in turn), on the default model, and what a batch without constrained rows pays (nothing measurable);
* the dependency weight: what each library pulls in beyond kvmini's own runtime dependencies (installed sizes).

Tool calls (engine/text/tool_calls.py), with llguidance: the grammar of two declared tools under tool_choice
"required" and "auto", per token over a call (and over free text for "auto", whose text is a lazy lexeme), and
the engine's decode steps of one request constrained by each against the same request unconstrained: the
issue's goal is < 5 % per token.

Two grammars: json_object (`{"type": "object"}`: any JSON object) and a json_schema (an object with a string,
an integer, an enum and an array of strings), in `json.dumps`' layout (kvmini's: `", "` and `": "`, no other
whitespace; outlines-core's regex allows at most one space there). The machine is shared, so the libraries are interleaved token by
token (the order rotates every token) and medians are reported, with the load average before and after.
Writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_MODEL, load_average, machine, print_table, write_json  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402
from engine.sampling.sampler import Sampler
from engine.text.structured import JSON_LAYOUT, StructuredOutput, TokenMasks, bitmask_words  # noqa: E402
from engine.text.tokenizer import Tokenizer  # noqa: E402
from engine.text.tool_calls import Tool, format_call, tool_call_grammar, tool_chat_inputs  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
GRAMMARS = {
    "json_object": ({"type": "object"},
                    {"id": 7, "items": [{"sku": "A-1", "qty": 2, "price": 9.5}], "note": None, "ok": True,
                     "title": "Order for the main office"}),
    "json_schema": (SCHEMA, {"name": "Ada Lovelace", "age": 36, "role": "admin",
                             "tags": ["math", "poetry", "engines"]}),
}
LIBRARIES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


class Vocab:
    """The tokenizer as every library needs it: each token's bytes, the special ids, EOS."""

    def __init__(self, tokenizer: Tokenizer, eos: int):
        self.tokenizer = tokenizer
        self.size = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(self.size)]
        self.special = sorted(tokenizer.special_token_ids)
        self.eos = eos


# ---- one adapter per library: setup (tokenizer info), compile, matcher, fill mask, accept ------------------


class LLGuidance:
    def __init__(self, vocab: Vocab):
        import llguidance

        self.llg = llguidance
        self.vocab = vocab
        tok = vocab.tokenizer

        class Wrapped:
            eos_token_id, bos_token_id = vocab.eos, tok.bos_token_id
            tokens, special_token_ids = vocab.tokens, vocab.special

            def __call__(self, text: bytes) -> list[int]:
                return tok.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=vocab.size,
                                                eos_token=vocab.eos)

    def compile(self, schema: dict) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        # llguidance builds its lexer lazily: the first mask is part of compiling (as in engine/text/structured.py).
        self.fill(matcher, torch.zeros(bitmask_words(self.vocab.size), dtype=torch.int32))
        assert not matcher.is_error(), matcher.get_error()
        return matcher  # the template: requests start from copies of it

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class XGrammar:
    def __init__(self, vocab: Vocab):
        import xgrammar

        self.xgr = xgrammar
        # Special tokens as "" so that no grammar can spell them; EOS is the stop token.
        encoded = [b"" if i in set(vocab.special) else t for i, t in enumerate(vocab.tokens)]
        self.info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.RAW, vocab_size=vocab.size,
                                           stop_token_ids=[vocab.eos])

    def compile(self, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1)  # fresh: no cache hit
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesCore:
    def __init__(self, vocab: Vocab):
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        special = set(vocab.special)
        for i, t in enumerate(vocab.tokens):
            if i not in special:
                by_bytes.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(vocab.eos, by_bytes)
        self.eos = vocab.eos

    def compile(self, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))  # whitespace: at most one space
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def accept(self, matcher: Any, token: int) -> None:
        if token != self.eos:  # the guide ends on a final state; EOS is never advanced over
            matcher.advance(token, return_tokens=False)


ADAPTERS: dict[str, Callable[[Vocab], Any]] = {"llguidance": LLGuidance, "xgrammar": XGrammar,
                                               "outlines-core": OutlinesCore}


# ---- measurements ------------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of fn(*args)."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def per_token(adapters: dict[str, Any], compiled: dict[str, Any], ids: list[int], vocab_size: int,
              repeats: int) -> dict[str, dict]:
    """Median mask and advance times per token, the libraries interleaved token by token (rotating order)."""
    masks = {name: torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32) for name in adapters}
    fill = {name: [] for name in adapters}
    accept = {name: [] for name in adapters}
    first = {name: [] for name in adapters}
    new = {name: [] for name in adapters}
    rejected = {name: 0 for name in adapters}
    names = list(adapters)
    turn = 0
    for _ in range(repeats):
        matchers = {}
        for name in names:
            dt, matchers[name] = timed(adapters[name].matcher, compiled[name])
            new[name].append(dt)
        for pos, token in enumerate(ids):
            turn += 1
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                a, m, bm = adapters[name], matchers[name], masks[name]
                (first if pos == 0 else fill)[name].append(timed(a.fill, m, bm)[0])
                rejected[name] += not allowed(bm, token)
                accept[name].append(timed(a.accept, m, token)[0])
    return {name: {"new_matcher_us": us(statistics.median(new[name])),
                   "first_mask_us": us(statistics.median(first[name])),
                   "mask_us": us(statistics.median(fill[name])), "mask_p90_us": us(quantile(fill[name], 0.9)),
                   "advance_us": us(statistics.median(accept[name])),
                   "tokens_rejected_by_mask": rejected[name] // repeats}
            for name in names}


def compile_times(adapters: dict[str, Any], schema: dict, repeats: int) -> dict[str, float]:
    """Median cold compile time (a fresh compiler each time), interleaved."""
    times: dict[str, list[float]] = {name: [] for name in adapters}
    for _ in range(repeats):
        for name, a in adapters.items():
            times[name].append(timed(a.compile, schema)[0])
    return {name: ms(statistics.median(t)) for name, t in times.items()}


def sampler_side(vocab_size: int, batch: int, repeats: int) -> dict[str, float]:
    """The sampler's cost of one constrained row in a greedy batch, interleaved with the same batch without:
    the mask itself (bitmask -> -inf logits), and the whole `Sampler.sample`, which loses its argmax-only
    fast path when a row is masked."""
    logits = torch.randn(batch, vocab_size)
    masks = TokenMasks([0], torch.randint(-(2**31), 2**31 - 1, (1, bitmask_words(vocab_size)), dtype=torch.int32),
                       vocab_size)
    params = [SamplingParams(temperature=0.0)] * batch
    sampler = Sampler(0)
    times: dict[str, list[float]] = {"mask": [], "plain": [], "masked": []}
    for _ in range(repeats):
        times["mask"].append(timed(masks.apply, logits.clone())[0])
        times["plain"].append(timed(sampler.sample, logits, params)[0])
        times["masked"].append(timed(lambda: sampler.sample(logits, params, token_masks=masks))[0])
    # Torch's two threads stall for milliseconds when anything else runs on the cores: the minimum is the cost
    # itself, the median what a busy machine shows.
    out: dict[str, float] = {"batch": batch}
    for name, key in (("mask", "apply_mask"), ("plain", "sample"), ("masked", "sample_masked")):
        out[f"{key}_us"], out[f"{key}_min_us"] = us(statistics.median(times[name])), us(min(times[name]))
    return out


def paired_steps(llms: list, batch: int, steps: int) -> tuple[list[float], list[float]]:
    """Prefill both engines' requests, then time their decode steps in turn (the order alternating) while each
    still runs all `batch` requests; then run them to the end. Each engine's step times."""
    for llm in llms:
        while any(not r.seq.output_ids for r in llm.engine.requests.values()):
            llm.engine.step()  # the prefills
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps):
        if any(len(llm.engine.requests) < batch for llm in llms):
            break
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[j].append(timed(llms[j].engine.step)[0])
    for llm in llms:
        while llm.engine.has_unfinished():
            llm.engine.step()
    return times


def engine_steps(model: Path, batch: int, steps: int) -> dict:
    """Decode steps of two engines on the same greedy batch, stepped in turn: in the second, one request is
    constrained to a JSON object (a prompt SmolLM2 does not finish within `steps` tokens). Medians of the
    steps where every request still runs; the cost of `TokenMasks.from_matchers` on a batch without matchers."""
    from engine import LLM

    llms = [LLM(model, dtype="bfloat16") for _ in range(2)]
    prompt = llms[0].chat_prompt([{"role": "user", "content": "Give me a JSON object describing a cat."}])
    for k, llm in enumerate(llms):
        for i in range(batch):
            json_object = StructuredOutput(json_object=True) if k == 1 and i == 0 else None
            llm.engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True,
                                                          structured_output=json_object))
    plain, constrained = paired_steps(llms, batch, steps)
    none = [None] * batch
    no_matchers = statistics.median(timed(lambda: TokenMasks.from_matchers(none))[0] for _ in range(1000))
    return {"model": model.name, "dtype": "bfloat16", "batch": batch, "steps": len(plain),
            "step_ms": ms(statistics.median(plain)), "step_one_constrained_ms": ms(statistics.median(constrained)),
            "overhead_ms": ms(statistics.median(b - a for a, b in zip(plain, constrained))),  # per pair of steps
            "step_min_ms": ms(min(plain)), "step_one_constrained_min_ms": ms(min(constrained)),
            "no_constrained_rows_us": us(no_matchers)}


TOOLS = [
    Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                         "required": ["city"]}, "Get the current weather in a city"),
    Tool("search", {"type": "object", "properties": {"query": {"type": "string"},
                                                     "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
                    "required": ["query"]}, "Search the web"),
]
CALL = format_call("get_weather", {"city": "Paris", "unit": "celsius"})
TOOL_DOCUMENTS = {  # grammar, then a reply it allows
    "required": (lambda: tool_call_grammar(TOOLS, "required"), CALL),
    "auto, text": (lambda: tool_call_grammar(TOOLS, "auto"),
                   "Paris is mild in spring: days around 15 C, cool nights, and showers that pass quickly. "
                   "Pack a light coat and an umbrella, and check the forecast the day before you go."),
    "auto, text then call": (lambda: tool_call_grammar(TOOLS, "auto"), "Let me check that for you.\n" + CALL),
}


def tool_masks(tokenizer: Tokenizer, eos: int, repeats: int) -> dict:
    """Per token of each tool document: the engine's own mask (`GrammarMatcher.fill_bitmask`) and advance."""
    from engine.text.structured import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, [eos])
    bitmask = torch.empty(1, bitmask_words(tokenizer.vocab_size), dtype=torch.int32)
    row = bitmask[0]
    out = {}
    for kind, (grammar, text) in TOOL_DOCUMENTS.items():
        spec = grammar()
        compile_s, _ = timed(compiler.compile, spec)
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        masks, advances, rejected = [], [], 0
        for _ in range(repeats):
            matcher = compiler.matcher(spec)
            for t in ids:
                dt, _ = timed(matcher.fill_bitmask, row)
                masks.append(dt)
                rejected += not allowed(bitmask, t)
                dt, _ = timed(matcher.accept, t)
                advances.append(dt)
        out[kind] = {"document_tokens": len(ids), "compile_ms": ms(compile_s), "mask_us": us(statistics.median(masks)),
                     "mask_p90_us": us(quantile(masks, 0.9)), "advance_us": us(statistics.median(advances)),
                     "tokens_rejected_by_mask": rejected}
    return out


def tool_engine_steps(model: Path, steps: int) -> dict:
    """One request's decode steps, unconstrained against constrained by each tool grammar (two engines, stepped
    in turn, the prompt showing the tools as the server does); medians of the steps where both still run."""
    from engine import LLM

    llms = [LLM(model, dtype="bfloat16") for _ in range(2)]
    messages, kwargs = tool_chat_inputs([{"role": "user", "content": "What is the weather in Paris?"}], TOOLS,
                                        template_has_tools=False)
    prompt = llms[0].chat_prompt(messages, **kwargs)
    out = {}
    for kind, grammar in (("required", tool_call_grammar(TOOLS, "required")),
                          ("auto", tool_call_grammar(TOOLS, "auto"))):
        for k, llm in enumerate(llms):
            llm.engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True,
                                                          structured_output=grammar if k == 1 else None))
        plain, constrained = paired_steps(llms, 1, steps)
        step, step_constrained = statistics.median(plain), statistics.median(constrained)
        out[kind] = {"steps": len(plain), "step_ms": ms(step), "step_constrained_ms": ms(step_constrained),
                     "overhead_pct": round(100 * (step_constrained - step) / step, 2),
                     "pair_overhead_ms": ms(statistics.median(b - a for a, b in zip(plain, constrained)))}
    return {"model": model.name, "dtype": "bfloat16", "batch": 1, "grammars": out}


def dependency_weight(library: str) -> dict:
    """The packages `library` needs that kvmini's other runtime dependencies do not bring, with installed sizes."""
    mine = requirement_closure("kvmini", skip={canonical(m) for m in LIBRARIES})
    theirs = requirement_closure(library)
    extra = sorted(theirs - mine)
    sizes = {name: installed_mb(name) for name in extra}
    return {"new_packages": {name: f"{version(name)}, {sizes[name]:.1f} MB" for name in extra},
            "new_mb": round(sum(sizes.values()), 1)}


def requirement_closure(name: str, skip: set[str] = frozenset()) -> set[str]:
    """Every distribution `name` needs at run time (itself included; not those in `skip`), as installed here;
    extras left out."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [name]
    while todo:
        n = canonical(todo.pop())
        if n in seen or n in skip:
            continue
        seen.add(n)
        try:
            reqs = md.distribution(n).requires or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            r = Requirement(line)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


def installed_mb(name: str) -> float:
    try:
        files = md.distribution(name).files or []
    except md.PackageNotFoundError:
        return 0.0
    total = 0
    for f in files:
        try:
            total += os.path.getsize(f.locate())
        except OSError:
            pass
    return total / 1e6


def us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def quantile(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model directory (only its tokenizer is read)")
    ap.add_argument("--repeats", type=int, default=50, help="passes over each document")
    ap.add_argument("--compile-repeats", type=int, default=5, help="(outlines-core: 9 s each for json_object)")
    ap.add_argument("--batch", type=int, default=4, help="engine steps: requests in the batch")
    ap.add_argument("--steps", type=int, default=48, help="engine steps: decode steps per engine (0: skip)")
    ap.add_argument("--out", default="structured")
    args = ap.parse_args()

    load_before = os.getloadavg()
    load_average()  # warns when the machine is busy
    tokenizer = Tokenizer.from_dir(args.model)
    eos = tokenizer.eos_token_ids[0]
    setup_s, vocab = timed(lambda: Vocab(tokenizer, eos))
    adapters, setup, missing = {}, {"token_bytes_ms": round(setup_s * 1000, 1)}, []
    for name, module in LIBRARIES.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(name)
            print(f"{name}: not installed (pip install {name})", file=sys.stderr)
            continue
        dt, adapters[name] = timed(lambda n=name: ADAPTERS[n](vocab))
        setup[name] = {"version": md.version(module.replace("_", "-")), "tokenizer_info_ms": round(dt * 1000, 1)}
    if not adapters:
        sys.exit("no structured-generation library is installed: pip install llguidance")

    results: dict[str, dict] = {}
    for kind, (schema, document) in GRAMMARS.items():
        ids = tokenizer.encode(json.dumps(document), add_special_tokens=False) + [eos]
        compiled = {name: a.compile(schema) for name, a in adapters.items()}  # warm: lazily built parts
        cold = compile_times(adapters, schema, args.compile_repeats)
        tokens = per_token(adapters, compiled, ids, vocab.size, args.repeats)
        results[kind] = {"document_tokens": len(ids),
                         "libraries": {n: {"compile_ms": cold[n], **tokens[n]} for n in adapters}}
    sampler = [sampler_side(vocab.size, b, args.repeats * 10) for b in (1, 8)]
    engine = engine_steps(args.model, args.batch, args.steps) if "llguidance" in adapters and args.steps else None
    tool_tokens = tool_masks(tokenizer, eos, args.repeats)
    tool_engine = tool_engine_steps(args.model, args.steps) if args.steps else None
    deps = {name: dependency_weight(LIBRARIES[name]) if name in adapters else "not installed" for name in LIBRARIES}
    load_after = os.getloadavg()

    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; vocabulary {vocab.size}")
    print_table(["library", "version", "tokenizer info ms", "new packages", "MB"],
                [[n, setup[n]["version"], setup[n]["tokenizer_info_ms"], ", ".join(deps[n]["new_packages"]),
                  deps[n]["new_mb"]] for n in adapters])
    for kind, r in results.items():
        print(f"\n{kind} ({r['document_tokens']} tokens, medians)")
        print_table(["library", "compile ms", "new matcher us", "first mask us", "mask us", "mask p90 us",
                     "advance us", "rejected"],
                    [[n, x["compile_ms"], x["new_matcher_us"], x["first_mask_us"], x["mask_us"], x["mask_p90_us"],
                      x["advance_us"], x["tokens_rejected_by_mask"]] for n, x in r["libraries"].items()])
    print()
    cols = ("apply_mask", "sample", "sample_masked")
    print_table(["sampler, greedy batch", "apply mask us (min)", "sample us (min)", "sample, one row masked us (min)"],
                [[s["batch"], *(f"{s[c + '_us']} ({s[c + '_min_us']})" for c in cols)] for s in sampler])
    if engine is not None:
        e = engine
        print(f"\nengine ({e['model']} {e['dtype']}, batch {e['batch']}, {e['steps']} paired steps): "
              f"{e['step_ms']} ms a step (min {e['step_min_ms']}), {e['step_one_constrained_ms']} ms with one request "
              f"constrained (min {e['step_one_constrained_min_ms']}); overhead {e['overhead_ms']} ms (pair median); "
              f"batch without constrained rows: {e['no_constrained_rows_us']} us")
    print("\ntool calls (llguidance, engine/text/tool_calls.py; medians)")
    print_table(["grammar", "tokens", "compile ms", "mask us", "mask p90 us", "advance us", "rejected"],
                [[k, x["document_tokens"], x["compile_ms"], x["mask_us"], x["mask_p90_us"], x["advance_us"],
                  x["tokens_rejected_by_mask"]] for k, x in tool_tokens.items()])
    if tool_engine is not None:
        for kind, x in tool_engine["grammars"].items():
            print(f"engine, one request, tool_choice {kind}: {x['step_ms']} ms a step unconstrained, "
                  f"{x['step_constrained_ms']} ms constrained ({x['overhead_pct']:+.1f} %, {x['steps']} paired steps; "
                  f"pair median {x['pair_overhead_ms']} ms)")
    path = write_json(args.out, {
        "machine": machine(), "load_average": {"before": load_before, "after": load_after},
        "model": args.model.name, "vocab_size": vocab.size, "repeats": args.repeats, "setup": setup,
        "not_installed": missing, "grammars": {k: {"schema": s} for k, (s, _) in GRAMMARS.items()},
        "results": results, "sampler": sampler, "engine": engine, "dependencies": deps,
        "tool_calls": {"tokens": tool_tokens, "engine": tool_engine},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
