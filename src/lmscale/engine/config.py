"""The serving engine's knobs: the KV pool, prefix caching, the step budgets, the queue bound."""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError


@dataclass
class EngineConfig:
    """How much the engine may hold and do at once."""

    block_size: int = 16
    """Positions per KV-cache block."""
    kv_cache_bytes: int = 256 * 2**20
    """Memory for the KV pool (keys and values of every layer); ignored when `n_blocks` is set.
    Never more is allocated than `max_num_seqs` full-context sequences need."""
    n_blocks: int | None = None
    """The KV pool's size in blocks, overriding `kv_cache_bytes`."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: prompt tokens prefilled plus one per decoding request. A prompt
    longer than what is left of it is prefilled in chunks over several steps."""
    max_num_seqs: int = 64
    """The most requests in the running batch."""
    max_waiting: int = 256
    """The most requests waiting to start; past it, submitting raises `QueueFullError`."""
    compiled_decode: bool = False
    """Run decode steps (one token per row) through the compiled `DecodeStep`; prompts are
    prefilled eagerly. The first step of each batch-size family compiles its graph (seconds with
    a warm on-disk cache, a minute or more without) unless `LLMEngine.warm_up` ran first."""
    compiled_decode_verbose: bool = False
    """Print a line to stderr when the decode step compiles a graph, with its seconds."""
    enable_prefix_caching: bool = True
    """Keep full KV blocks keyed by their prefix and reuse them for later requests that start
    with the same tokens (shared system prompts, earlier chat turns) instead of recomputing them."""

    def __post_init__(self) -> None:
        positive = ("block_size", "kv_cache_bytes", "max_num_batched_tokens", "max_num_seqs")
        for name in positive:
            if getattr(self, name) < 1:
                raise LmscaleError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_blocks is not None and self.n_blocks < 1:
            raise LmscaleError(f"n_blocks must be positive, got {self.n_blocks}")
        if self.max_waiting < 0:
            raise LmscaleError(f"max_waiting must not be negative, got {self.max_waiting}")
