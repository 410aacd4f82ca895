"""Generation: sampling, decoding through the KV cache, and the continuous-batching engine."""

from lmscale.engine.async_engine import AsyncEngine
from lmscale.engine.chat import ChatSession
from lmscale.engine.config import EngineConfig
from lmscale.engine.engine import EngineStats, LLMEngine
from lmscale.engine.generate import continue_ids, generate_ids, stream_text
from lmscale.engine.request import (
    EngineDeadError,
    EngineUnavailableError,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    RequestParams,
    TokenLogprob,
)
from lmscale.engine.sampling import SamplingParams, sample_next

__all__ = [
    "AsyncEngine",
    "ChatSession",
    "EngineConfig",
    "EngineDeadError",
    "EngineUnavailableError",
    "EngineStats",
    "GenerationRequest",
    "LLMEngine",
    "QueueFullError",
    "RequestOutput",
    "RequestParams",
    "SamplingParams",
    "TokenLogprob",
    "continue_ids",
    "generate_ids",
    "sample_next",
    "stream_text",
]
