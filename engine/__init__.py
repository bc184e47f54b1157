"""kvmini: a small, readable inference engine for LLaMA-family models with a paged KV cache."""

from engine.api.llm import LLM
from engine.api.session import Session, Step
from engine.cache.kv_policy import KVPolicy
from engine.capture.request import AttentionCapture, Span, char_spans
from engine.core.errors import CacheFullError, CheckpointError, EngineDeadError, RequestError, RequestTooLargeError
from engine.core.outputs import AttentionRows, RequestOutput, SpanMasses, TokenLogprob
from engine.sampling.params import SamplingParams
from engine.text.structured import StructuredOutput

__all__ = [
    "LLM",
    "AttentionCapture",
    "AttentionRows",
    "CacheFullError",
    "CheckpointError",
    "EngineDeadError",
    "KVPolicy",
    "RequestError",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
    "Span",
    "SpanMasses",
    "Session",
    "Step",
    "StructuredOutput",
    "TokenLogprob",
    "char_spans",
]
