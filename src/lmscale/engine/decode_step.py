"""The compiled decode step: one new token for each of B rows, in one static-shape graph.

Decoding is a loop of tiny steps, so in eager PyTorch it is bound by dispatching ~600 small ops
and by the BLAS's matrix-vector products. `DecodeStep` runs the model's own forward (no second
model definition) under `torch.compile`, over a KV pool addressed by position:

    inputs   tokens (B,)  positions (B,)  block_tables (B, nb)  key_positions (S,) = 0..S-1
    layer i  write k, v at pool[block_tables[b, pos // bs], :, pos % bs]
             read keys s < S as pool[block_tables[b, s // bs], :, s % bs], masked to s <= pos
    output   (B, vocab) fp32 logits

The pool is the engine's paged one ((n_blocks, nkv, block_size, hs) per layer), or a contiguous
`KVCache` seen as a pool of B blocks of max_len positions each. Rows, positions and block tables
are tensors, so one graph serves every step; S (the keys read) and the table width change from
step to step and are marked dynamic, so they cost no recompilation. The batch is padded to a
bucket (1, 2, 4, 8, ...): padded rows write into a scratch block the caller names. On CUDA,
`mode="reduce-overhead"` captures one CUDA graph per bucket.

Compiled linear layers read their weights through `matvec` at a few rows (see
`lmscale.model.layout`). Attention keeps its two matmuls: a contiguous cache is read as a slice
(no copy); a paged pool's keys are gathered per layer (the cost that grows with the batch).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmscale.engine.direct_graph import CapturingInductor, DirectGraph
from lmscale.model import Transformer
from lmscale.model.layout import MATVEC_MAX_ROWS, compiled_layout_

_COMPILING = threading.Lock()
"""Held while any `DecodeStep` compiles."""

KEY_BUCKET = 64
"""Keys read per step are rounded up to a multiple of this (fewer CUDA graphs; on a CPU the
masked extra keys cost a little reading)."""


def batch_bucket(n: int) -> int:
    """The padded batch size of `n` rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def use_compile_cache() -> Path:
    """Point inductor's on-disk cache at the user's cache folder (unless already set).

    The compiled kernels and graphs are kept there, so a second process starts in seconds.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmscale/inductor"
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class DecodeBatch:
    """One decode step's attention metadata, every field a tensor on the model's device."""

    tokens: Tensor
    """(B,) the token each row feeds."""
    positions: Tensor
    """(B,) its position in its sequence."""
    block_tables: Tensor
    """(B, nb) each row's blocks in order, padded with any valid block (masked)."""
    key_positions: Tensor
    """(S,) 0..S-1: the key positions every row reads (S >= max position + 1)."""
    contiguous: bool
    """The pools are a contiguous `KVCache`'s (row b is block b), not a paged pool."""


class PoolDecodeView:
    """The model's cache interface over per-layer pools, for one `DecodeBatch`."""

    def __init__(self, k_pools: list[Tensor], v_pools: list[Tensor], batch: DecodeBatch):
        self.k_pools, self.v_pools, self.batch = k_pools, v_pools, batch

    def layer(self, index: int) -> PoolLayerView:
        return PoolLayerView(self.k_pools[index], self.v_pools[index], self.batch)

    def advance(self, n: int) -> None:
        """Nothing to do: positions are inputs, the caller tracks lengths."""


class PoolLayerView:
    def __init__(self, k_pool: Tensor, v_pool: Tensor, batch: DecodeBatch):
        self.k_pool, self.v_pool, self.batch = k_pool, v_pool, batch

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write the (B, nkv, 1, hs) new keys and values; return every row's (B, nkv, S, hs)."""
        batch, block_size = self.batch, self.k_pool.shape[2]
        pos = batch.positions
        blocks = batch.block_tables.gather(1, (pos // block_size)[:, None])[:, 0]  # (B,)
        self.k_pool[blocks, :, pos % block_size] = k[:, :, 0]
        self.v_pool[blocks, :, pos % block_size] = v[:, :, 0]
        keys = batch.key_positions
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
        if batch.contiguous:  # a `KVCache`: row b is block b, keys are read without a gather
            n_rows, n_keys = pos.shape[0], keys.shape[0]
            return self.k_pool[:n_rows, :, :n_keys], self.v_pool[:n_rows, :, :n_keys], mask
        key_blocks = batch.block_tables[:, keys // block_size]  # (B, S)
        offsets = keys % block_size  # (S,)
        # pool[(B, S) blocks, :, (S,) offsets] -> (B, S, nkv, hs)
        k_all = self.k_pool[key_blocks, :, offsets].transpose(1, 2)
        v_all = self.v_pool[key_blocks, :, offsets].transpose(1, 2)
        return k_all, v_all, mask


class DecodeStep:
    """A model's compiled single-token step over KV pools.

    Graphs are compiled on first use of a shape family, or ahead of time by `warm_up` (which a
    server runs in a background thread while its first requests decode eagerly). Families:
    on a CPU the batch size is dynamic, so there are three graphs (batch 1; 2-4 rows, whose
    linear layers run as `matvec`; 8 rows and more, as matrix products); on CUDA one graph per
    batch bucket (CUDA graphs need fixed shapes).

    Args:
        model: the model (in eval mode); its plain linear layers become `CompiledLinear`.
        verbose: print a line to stderr when a graph is compiled, with the seconds it took.
    """

    def __init__(self, model: Transformer, verbose: bool = False):
        self.model = compiled_layout_(model)
        self.device = model.tok_embeddings.weight.device
        self.verbose = verbose
        self.cache_dir = use_compile_cache()
        self._cuda = self.device.type == "cuda"
        self._graphs: dict[bool, object] = {}  # batch 1 or not -> compiled `_forward` (see there)
        self._backends: dict[bool, CapturingInductor] = {}
        self._direct: dict[tuple, DirectGraph] = {}  # family -> its graph, called without dynamo
        self._ready: set[tuple] = set()
        self.compile_seconds: dict[tuple, float] = {}
        """Seconds each graph family took to compile (or to load from the on-disk cache)."""

    def _batch_one(self, family: tuple) -> bool:
        """Whether `family` is the CPU batch-1 graph, the one `generate` and `chat` run."""
        return family[0] == 1 and not self._cuda

    def _compiled(self, family: tuple):
        """The compiled `_forward` for `family` (made on first use, under the lock).

        NOTE: dynamo and inductor are imported here, not at construction: that takes seconds.
        The CPU batch-1 graph is compiled with inductor's C++ wrapper, which calls its ~300
        kernels without a Python line each: batch-1 float32 decode of SmolLM2 +24%, int4 +18%
        (2 cores). The batched graphs are not: at 32 rows in process the C++ wrapper ran 139
        tok/s against 162 without. On a CPU every graph is kept (`CapturingInductor`) and then
        called directly (`DirectGraph`): dynamo's own per-call work was ~2 ms of a 12 ms step.
        """
        one = self._batch_one(family)
        if one not in self._graphs:
            # NOTE: every model (and dtype) a process decodes adds up to four graphs of the one
            # `_forward`; past dynamo's default of 8 it would silently fall back to eager.
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            from lmscale.kernels.fusion import FuseSharedInputMatvecs  # imports inductor

            # NOTE: torch.compile takes a mode or options, not both; the pass (q/k/v and gate/up
            # of quantized layers in one kernel call each) concerns CPU kernels only.
            if self._cuda:
                self._graphs[one] = torch.compile(
                    self._forward, mode="reduce-overhead", fullgraph=True, dynamic=False
                )  # fmt: skip
            else:
                self._backends[one] = backend = CapturingInductor({
                    "post_grad_custom_post_pass": FuseSharedInputMatvecs(), "cpp_wrapper": one,
                })  # fmt: skip
                self._graphs[one] = torch.compile(
                    self._forward, backend=backend, fullgraph=True, dynamic=False
                )  # fmt: skip
        return self._graphs[one]

    @property
    def graphs_compiled(self) -> int:
        """Graphs compiled on a CPU so far, any recompilation by dynamo included."""
        return sum(len(backend.graphs) for backend in self._backends.values())

    def family(self, n_rows: int, contiguous: bool) -> tuple:
        """The graph that serves a batch of `n_rows` (see the class docstring)."""
        bucket = batch_bucket(n_rows)
        if not self._cuda:
            bucket = 1 if bucket == 1 else (4 if bucket <= MATVEC_MAX_ROWS else 8)
        return (bucket, contiguous)

    def is_ready(self, n_rows: int, contiguous: bool = False) -> bool:
        """Whether the graph for this batch is compiled (a call would not stall to compile)."""
        return self.family(n_rows, contiguous) in self._ready

    def _forward(
        self, tokens: Tensor, positions: Tensor, block_tables: Tensor, key_positions: Tensor,
        k_pools: list[Tensor], v_pools: list[Tensor], contiguous: bool,
    ) -> Tensor:  # fmt: skip
        batch = DecodeBatch(tokens, positions, block_tables, key_positions, contiguous)
        view = PoolDecodeView(k_pools, v_pools, batch)
        hidden = self.model.hidden_states(tokens[:, None], view, positions[:, None])  # (B, 1, dim)
        return self.model.output(hidden[:, 0]).float()  # (B, vocab)

    @torch.inference_mode()
    def __call__(
        self, tokens: list[int], positions: list[int], block_tables: list[list[int]],
        k_pools: list[Tensor], v_pools: list[Tensor], scratch_block: int = 0,
        contiguous: bool = False,
    ) -> Tensor:  # fmt: skip
        """Feed one token per row; (B, vocab) fp32 logits of the real rows.

        Args:
            tokens, positions: of each row.
            block_tables: each row's blocks (covering its position).
            k_pools, v_pools: per layer, (n_blocks, nkv, block_size, hs).
            scratch_block: a block padded rows may write into (its contents are never read).
            contiguous: the pools are a `KVCache`'s, (B, nkv, max_len, hs): row b is block b
                (pass block tables [[0], [1], ...]) and its keys are read without a gather.
        """
        n = len(tokens)
        family = self.family(n, contiguous)
        block_size = k_pools[0].shape[2]
        # NOTE: a contiguous pool read up to its last key is a view of another layout (itself
        # contiguous), which dynamo would compile as a second graph (minutes, for a real
        # model): the graph reads all but the last key, and a step at the last position of
        # the cache runs eagerly.
        if contiguous and max(positions) + 1 >= block_size:  # the cache's last position
            inputs = self._inputs(tokens, positions, block_tables, block_size, scratch_block)
            return self._forward(*inputs, k_pools, v_pools, contiguous)[:n]  # eagerly (above)
        inputs = self._inputs(
            tokens, positions, block_tables, block_size, scratch_block, spare_key=contiguous
        )  # fmt: skip
        if not contiguous and inputs[2].shape[1] == 1:  # NOTE: width 1 would be another graph
            inputs = (inputs[0], inputs[1], inputs[2].expand(-1, 2).contiguous(), inputs[3])
        direct = self._direct.get(family)
        if direct is not None:
            outputs = direct(self._arguments(inputs, k_pools, v_pools, contiguous))
            if outputs is not None:
                return outputs[0][:n]
        self._mark_dynamic(inputs, k_pools, v_pools, contiguous)
        if family in self._ready:
            return self._compiled(family)(*inputs, k_pools, v_pools, contiguous)[:n]
        with _COMPILING:  # one compilation at a time (a warm-up thread may be compiling)
            start = time.perf_counter()
            if self.verbose:
                print(f"compiling the decode step for {n} rows ...", file=sys.stderr, flush=True)
            graph = self._compiled(family)
            backend = self._backends.get(self._batch_one(family))
            known = len(backend.graphs) if backend is not None else 0
            logits = graph(*inputs, k_pools, v_pools, contiguous)[:n]
            if backend is not None and len(backend.graphs) == known + 1:  # this call's graph
                try:
                    self._direct[family] = DirectGraph(backend.graphs[-1], {"self": self})
                except ValueError:  # an input it cannot read: dynamo calls this graph
                    pass
            self.compile_seconds[family] = seconds = time.perf_counter() - start
            self._ready.add(family)
        if self.verbose:
            print(f"compiled the decode step in {seconds:.1f} s", file=sys.stderr, flush=True)
        return logits

    def _arguments(self, inputs, k_pools, v_pools, contiguous: bool) -> dict:
        """`_forward`'s arguments by name, as a graph's input sources read them."""
        tokens, positions, block_tables, key_positions = inputs
        return {
            "self": self, "tokens": tokens, "positions": positions,
            "block_tables": block_tables, "key_positions": key_positions,
            "k_pools": k_pools, "v_pools": v_pools, "contiguous": contiguous,
        }  # fmt: skip

    def _inputs(self, tokens, positions, block_tables, block_size, scratch_block, spare_key=False):
        """The graph's tensor inputs; `spare_key`: read at most all but the pool's last key."""
        n = len(tokens)
        bucket = batch_bucket(n)
        width = max(len(t) for t in block_tables)
        room = width * block_size - spare_key
        keys = min(-(-(max(positions) + 1) // KEY_BUCKET) * KEY_BUCKET, room)
        tables = torch.full((bucket, width), scratch_block, dtype=torch.long)
        for b, table in enumerate(block_tables):
            tables[b, : len(table)] = torch.tensor(table)
        pad = bucket - n
        inputs = (
            torch.tensor(tokens + [0] * pad), torch.tensor(positions + [0] * pad), tables,
            torch.arange(keys),
        )  # fmt: skip
        return tuple(t.to(self.device) for t in inputs)

    def _mark_dynamic(self, inputs, k_pools, v_pools, contiguous: bool) -> None:
        """Sizes that change from step to step become symbols of the graph, not recompiles."""
        mark = torch._dynamo.maybe_mark_dynamic
        tokens, positions, tables, keys = inputs
        mark(keys, 0)
        if not contiguous:
            mark(tables, 1)
        if not self._cuda and tokens.shape[0] > 1:
            for tensor in (tokens, positions, tables):
                mark(tensor, 0)
        for pool in (*k_pools, *v_pools):  # pools of any size share the graph
            mark(pool, 2 if contiguous else 0)

    def warm_up(self, pool_shape: tuple[int, ...], n_layers: int, dtype: torch.dtype) -> None:
        """Compile every graph family a server meets, on a throwaway pool of `pool_shape`."""

        def pools() -> list[Tensor]:  # NOTE: distinct tensors, as real pools are (no aliasing)
            return [
                torch.zeros(pool_shape, dtype=dtype, device=self.device) for _ in range(n_layers)
            ]

        k_pools, v_pools = pools(), pools()
        rows = (1, 2, 8) if not self._cuda else (1, 2, 4, 8, 16, 32, 64)
        for n in rows:
            if not self.is_ready(n):
                self([0] * n, [1] * n, [[0, 0]] * n, k_pools, v_pools)
