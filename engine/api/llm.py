"""`LLM`: the library entry point — load a checkpoint, compute logits, generate, stream, step."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.api.engine import LLMEngine
from engine.api.session import Session
from engine.cache.blocks import BlockManager
from engine.cache.head_plan import HeadPlan
from engine.cache.head_pools import head_aware_blocks
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import CacheConfig, kv_bytes_per_token
from engine.capture.request import AttentionCapture
from engine.core.checks import check_length, check_messages, prompt_token_ids
from engine.core.config import ModelConfig
from engine.core.errors import RequestError
from engine.core.outputs import RequestOutput
from engine.core.paths import require_default_model
from engine.exec.runner import ModelRunner
from engine.exec.shard import RankSpec, check_tensor_parallel, load_rank
from engine.exec.step import LocalExecutor
from engine.model.compiled import check_compile, start_decoder
from engine.model.invariance import describe as describe_invariance
from engine.model.quant import parse_quantization
from engine.sampling.params import SamplingParams
from engine.sampling.speculative import SpeculativeConfig
from engine.sched.scheduler import SchedulerConfig
from engine.text.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name}")
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def set_threads(threads: int | None) -> None:
    """torch's intra-op thread count for this process; None keeps torch's default (one per physical core)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine besides the checkpoint."""

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    cache: CacheConfig = CacheConfig()  # the KV pool (engine/cache/pools.py)
    scheduler: SchedulerConfig = SchedulerConfig()  # the step's budgets (engine/sched/scheduler.py)
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    pack_weights: bool = True  # CPU float32/bfloat16: oneDNN-packed linear layers (engine/model/packed_linear.py)
    quantization: str | None = None  # "int8" | "int4" | "auto" weight-only linear layers (engine/model/quant.py)
    kv_policy: KVPolicy | None = None  # default sink + window eviction for requests (engine/cache/kv_policy.py)
    head_plan: HeadPlan | None = None  # head-aware eviction: kv_policy for the plan's window heads only
    tensor_parallel_size: int = 1  # ranks the model is split over (engine/exec); the pool is split too
    batch_invariant: bool = True  # a request's logits do not depend on its batch (engine/model/invariance.py)
    speculative: SpeculativeConfig | None = None  # n-gram drafts verified in one pass (engine/sampling/speculative.py)
    compile: bool = False  # decode steps through one torch.compile'd graph per batch bucket (engine/model/compiled.py)


class LLM:
    """Load an HF-format model directory and run it (default: the imported SmolLM2, engine/core/paths.py).

    With `tensor_parallel_size=N` the model is split over N ranks (engine/exec): this process is rank 0
    and starts the other N - 1 itself, or joins the group torchrun started. The whole KV pool
    (`num_blocks`, `kv_cache_memory`) is split over the ranks, each holding its own KV heads; `threads`
    is per rank (default: torch's thread count divided by N). `close()` stops the other ranks (so does
    garbage collection, and interpreter exit).

    `batch_invariant=True` (the default): a request's tokens, logits and captured attention are bitwise the
    same alone or in any batch, chunked, preempted or served from the prefix cache (engine/model/invariance.py says
    how and what it does not cover); False runs the batch's fastest kernels, whose rounding moves with it.

    `speculative="ngram"` (engine/sampling/speculative.py): a decoding request whose last tokens occurred before in its
    prompt or output drafts up to `num_speculative_tokens` tokens that followed them, verified in one forward
    pass; greedy and seeded requests give the same tokens as without it (with batch invariance)."""

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        *,
        block_size: int = CacheConfig.block_size,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
        kv_cache_dtype: str = CacheConfig.kv_cache_dtype,
        kv_cache_group_size: int | None = None,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
        max_model_len: int | None = None,
        pack_weights: bool = True,
        quantization: str | None = None,
        threads: int | None = None,
        kv_policy: KVPolicy | str | None = None,
        head_plan: HeadPlan | str | Path | None = None,
        tensor_parallel_size: int = 1,
        batch_invariant: bool = True,
        speculative: str | SpeculativeConfig | None = None,
        num_speculative_tokens: int | None = None,
        compile: bool = False,
    ):
        self.model_dir = Path(model) if model is not None else require_default_model()
        self.config = ModelConfig.from_dir(self.model_dir)
        check_tensor_parallel(self.config, tensor_parallel_size)
        if threads is None and tensor_parallel_size > 1:
            from engine.core.comm import default_threads  # torch.distributed only when asked for

            threads = default_threads(tensor_parallel_size)  # the ranks share this machine's cores
        set_threads(threads)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.engine_config = EngineConfig(
            dtype=parse_dtype(dtype),
            device=torch.device(device),
            cache=CacheConfig(block_size, num_blocks, kv_cache_memory, enable_prefix_caching, kv_cache_dtype,
                              kv_cache_group_size),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, tile_aligned_chunks=bool(batch_invariant)),
            max_model_len=max_model_len,
            pack_weights=pack_weights,
            quantization=parse_quantization(quantization, device),
            kv_policy=KVPolicy.coerce(kv_policy),
            head_plan=HeadPlan.coerce(head_plan),
            tensor_parallel_size=tensor_parallel_size,
            batch_invariant=bool(batch_invariant),
            speculative=SpeculativeConfig.coerce(speculative, num_speculative_tokens),
            compile=bool(compile),
        )
        ec = self.engine_config
        if ec.head_plan is not None and ec.kv_policy is None:
            raise ValueError("head_plan needs kv_policy: the sink + window that the plan's window heads keep")
        if ec.head_plan is not None and tensor_parallel_size > 1:
            raise ValueError("head_plan (head-aware eviction) does not work with tensor_parallel_size > 1 yet")
        if ec.compile:
            check_compile(ec.device, tensor_parallel_size, ec.speculative is not None, ec.cache.kv_cache_dtype)
        if max_model_len is not None and not 1 <= max_model_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [1, {self.config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_model_len}")
        # The block count is the whole model's (every rank's pool has these blocks, of its own heads).
        block_bytes = kv_bytes_per_token(self.config, ec.cache, ec.dtype) * ec.cache.block_size
        spec = RankSpec(str(self.model_dir), ec.dtype, ec.pack_weights, ec.quantization,
                        replace(ec.cache, num_blocks=ec.cache.resolve_num_blocks(block_bytes)), ec.batch_invariant)
        self.workers = None
        if tensor_parallel_size > 1:
            from engine.exec.workers import WorkerGroup  # torch.distributed only when asked for

            self.workers = WorkerGroup.start(tensor_parallel_size, ec.device.type, threads)
            self._finalizer = weakref.finalize(self, self.workers.close)
            self.model, self.kv_cache = self.workers.load(spec, self.config)
        elif ec.head_plan is None:
            self.model, self.kv_cache = load_rank(spec, self.config, ec.device)
        else:  # head-aware eviction: two pools, sized together (engine/cache/head_plan.py)
            self.model, _ = load_rank(replace(spec, cache=None), self.config, ec.device)
            self.blocks = head_aware_blocks(self.config, ec.cache, ec.dtype, ec.device, ec.head_plan, ec.kv_policy,
                                            ec.scheduler.max_num_seqs, self.max_model_len)
            self.kv_cache = self.blocks.kv_cache  # the full heads' pool
        if ec.head_plan is None:
            self.blocks = BlockManager(self.kv_cache, ec.cache.enable_prefix_caching)
        device = self.workers.tp.device if self.workers is not None else ec.device
        decoder = None
        if ec.compile:  # every batch bucket compiled before the first request
            decoder = start_decoder(self.model, self.kv_cache.k, self.kv_cache.v, ec.batch_invariant)
        if self.workers is not None:
            from engine.exec.workers import TensorParallelExecutor

            executor = TensorParallelExecutor(self.workers, self.model, self.kv_cache, self.config.num_attention_heads)
        else:
            executor = LocalExecutor(self.model, self.kv_cache, decoder)
        self.runner = ModelRunner(self.model, self.kv_cache, self.blocks, device, self.config, executor,
                                  ec.batch_invariant)
        self.engine = LLMEngine(
            self.runner,
            self.tokenizer,
            self.config,
            ec.scheduler,
            self.max_model_len,
            ec.kv_policy if ec.head_plan is None else None,  # with a head plan, the policy is the window heads'
            ec.speculative,
        )

    @property
    def batch_invariance(self) -> str:
        """Whether a request's results are independent of its batch, and how (engine/model/invariance.py)."""
        if not self.engine_config.batch_invariant:
            return "not batch-invariant"
        # Above 2 ranks the all-reduce adds partial sums in an order that may follow the buffer's size.
        ranks = self.engine_config.tensor_parallel_size
        caveat = " (per rank: not across an all-reduce of 3+ ranks)" if ranks > 2 else ""
        return f"batch-invariant{caveat}: {describe_invariance(self.model.linears())}"

    @property
    def max_model_len(self) -> int:
        return self.engine_config.max_model_len or self.config.max_position_embeddings

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer run (a tensor-parallel rank exited...), or None while it can."""
        return self.workers.failure if self.workers is not None else None

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (idempotent; a no-op with one rank)."""
        if self.workers is not None:
            self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits `[len(token_ids), vocab]` of a full prefill; the cache is not touched."""
        ids = self._prompt_ids(token_ids, "token_ids")
        return self.runner.full_logits(ids)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        capture: AttentionCapture | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order. A request the engine had
        to end on its own comes back with finish_reason "error" and `error` set; the others are unaffected."""
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        attention: dict[str, list] = {}
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.engine.add_request(p, sp, capture=capture))
                attention[ids[-1]] = []
            while len(final) < len(ids) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id in attention and out.attention:
                        attention[out.request_id] += out.attention
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                self.engine.abort(rid)  # no-op for finished requests; frees blocks on error or interrupt
        for rid, out in final.items():
            out.attention = attention[rid] if capture is not None else None
        return [final[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        params: SamplingParams | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate replies."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c, **template_kwargs) for c in convs]
        return self.generate(prompts, params)

    def chat_prompt(self, messages: list[dict[str, str]], **template_kwargs) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (generation prompt added).

        Bad messages, and any failure of the checkpoint's template (it is the model's code, run in a
        sandbox), raise `RequestError` with param "messages"."""
        check_messages(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        except Exception as e:  # noqa: BLE001 - include, range(10**9), raise_exception(): all the request's fault
            raise RequestError("messages", f"cannot apply the chat template: {type(e).__name__}: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as they are decoded; closing the iterator early aborts the request."""
        rid = self.engine.add_request(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.finish_reason == "error":
                            raise RuntimeError(f"the engine failed on this request: {out.error}")
                        if out.new_text:
                            yield out.new_text
                        if out.finished:
                            return
                if not self.engine.has_unfinished():
                    return
        finally:
            self.engine.abort(rid)

    def session(
        self,
        prompt: str | list[int],
        capture: AttentionCapture | None = None,
        params: SamplingParams | None = None,
    ) -> Session:
        """Start step-by-step decoding of `prompt` (see `Session`). Only `params.kv_policy` applies to a session,
        not the engine's default."""
        ids = self._prompt_ids(prompt)
        self.engine.check_kv_policy(params.kv_policy if params is not None else None, capture)
        state = self.engine.capture_state(capture, len(ids)) if capture is not None else None
        return Session(self.runner, self.tokenizer, self.engine.seq_ids, ids, self.max_model_len, state, params)

    def _prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        ids = prompt_token_ids(prompt, self.tokenizer, self.config.vocab_size, param)
        check_length(param, len(ids), self.max_model_len)
        return ids


def _is_token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)
