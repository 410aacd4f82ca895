"""Read prepared token shards and serve training batches: deterministic, rank-aware, resumable.

Sampling, per epoch `e`:

    stream:   |off| w0 | w1 | w2 | w3 | w4 | w5 | ... |rest|     each window = context+1 tokens
    off = random in [0, context] from (seed, e); windows permuted by a generator from (seed, e)
    step s:   global batch = permuted windows [s*G, (s+1)*G), G = world_size * batch_size
              rank r takes rows [r*batch_size, (r+1)*batch_size) of it

So ranks are disjoint, and together see exactly what one rank with batch G would see. A partial
last global batch is dropped; the next epoch then starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscale.data.manifest import Manifest
from lmscale.errors import LmscaleError


class TokenDataset:
    """The tokens of one split of a prepared data folder, memory-mapped.

    Args:
        data_dir: the folder `prepare` wrote.
        split: `"train"` or `"val"`.
        verify: check shard sizes and checksums against the manifest first.
    """

    def __init__(self, data_dir: str | Path, split: str, verify: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir, verify=verify)
        if split not in self.manifest.splits:
            known = ", ".join(sorted(self.manifest.splits))
            raise LmscaleError(f"unknown split {split!r} in {self.data_dir} (has: {known})")
        self.split = split
        self.tokens = self._map_tokens()

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest.tokenizer

    def __len__(self) -> int:
        return len(self.tokens)

    def _map_tokens(self) -> np.ndarray:
        dtype = np.dtype(self.manifest.dtype)
        shards = self.manifest.splits[self.split].shards
        maps = [
            np.memmap(self.data_dir / s.file, dtype=dtype, mode="r", shape=(s.tokens,))
            for s in shards
            if s.tokens
        ]
        if not maps:
            return np.zeros(0, dtype=dtype)
        # One shard stays a memmap; several are joined in memory (fine at our corpus sizes).
        return maps[0] if len(maps) == 1 else np.concatenate(maps)


class Loader:
    """Batches of `(inputs, targets)` from a `TokenDataset`; see the module docstring.

    Args:
        dataset: the tokens to sample from.
        batch_size: windows per batch on this rank.
        context: tokens per row; each window holds `context + 1` tokens.
        seed: seeds window offsets and order; same seed, same batches.
        rank: this process's rank in [0, world_size).
        world_size: number of ranks sharing each global batch.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        context: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(batch_size=batch_size, context=context, world_size=world_size)
        if not isinstance(seed, int) or seed < 0:
            raise LmscaleError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise LmscaleError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.tokens = dataset.tokens
        self.batch_size, self.context, self.seed = batch_size, context, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self._check_enough_data()
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, np.ndarray] | None = None  # (epoch, window starts in order)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `(inputs, targets)`, int64 tensors of shape (batch_size, context)."""
        starts = self._epoch_starts()
        if (self.position + 1) * self.global_batch > len(starts):
            self.epoch, self.position = self.epoch + 1, 0
            starts = self._epoch_starts()
        first = self.position * self.global_batch + self.rank * self.batch_size
        mine = starts[first : first + self.batch_size]  # (B,)
        self.position += 1
        window = mine[:, None] + np.arange(self.context + 1)  # (B, context+1)
        rows = torch.from_numpy(self.tokens[window].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, as plain JSON values; the same on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "context": self.context,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the following batches are those that would have come.

        The saving loader may have had another world size: what carries over is the number of
        windows of the epoch already served, which must fill whole global batches of this one.
        """
        for key in ("seed", "context"):
            if state.get(key) != getattr(self, key):
                raise LmscaleError(
                    f"loader state has {key}={state.get(key)!r}, this loader has "
                    f"{getattr(self, key)!r}; resume with the same data settings"
                )
        served = int(state["position"]) * int(state["global_batch"])
        if served % self.global_batch:
            raise LmscaleError(
                f"the saved loader had served {served} windows of its epoch, not a whole number "
                f"of this loader's global batches of {self.global_batch}; resume with a global "
                "batch that divides it"
            )
        self.epoch, self.position = int(state["epoch"]), served // self.global_batch

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Start positions of epoch `epoch`'s windows, in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch])
        window = self.context + 1
        offset = int(rng.integers(0, self.context + 1))
        n_windows = (len(self.tokens) - offset) // window
        return offset + rng.permutation(n_windows) * window

    def _epoch_starts(self) -> np.ndarray:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.epoch_starts(self.epoch))
        return self._plan[1]

    def _check_enough_data(self) -> None:
        # The worst epoch starts at offset `context`; it must still fill one global batch.
        windows = max(0, len(self.tokens) - self.context) // (self.context + 1)
        if windows < self.global_batch:
            raise LmscaleError(
                f"too little data for one global batch: {len(self.tokens)} tokens give "
                f"{windows} windows of context+1={self.context + 1}, need "
                f"{self.global_batch} (batch_size {self.batch_size} x world_size "
                f"{self.world_size})"
            )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LmscaleError(f"{name} must be a positive integer, got {value!r}")
