"""Speculative decoding with n-gram drafts: kvmini plain vs speculative, llama.cpp plain vs its prompt lookup.

Workload: 20 grounded chat prompts that restate, quote from, summarise or edit a passage given in the prompt
(5 passages of about 250 tokens taken from installed Python modules' docstrings and this repository's docs,
4 tasks each), and 10 open-ended chat prompts. Every engine decodes each prompt greedily for --new-tokens
tokens (prefill included in the time, as a user waits for it); engines alternate prompt by prompt.

kvmini runs as `make serve` does (bfloat16, `quantization="auto"`, batch-invariant) with and without
`speculative="ngram"`; llama.cpp (when `llama_cpp` is importable, `make bench-peers`) runs the default GGUF
requantised to Q4_0, plain and with llama-cpp-python's `LlamaPromptLookupDecoding(num_pred_tokens=k)`, same k.
Greedy outputs are checked: speculative against plain for each engine (a mismatch fails the run).

Reports tok/s per engine and workload (prefill included, and decode only: after the first token), the acceptance rate (accepted / drafted tokens) and the mean tokens
per step (for kvmini: generated tokens / forward passes that produced them). Writes
bench/results/speculative.json. Run it on a quiet machine (no tests, servers or helpers; the load average is
recorded).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, machine, print_table, write_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.api.llm import DEFAULT_MODEL_DIR  # noqa: E402
from engine.model.gguf_import import default_gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PASSAGE_CHARS = 1100


def passages() -> dict[str, str]:
    """About 250 tokens each, from texts every install has (stdlib docstrings) or this repository ships."""
    import functools
    import json
    import textwrap

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text[: text.rfind(" ", 0, PASSAGE_CHARS)]

    readme = (ROOT / "README.md").read_text()
    design = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    return {
        "json module": cut(inspect.getdoc(json)),
        "functools.lru_cache": cut(inspect.getdoc(functools.lru_cache) + " " + inspect.getdoc(functools.wraps)),
        "textwrap.wrap": cut(inspect.getdoc(textwrap.TextWrapper)),
        "argparse": cut(inspect.getdoc(argparse.ArgumentParser.add_argument) or inspect.getdoc(argparse)),
        "kvmini README": cut(readme[readme.find("\n\n", 200):]),
        "kvmini architecture": cut(design[design.find("\n\n", 100):]),
    }


TASKS = [
    "Repeat the following passage exactly, word for word:\n\n{p}",
    "Here is a passage:\n\n{p}\n\nQuote the first two sentences of the passage exactly.",
    "Rewrite the following passage, keeping every sentence but writing 'the tool' instead of its name:\n\n{p}",
    "Summarize this passage, quoting its key phrases:\n\n{p}",
]

OPEN_ENDED = [
    "Write a short story about a robot who learns to paint.",
    "What are the health benefits of regular exercise?",
    "Explain how a rainbow forms, for a ten-year-old.",
    "Give me five ideas for a weekend trip with friends.",
    "Why is the sky blue?",
    "Write a poem about the sea at night.",
    "What should I consider when buying a used car?",
    "Describe the history of the printing press in a few paragraphs.",
    "How do I make a good cup of tea?",
    "What are some tips for learning a new language?",
]


def workloads(n_grounded: int, n_open: int) -> dict[str, list[str]]:
    grounded = [task.format(p=text) for text in passages().values() for task in TASKS][:n_grounded]
    return {"grounded": grounded, "open-ended": OPEN_ENDED[:n_open]}


def kvmini_run(llm: LLM, ids: list[int], n: int) -> tuple[list[int], list[float], dict]:
    """The greedy tokens, [start time, each token's arrival], and the draft counts of one request."""
    engine = llm.engine
    before = engine.stats()
    tokens, times = [], [time.perf_counter()]
    rid = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                times += [time.perf_counter()] * len(out.new_token_ids)
    after = engine.stats()
    drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    return tokens, times, {"drafted": drafted, "accepted": accepted, "steps": len(tokens) - accepted}


def llama_cpp_engines(k: int, workdir: Path):
    """(plain, prompt lookup) Llama objects on the default GGUF requantised to Q4_0."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    out = workdir / "smollm2-Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 2, True, torch.get_num_threads()  # 2: MOSTLY_Q4_0
    if llama_cpp.llama_model_quantize(str(default_gguf_path()).encode(), str(out).encode(), params) != 0:
        raise RuntimeError("llama.cpp could not quantize the default GGUF to Q4_0")
    options = dict(n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)
    plain = llama_cpp.Llama(str(out), **options)
    lookup = llama_cpp.Llama(str(out), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k), **options)
    return plain, lookup


def llama_cpp_run(llm, ids: list[int], n: int) -> tuple[list[int], list[float], dict]:
    llm.reset()
    tokens, times = [], [time.perf_counter()]
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        tokens.append(token)
        times.append(time.perf_counter())
        if len(tokens) == n:
            break
    return tokens, times, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    ap.add_argument("--grounded", type=int, default=20, help="grounded prompts (at most 24)")
    ap.add_argument("--open-ended", type=int, default=10, help="open-ended prompts (at most 10)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    k, n = args.num_speculative_tokens, args.new_tokens

    load_start = load_average()
    options = dict(dtype="bfloat16", quantization="auto")
    plain = LLM(args.model, **options)
    spec = LLM(args.model, **options, speculative="ngram", num_speculative_tokens=k)
    engines = {"kvmini": lambda ids: kvmini_run(plain, ids, n),
               "kvmini ngram": lambda ids: kvmini_run(spec, ids, n)}
    pairs = [("kvmini ngram", "kvmini")]
    llama_note = "skipped (--no-llama-cpp)" if args.no_llama_cpp else "measured"
    workdir = tempfile.TemporaryDirectory()
    if not args.no_llama_cpp:
        try:
            lc_plain, lc_lookup = llama_cpp_engines(k, Path(workdir.name))
            engines["llama.cpp Q4_0"] = lambda ids: llama_cpp_run(lc_plain, ids, n)
            engines["llama.cpp Q4_0 lookup"] = lambda ids: llama_cpp_run(lc_lookup, ids, n)
            pairs.append(("llama.cpp Q4_0 lookup", "llama.cpp Q4_0"))
        except ImportError:
            llama_note = "llama_cpp is not installed (make bench-peers installs it)"
    for run in engines.values():  # warm up
        run(plain.chat_prompt([{"role": "user", "content": "Hi"}]))

    results, mismatches, peer_failures = {}, [], {}
    prompt_sets = workloads(args.grounded, args.open_ended)
    prompt_ids = {w: [plain.chat_prompt([{"role": "user", "content": t}]) for t in texts]
                  for w, texts in prompt_sets.items()}
    for workload, prompts in prompt_ids.items():
        per_engine = {name: {"tokens": 0, "seconds": 0.0, "decode_seconds": 0.0, "drafted": 0, "accepted": 0,
                             "steps": 0} for name in engines}
        for i, ids in enumerate(prompts):
            outputs = {}
            for name, run in list(engines.items()):
                try:
                    tokens, times, counts = run(ids)
                except ValueError as e:  # llama-cpp-python's prompt lookup (see peer_failures in the JSON)
                    if not name.startswith("llama.cpp"):
                        raise
                    peer_failures[name] = f"{workload} prompt {i}: {type(e).__name__}: {e}"
                    del engines[name]
                    for table in (per_engine, *results.values()):
                        table.pop(name, None)
                    pairs[:] = [p for p in pairs if name not in p]
                    continue
                outputs[name] = tokens
                acc = per_engine[name]
                acc["tokens"] += len(tokens)
                acc["seconds"] += times[-1] - times[0]
                acc["decode_seconds"] += times[-1] - times[1]  # after the first token: decode only
                for key, value in counts.items():
                    acc[key] += value
            for fast, base in pairs:
                if outputs[fast] != outputs[base]:
                    mismatches.append(f"{workload} prompt {i}: {fast} differs from {base}")
        for name, acc in per_engine.items():
            acc["tok_s"] = acc["tokens"] / acc["seconds"]
            acc["decode_tok_s"] = (acc["tokens"] - len(prompts)) / acc["decode_seconds"]
            if acc["drafted"]:
                acc["acceptance_rate"] = acc["accepted"] / acc["drafted"]
            if acc["steps"]:
                acc["tokens_per_step"] = acc["tokens"] / acc["steps"]
        results[workload] = per_engine

    rows = []
    for workload, per_engine in results.items():
        base = per_engine["kvmini"]["tok_s"]
        for name, acc in per_engine.items():
            rows.append([workload, name, f"{acc['tok_s']:.1f}", f"{acc['tok_s'] / base:.2f}", f"{acc['decode_tok_s']:.1f}",
                         f"{acc.get('acceptance_rate', float('nan')):.2f}" if "acceptance_rate" in acc else "-",
                         f"{acc['tokens_per_step']:.2f}" if "tokens_per_step" in acc else "-"])
    print_table(["workload", "engine", "tok/s", "x kvmini plain", "decode tok/s", "acceptance", "tokens/step"], rows)
    ratios = {}
    for workload, per_engine in results.items():
        r = {"ngram / plain": per_engine["kvmini ngram"]["tok_s"] / per_engine["kvmini"]["tok_s"],
             "ngram / plain, decode only": (per_engine["kvmini ngram"]["decode_tok_s"]
                                            / per_engine["kvmini"]["decode_tok_s"])}
        if "llama.cpp Q4_0 lookup" in per_engine:
            r["ngram / llama.cpp lookup"] = (per_engine["kvmini ngram"]["tok_s"]
                                             / per_engine["llama.cpp Q4_0 lookup"]["tok_s"])
            r["llama.cpp lookup / llama.cpp plain"] = (per_engine["llama.cpp Q4_0 lookup"]["tok_s"]
                                                       / per_engine["llama.cpp Q4_0"]["tok_s"])
        ratios[workload] = r
        print(workload, ", ".join(f"{key} {value:.2f}" for key, value in r.items()))
    load_end = load_average()
    print(f"load average {load_start:.2f} -> {load_end:.2f}; llama.cpp: {llama_note}")
    for m in mismatches:
        print("MISMATCH:", m)
    for name, failure in peer_failures.items():
        print(f"{name} failed and was dropped: {failure}")
    path = write_json("speculative", {
        "machine": machine(), "load_average": [load_start, load_end], "new_tokens": n,
        "num_speculative_tokens": k, "kvmini": options, "llama_cpp": llama_note, "results": results,
        "ratios": ratios, "mismatches": mismatches, "peer_failures": peer_failures,
        "median_prompt_tokens": {w: statistics.median(map(len, ids)) for w, ids in prompt_ids.items()},
    })
    print(f"wrote {path}")
    if any(m.split(": ", 1)[1].startswith("kvmini") for m in mismatches):
        sys.exit(1)  # ours must match; llama.cpp's batched verification may round differently (reported)


if __name__ == "__main__":
    main()
