"""Sink + window eviction (StreamingLLM, Xiao et al. 2023): keep the first `sink` tokens and the last `window`.

A decoding sequence with a `KVPolicy` attends to its first `sink` tokens (the "attention sinks") and its last
`window` tokens, the new one included, and nothing between. Eviction works on whole blocks: the first
ceil(sink / block_size) blocks stay, and so does every block holding one of the last `window` tokens; the
blocks between go back to the pool (engine/cache/blocks.py `BlockManager.evict`). A sequence therefore holds at
most `max_blocks(block_size)` blocks however long it generates; `sink=4` with 16-token blocks keeps a whole
first block (16 tokens), and the window starts at a block boundary (up to block_size - 1 tokens more).

Positions (`positions`):
* "original": every key keeps the rotation of its original position (what the cache holds). The query sees
  the sink keys `position - j` away, however far the window has moved.
* "streaming": StreamingLLM's positions within the cache. With RoPE only q_pos - k_pos counts, and the window
  keys are the same distance away in both schemes; only the sink keys differ: StreamingLLM puts them
  `kept - j` away instead of `position - j`, which is a rotation by the number of evicted tokens. Decode
  attention rotates its gathered copy of the sink keys forward by that many positions
  (engine/model/attention.py `rotate_sink_keys`); the pool keeps the original rotation.

The prompt is prefilled with full attention (it must fit the pool); eviction starts with the first decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.checks import check_int
from engine.core.errors import RequestError

POSITION_MODES = ("original", "streaming")
KIND = "sink_window"
KV_POLICY_PATTERN = rf"^{KIND}:[0-9]+:[0-9]+(:({'|'.join(POSITION_MODES)}))?$"  # the string form, for schemas


@dataclass(frozen=True)
class KVPolicy:
    """Keep the first `sink` and the last `window` tokens' K/V; `positions` "original" or "streaming"."""

    sink: int
    window: int
    positions: str = "original"

    def __post_init__(self) -> None:
        check_int("kv_policy.sink", self.sink, 0)
        check_int("kv_policy.window", self.window, 1)
        if self.positions not in POSITION_MODES:
            raise RequestError("kv_policy.positions", f"kv_policy.positions must be one of "
                                                      f"{', '.join(POSITION_MODES)}, got {self.positions!r}")

    @classmethod
    def parse(cls, spec: str, param: str = "kv_policy") -> KVPolicy:
        """`"sink_window:S:W"` or `"sink_window:S:W:streaming"` (or `:original`)."""
        parts = spec.split(":") if isinstance(spec, str) else []
        if len(parts) not in (3, 4) or parts[0] != KIND or not all(p.isdigit() for p in parts[1:3]):
            raise RequestError(param, f"{param} must look like 'sink_window:4:1020' or "
                                      f"'sink_window:4:1020:streaming', got {spec!r}")
        return cls(int(parts[1]), int(parts[2]), *parts[3:])

    @classmethod
    def coerce(cls, value: KVPolicy | str | None, param: str = "kv_policy") -> KVPolicy | None:
        """None, a `KVPolicy`, or its string form, as a `KVPolicy` (None stays None)."""
        if value is None or isinstance(value, KVPolicy):
            return value
        if isinstance(value, str):
            return cls.parse(value, param)
        raise RequestError(param, f"{param} must be a string like 'sink_window:4:1020', a KVPolicy or None, "
                                  f"got {type(value).__name__}")

    def __str__(self) -> str:
        return f"{KIND}:{self.sink}:{self.window}" + (":streaming" if self.positions == "streaming" else "")

    @property
    def streaming(self) -> bool:
        return self.positions == "streaming"

    def sink_blocks(self, block_size: int) -> int:
        """Leading blocks that are never evicted (whole blocks: `sink` rounded up)."""
        return -(-self.sink // block_size)

    def first_window_block(self, num_tokens: int, block_size: int) -> int:
        """The first block the newest token's window reads when the sequence has `num_tokens` tokens: the
        blocks from `sink_blocks` up to this one are the evicted ones."""
        return max(self.sink_blocks(block_size), (num_tokens - self.window) // block_size)

    def max_blocks(self, block_size: int) -> int:
        """The most blocks a decoding sequence holds: its sink blocks, the window's blocks, and one more when
        the window does not start on a block boundary."""
        return self.sink_blocks(block_size) + -(-self.window // block_size) + 1
