"""Batch-1 greedy decode, decode only: kvmini (bfloat16, float32, int8, int4) against its peers, same run.

Peers: transformers `generate` (bfloat16, float32) and, when `llama_cpp` is importable (`make bench-peers`),
llama.cpp on the default GGUF requantised by llama.cpp's own quantizer to F16, Q8_0 and Q4_0. Every engine
decodes the same 32-token prompt (--context 32,1024: each length in turn) for 128 new tokens; decode speed is (tokens - 1) / (last token time - first
token time), so prefill is excluded. Engines alternate run by run (--repeats runs each, median reported).
Ratios are taken at the same bit width (bfloat16 : F16, int8 : Q8_0, int4 : Q4_0). kvmini runs batch-invariant,
as by default; --compile adds each variant compiled (engine/model/compiled.py) with its start time; --without-invariance adds each variant with `batch_invariant=False`, to see what invariance costs. The bandwidth bound is
the measured read bandwidth / the weight bytes a token streams. Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DEFAULT_MODEL,
    english_text,
    load_average,
    machine,
    print_table,
    read_bandwidth_gbs,
    token_times,
    write_json,
)
from engine import LLM  # noqa: E402
from engine.core.config import ModelConfig  # noqa: E402
from engine.model.quant import weight_bytes_per_token  # noqa: E402

# An engine run: returns the arrival time of every generated token.
Runner = Callable[[], list[float]]
KVMINI_VARIANTS = {"bfloat16": ("bfloat16", None), "float32": ("float32", None),
                   "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}
LLAMA_CPP_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}  # llama_ftype values
SAME_WIDTH = {"kvmini bfloat16": "llama.cpp F16", "kvmini int8": "llama.cpp Q8_0", "kvmini int4": "llama.cpp Q4_0"}


def kvmini_runner(model_dir: Path, dtype: str, quantization: str | None, prompt: list[int], n: int,
                  batch_invariant: bool = True, compile: bool = False) -> tuple[Runner, float]:
    """The runner and the seconds `LLM(...)` took (with compile=True, the compile of every batch bucket)."""
    start = time.perf_counter()
    llm = LLM(model_dir, dtype=dtype, quantization=quantization, batch_invariant=batch_invariant, compile=compile)
    seconds = time.perf_counter() - start
    token_times(llm, prompt, 8)  # warm up
    return (lambda: token_times(llm, prompt, n)), seconds


def transformers_runner(model_dir: Path, dtype: str, prompt: list[int], n: int) -> Runner:
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # fixed length, like ignore_eos
    ids = torch.tensor([prompt])

    def run(tokens: int) -> list[float]:
        clock = Clock()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0, streamer=clock)
        return clock.times

    run(8)  # warm up
    return lambda: run(n)


def llama_cpp_runners(gguf: Path, workdir: Path, prompt: list[int], n: int) -> tuple[dict[str, Runner], dict]:
    """One runner per requantised file, and each file's size (what a llama.cpp decode step streams)."""
    import llama_cpp

    runners, sizes = {}, {}
    for name, ftype in LLAMA_CPP_TYPES.items():
        out = workdir / f"smollm2-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, torch.get_num_threads()
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {gguf} to {name}")
        context = max(512, len(prompt) + n + 16)  # a 1,024-token prompt needs more than the 512 of a short one
        llm = llama_cpp.Llama(str(out), n_ctx=context, n_threads=torch.get_num_threads(), verbose=False)

        def run(llm=llm, tokens=n) -> list[float]:
            llm.reset()
            times = []
            for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
                times.append(time.perf_counter())
                if len(times) == tokens:
                    break
            return times

        run(tokens=8)  # warm up
        runners[f"llama.cpp {name}"] = run
        sizes[f"llama.cpp {name}"] = out.stat().st_size
    return runners, sizes


def decode_tokens_per_s(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def interleaved(runs: dict[str, Runner], repeats: int) -> dict[str, list[float]]:
    """Alternate the engines run by run, so slow phases of a shared machine hit all of them alike."""
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            speeds[name].append(decode_tokens_per_s(run()))
    return {name: sorted(v) for name, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--kvmini", nargs="+", default=list(KVMINI_VARIANTS), choices=list(KVMINI_VARIANTS))
    ap.add_argument("--transformers", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--context", default=None, metavar="N,N,...",
                    help="prompt lengths to measure one after the other, e.g. 32,1024 (overrides --prompt-tokens); "
                         "the JSON then holds one entry per length under 'contexts'")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median reported)")
    ap.add_argument("--compile", action="store_true",
                    help="also run each kvmini variant with compile=True (engine/model/compiled.py), its start time recorded")
    ap.add_argument("--without-invariance", action="store_true",
                    help="also run each kvmini variant with batch_invariant=False (what batch invariance costs)")
    args = ap.parse_args()
    lengths = [int(n) for n in args.context.split(",")] if args.context else [args.prompt_tokens]
    payloads = [measure(args, n) for n in lengths]
    payload = payloads[0] if len(payloads) == 1 else {"benchmark": "decode", "contexts": payloads}
    print(f"wrote {write_json('decode', payload)}")


def measure(args: argparse.Namespace, prompt_tokens: int) -> dict:
    """One run at one prompt length: every engine, alternating; prints the table and returns the payload."""
    from engine.model.gguf_import import default_gguf_path
    from engine.text.tokenizer import Tokenizer

    load = load_average()
    config = ModelConfig.from_dir(args.model)
    prompt = Tokenizer.from_dir(args.model).encode(english_text())[:prompt_tokens]
    bandwidth = read_bandwidth_gbs()
    runs: dict[str, Runner] = {}
    weight_bytes: dict[str, int] = {}
    start_s: dict[str, float] = {}
    for variant in args.kvmini:
        dtype, quantization = KVMINI_VARIANTS[variant]
        for invariant in (True, False) if args.without_invariance else (True,):
            for compiled in (False, True) if args.compile else (False,):
                name = f"kvmini {variant}" + ("" if invariant else " (no batch invariance)") + (
                    " compiled" if compiled else "")
                runs[name], start_s[name] = kvmini_runner(args.model, dtype, quantization, prompt, args.new_tokens,
                                                          invariant, compiled)
                weight_bytes[name] = weight_bytes_per_token(config, quantization, 4 if dtype == "float32" else 2)
    for dtype in args.transformers:
        runs[f"transformers {dtype}"] = transformers_runner(args.model, dtype, prompt, args.new_tokens)
        weight_bytes[f"transformers {dtype}"] = weight_bytes_per_token(config, None, 4 if dtype == "float32" else 2)
    workdir = tempfile.TemporaryDirectory()
    llama_cpp_note = "skipped (--no-llama-cpp)" if args.no_llama_cpp else None
    if not args.no_llama_cpp:
        try:
            peer_runs, sizes = llama_cpp_runners(default_gguf_path(), Path(workdir.name), prompt, args.new_tokens)
            runs.update(peer_runs)
            weight_bytes.update(sizes)
        except ImportError:
            llama_cpp_note = "llama_cpp is not installed (make bench-peers installs it)"
    speeds = interleaved(runs, args.repeats)
    median = {name: statistics.median(v) for name, v in speeds.items()}
    results = []
    for name, value in median.items():
        bound = bandwidth * 1e9 / weight_bytes[name]
        peer = SAME_WIDTH.get(name.removesuffix(" compiled"))
        ratio = value / median[peer] if peer in median else None
        results.append({"engine": name, "tokens_per_s": value, "runs_tokens_per_s": speeds[name],
                        "weight_bytes_per_token": weight_bytes[name], "bandwidth_bound_tokens_per_s": bound,
                        "fraction_of_bound": value / bound, "same_width_peer": peer if ratio else None,
                        "ratio_to_peer": ratio, "start_s": start_s.get(name)})
    rows = [[r["engine"], r["tokens_per_s"], f"{r['ratio_to_peer']:.2f}x {r['same_width_peer']}"
             if r["ratio_to_peer"] else "", r["weight_bytes_per_token"] / 1e6, r["fraction_of_bound"]]
            for r in results]
    hf = median.get("transformers bfloat16")
    print(f"load average {load:.2f}; read bandwidth {bandwidth:.1f} GB/s; prompt {prompt_tokens} tokens, "
          f"{args.new_tokens} new, batch 1, decode only")
    if llama_cpp_note:
        print(f"llama.cpp: {llama_cpp_note}")
    print_table(["engine", "tok/s", "vs same width", "weight MB/token", "of bound"], rows)
    if hf:
        print("vs transformers bfloat16: " + ", ".join(f"{n} {v / hf:.2f}x" for n, v in median.items()
                                                       if n.startswith("kvmini")))
    payload = {
        "benchmark": "decode",
        "model": args.model.name,
        "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens,
        "load_average_1m": load,
        "read_bandwidth_gbs": bandwidth,
        "llama_cpp": llama_cpp_note or "measured",
        "machine": machine(),
        "results": results,
    }
    return payload


if __name__ == "__main__":
    main()
