"""KV-cache memory: the formula, and the same quantities measured on real allocations and the real scheduler.

Theory: one token costs `2 (K and V) x layers x kv_heads x head_dim x bytes per value` (the dtype's bytes; with
an 8-bit `kv_cache_dtype`, 1 plus a 2-byte scale per head: `engine.cache.pools.kv_bytes_per_token`); a sequence holds whole
blocks, so `ceil(context / block_size)` of them; a budget of B bytes is `B // bytes_per_block` blocks.

Measurement never trusts that formula:
- pool bytes come from the storage of the allocated K/V tensors (`KVCache.pool_bytes`);
- bytes per sequence come from reserving blocks for a sequence through `BlockManager` (`held_bytes`);
- the concurrency limit comes from admitting requests into an `LLMEngine` until its scheduler refuses one;
- process memory growth comes from the kernel's VmRSS, read in a fresh process (see `rss_growth`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.api.engine import LLMEngine
from engine.cache.blocks import BlockManager, BlockTable
from engine.cache.kv_policy import KVPolicy
from engine.cache.pools import CacheConfig, KVCache, kv_bytes_per_token
from engine.core.config import ModelConfig
from engine.core.errors import CacheFullError
from engine.exec.runner import ModelRunner
from engine.kv_memory.variants import variant_name
from engine.sampling.params import SamplingParams
from engine.sched.scheduler import SchedulerConfig

UNLIMITED = 2**62  # scheduler limits (sequences, batched tokens) that must never be what stops admission


def synthetic_config(
    layers: int, heads: int, kv_heads: int, head_dim: int, max_position_embeddings: int = 1 << 20
) -> ModelConfig:
    """A weightless model shape: only the fields the KV cache reads matter; the rest are plausible fillers."""
    if min(layers, heads, kv_heads, head_dim) < 1:
        raise ValueError("layers, heads, kv-heads and head-dim must all be positive")
    if heads % kv_heads:
        raise ValueError(f"--kv-heads ({kv_heads}) must divide --heads ({heads})")
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=heads * head_dim,
        intermediate_size=4 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
    )


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- the formula -----------------------------------------------------------------------------------


def blocks_for(context: int, block_size: int) -> int:
    return -(-context // block_size)


def token_bytes(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """The formula's bytes per token."""
    return kv_bytes_per_token(config, CacheConfig(kv_cache_dtype=kv_cache_dtype), dtype)


def formula_held_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int, context: int,
                       kv_cache_dtype: str = "auto") -> int:
    """Bytes one sequence of `context` tokens holds: whole blocks, the last one possibly part empty."""
    return blocks_for(context, block_size) * block_size * token_bytes(config, dtype, kv_cache_dtype)


def formula_pool_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int, num_blocks: int,
                       kv_cache_dtype: str = "auto") -> int:
    return num_blocks * block_size * token_bytes(config, dtype, kv_cache_dtype)


def formula_max_seqs(config: ModelConfig, dtype: torch.dtype, block_size: int, budget: int, context: int,
                     kv_cache_dtype: str = "auto") -> int:
    """Sequences of `context` tokens that fit in a pool of `budget` bytes (budget // block bytes blocks)."""
    num_blocks = budget // (block_size * token_bytes(config, dtype, kv_cache_dtype))
    return num_blocks // blocks_for(context, block_size)


# ---- measured on real allocations --------------------------------------------------------------------


def allocate(config: ModelConfig, dtype: torch.dtype, block_size: int, num_blocks: int, device: str = "cpu",
             kv_cache_dtype: str = "auto") -> KVCache:
    return KVCache(config, CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_dtype=kv_cache_dtype),
                   dtype, device)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


MAX_REAL_ALLOCATION = 5 * 2**28  # 1.25 GiB; larger pools are sized on the meta device instead of allocated


def fits_in_memory(nbytes: int) -> bool:
    """Whether to allocate `nbytes` for real: at most 1.25 GiB and a quarter of the memory available."""
    available = available_memory()
    return nbytes <= MAX_REAL_ALLOCATION and (available is None or nbytes <= available // 4)


def measured_held_bytes(cache: KVCache, contexts: list[int]) -> dict[int, int]:
    """Reserve blocks for one sequence of each length through a BlockManager and ask what it holds."""
    manager = BlockManager(cache, enable_prefix_caching=False)
    held = {}
    for context in contexts:
        table = BlockTable()
        manager.reserve(table, context)
        held[context] = manager.held_bytes(table)
        manager.release(table)
    return held


def read_rss() -> int:
    """Resident set size of this process now, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


# Run in a fresh interpreter: VmRSS before and after allocating the pool (torch.zeros writes every page).
_RSS_SCRIPT = """
import json, sys, torch
from engine.core.config import ModelConfig
from engine.kv_memory.sizing import allocate, read_rss
config, dtype, block_size, num_blocks, kv_cache_dtype = json.loads(sys.argv[1])
config = ModelConfig.from_dict(config)
before = read_rss()
cache = allocate(config, getattr(torch, dtype), block_size, num_blocks, kv_cache_dtype=kv_cache_dtype)
print(read_rss() - before)
"""


def rss_growth(config: ModelConfig, dtype: torch.dtype, block_size: int, num_blocks: int,
               kv_cache_dtype: str = "auto") -> int | None:
    """VmRSS growth from allocating the pool, in a fresh process; None without /proc.

    A fresh process because malloc reuses memory an earlier, freed pool left mapped: measured in the same
    process, a second pool can show little or no growth at all.
    """
    if not Path("/proc/self/status").is_file():
        return None
    arg = json.dumps([config.to_dict(), str(dtype).removeprefix("torch."), block_size, num_blocks, kv_cache_dtype])
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, arg], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip())


# ---- measured on the real scheduler --------------------------------------------------------------------


@dataclass(frozen=True)
class _NoText:
    """Tokenizer stand-in: admission only counts blocks, it never encodes or decodes text."""

    eos_token_ids: tuple[int, ...] = ()


def admission_engine(
    config: ModelConfig, dtype: torch.dtype, block_size: int, budget: int, max_model_len: int,
    kv_cache_dtype: str = "auto",
) -> LLMEngine:
    """A real LLMEngine (scheduler, block manager, a pool sized from `budget` bytes) with no weights.

    Admission is decided by the scheduler from free blocks alone, so no forward pass is needed to find how
    many sequences fit; the runner's model is never called. The pool is built by the engine's own code
    (`CacheConfig(kv_cache_memory=budget)`) but on PyTorch's meta device: real shapes and block count,
    no memory, so a 16 GiB budget can be counted on a laptop. Scheduler limits are set out of the way so
    only the KV memory can refuse a request.
    """
    cache = KVCache(config, CacheConfig(block_size=block_size, kv_cache_memory=budget, kv_cache_dtype=kv_cache_dtype),
                    dtype, "meta")
    blocks = BlockManager(cache)
    runner = ModelRunner(None, cache, blocks, torch.device("meta"))  # type: ignore[arg-type]
    scheduler = SchedulerConfig(UNLIMITED, UNLIMITED)
    return LLMEngine(runner, _NoText(), config, scheduler, max_model_len)  # type: ignore[arg-type]


def count_admitted(engine: LLMEngine, context: int) -> int:
    """How many requests with `context`-token prompts (max_tokens 1) run at once before one must wait.

    Requests are added in doubling batches and the scheduler's admission (`schedule()`) runs after each;
    the count is the number running when the first request stays waiting. Prompts are distinct so the
    prefix cache shares nothing. Everything is aborted afterwards, so the engine can be reused.
    """
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1)
    ids: list[str] = []
    sched = engine.scheduler
    try:
        batch = 1
        while not sched.waiting:
            for _ in range(batch):
                i = len(ids)
                ids.append(engine.add_request([(i + j) % vocab for j in range(context)], params))
            sched.schedule()
            batch *= 2
        return len(sched.running)
    except CacheFullError:  # one sequence of this length is larger than the whole pool
        return 0
    finally:
        for rid in ids:
            engine.abort(rid)


# ---- one row of the sizing table ---------------------------------------------------------------------


@dataclass
class SizingRow:
    """Theory next to measurement for one model shape and dtype."""

    name: str
    kv_heads: int
    dtype: str
    block_size: int
    bytes_per_token: int  # formula
    pool_blocks: int  # blocks in the measured pool
    pool_bytes_formula: int
    pool_bytes_measured: int  # from tensor storage
    pool_device: str  # "cpu", or "meta" when the pool was too large to allocate here (storage sizes only)
    rss_growth: int | None  # VmRSS growth from allocating that pool (fresh process)
    held_formula: dict[int, int] = field(default_factory=dict)  # context -> bytes
    held_measured: dict[int, int] = field(default_factory=dict)
    budget: int = 0
    max_seqs_formula: dict[int, int] = field(default_factory=dict)  # context -> sequences at `budget`
    max_seqs_admitted: dict[int, int] = field(default_factory=dict)
    kv_cache_dtype: str = "auto"  # "auto": the dtype above; else the 8-bit cache (engine/cache/kv_quant.py)

    @property
    def exact(self) -> bool:
        """Every measured byte count and count equals the formula."""
        return (
            self.pool_bytes_measured == self.pool_bytes_formula
            and self.held_measured == self.held_formula
            and self.max_seqs_admitted == self.max_seqs_formula
        )


def size(
    config: ModelConfig,
    dtype: torch.dtype,
    contexts: list[int],
    budget: int,
    budget_contexts: list[int] | None = None,
    block_size: int = 16,
    name: str | None = None,
    measure_rss: bool = True,
    kv_cache_dtype: str = "auto",
) -> SizingRow:
    """Measure one shape: a pool just big enough for the longest context, then an engine at `budget`."""
    budget_contexts = budget_contexts if budget_contexts is not None else contexts
    num_blocks = blocks_for(max(contexts), block_size)
    kvd = kv_cache_dtype
    pool_bytes = formula_pool_bytes(config, dtype, block_size, num_blocks, kvd)
    device = "cpu" if fits_in_memory(pool_bytes) else "meta"
    cache = allocate(config, dtype, block_size, num_blocks, device, kvd)
    row = SizingRow(
        name=name or variant_name(config),
        kv_heads=config.num_key_value_heads,
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        bytes_per_token=token_bytes(config, dtype, kvd),
        pool_blocks=num_blocks,
        pool_bytes_formula=pool_bytes,
        pool_bytes_measured=cache.pool_bytes(),
        pool_device=device,
        rss_growth=None,
        held_formula={c: formula_held_bytes(config, dtype, block_size, c, kvd) for c in contexts},
        held_measured=measured_held_bytes(cache, contexts),
        budget=budget,
        kv_cache_dtype=kvd,
    )
    del cache
    if measure_rss and device == "cpu":
        row.rss_growth = rss_growth(config, dtype, block_size, num_blocks, kvd)
    if budget_contexts:
        # A prompt may fill the whole context here (the real engine keeps one slot for a generated token).
        max_len = max(config.max_position_embeddings, max(budget_contexts) + 1)
        engine = admission_engine(config, dtype, block_size, budget, max_len, kvd)
        for c in budget_contexts:
            row.max_seqs_formula[c] = formula_max_seqs(config, dtype, block_size, budget, c, kvd)
            row.max_seqs_admitted[c] = count_admitted(engine, c)
    return row


# ---- with eviction: sequences that grow by generation -------------------------------------------------------


def peak_blocks(blocks: BlockManager, context: int, policy: KVPolicy | None = None,
                prompt_len: int = 16) -> tuple[int, int]:
    """The most blocks one sequence holds in the pool and in the window pool (0 without head-aware eviction)
    while it grows to `context` tokens: a `prompt_len`-token prompt, then one token per step, reserved and
    evicted by the BlockManager as the scheduler does (a kv_policy's eviction, head-aware eviction's)."""
    table = BlockTable()
    blocks.reserve(table, prompt_len)
    blocks.commit(table, [], prompt_len)

    def held() -> tuple[int, int]:
        return len(table.live_blocks), len(table.window.live_blocks) if table.window is not None else 0

    peak = held()
    for num_tokens in range(prompt_len + 1, context + 1):  # a decode step: the newest token is the last
        blocks.evict_window(table, num_tokens)
        if policy is not None:
            blocks.evict(table, policy, num_tokens)
        blocks.reserve(table, num_tokens)
        blocks.commit(table, [], num_tokens)
        peak = max(peak[0], held()[0]), max(peak[1], held()[1])
    blocks.release(table)
    return peak


def generated_seqs(blocks: BlockManager, context: int, policy: KVPolicy | None = None) -> tuple[int, int]:
    """(sequences, bytes each) for sequences generated to `context` tokens at once: each pool's blocks over
    the blocks one sequence held at its peak (`peak_blocks`), the smaller of the two pools' counts."""
    full, window = peak_blocks(blocks, context, policy)
    seqs = blocks.kv_cache.num_blocks // full
    held = full * blocks.kv_cache.bytes_per_block
    if blocks.window is not None:
        pool = blocks.window.blocks.kv_cache
        seqs = min(seqs, pool.num_blocks // window)
        held += window * pool.bytes_per_block
    return seqs, held
