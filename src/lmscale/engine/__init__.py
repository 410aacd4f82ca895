"""Generation: sampling, and decoding through the KV cache."""

from lmscale.engine.chat import ChatSession
from lmscale.engine.generate import continue_ids, generate_ids, stream_text
from lmscale.engine.sampling import SamplingParams, sample_next

__all__ = [
    "ChatSession",
    "SamplingParams",
    "continue_ids",
    "generate_ids",
    "sample_next",
    "stream_text",
]
