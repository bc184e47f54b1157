"""kvmini: a small, readable inference engine for LLaMA-family models with a paged KV cache."""

from engine.capture import AttentionCapture, Span, char_spans
from engine.errors import CacheFullError, CheckpointError, EngineDeadError, RequestError, RequestTooLargeError
from engine.kv_policy import KVPolicy
from engine.llm import LLM
from engine.outputs import AttentionRows, RequestOutput, SpanMasses, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.session import Session, Step
from engine.structured import StructuredOutput

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
