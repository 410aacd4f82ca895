"""The model runner: turns a scheduled batch into tensors, runs the model, returns logits.

It knows nothing of sampling or of why a request is in the batch; rows at different lengths are
padded to the longest and kept apart by the paged cache's mask and per-row positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmscale.engine.decode_step import DecodeStep
from lmscale.engine.paged_cache import PagedKVCache, batch_layout
from lmscale.engine.request import Request
from lmscale.model import Transformer


class ModelRunner:
    """Runs `model` over batches of requests whose keys and values live in `pool`.

    Args:
        model, pool: the model and its KV pool.
        step: a compiled decode step of `model`, for batches of one token per row; None: eager.
    """

    def __init__(self, model: Transformer, pool: PagedKVCache, step: DecodeStep | None = None):
        self.model, self.pool, self.step = model, pool, step
        self.device = model.tok_embeddings.weight.device
        self.compile_inline = True
        """Whether a decode batch whose graph is not compiled yet compiles it now (False while
        a warm-up thread compiles: such batches run eagerly meanwhile)."""

    @torch.inference_mode()
    def run(self, requests: Sequence[Request], n_tokens: Sequence[int]) -> Tensor:
        """Compute the next `n_tokens[b]` tokens of each request into the cache.

        Each request's blocks must already cover `num_computed + n_tokens[b]` positions.

        Returns:
            (B, vocab) fp32 logits at each request's last computed position.
        """
        if self._compiled(requests, n_tokens):
            return self.step(
                [r.all_ids[r.num_computed] for r in requests],
                [r.num_computed for r in requests], [r.blocks for r in requests],
                self.pool.k, self.pool.v, self.pool.scratch_block,
            )  # fmt: skip
        B, T = len(requests), max(n_tokens)
        tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T), padded with token 0
        for b, (request, n) in enumerate(zip(requests, n_tokens, strict=True)):
            start = request.num_computed
            tokens[b, :n] = torch.tensor(request.all_ids[start : start + n])
        layout, positions = batch_layout(
            [r.blocks for r in requests], [r.num_computed for r in requests], list(n_tokens),
            self.pool.block_size, self.device,
        )  # fmt: skip
        cache = self.pool.view(layout)
        hidden = self.model.hidden_states(tokens.to(self.device), cache, positions)  # (B, T, dim)
        last = torch.tensor(n_tokens, device=self.device) - 1
        # NOTE: only the last position of each row is projected onto the vocabulary: for a small
        # model that projection of a whole prompt would cost more than the prefill itself.
        return self.model.output(hidden[torch.arange(B, device=self.device), last]).float()

    def _compiled(self, requests: Sequence[Request], n_tokens: Sequence[int]) -> bool:
        if self.step is None or max(n_tokens) != 1:
            return False
        return self.compile_inline or self.step.is_ready(len(requests))
