"""Generation: sampling, and decoding through the KV cache."""

from lmscale.engine.generate import generate_ids, stream_text
from lmscale.engine.sampling import SamplingParams, sample_next

__all__ = ["SamplingParams", "generate_ids", "sample_next", "stream_text"]
