"""Reading the checkpoints of distributed runs on one process, without a process group.

A distributed run saves with `torch.distributed.checkpoint` (DCP), each rank writing its shards:

    step_00000100/
        config.json, tokenizer.json     as in the native format
        train_state.json                step, loader position, world size, per-rank RNG
        dcp/.metadata, dcp/__0_0.distcp ...   {"model": {...}, "optim": {...}} as sharded tensors

DCP's metadata records every tensor's global shape and dtype, so one process can gather the full
weights from any number of shards (the saving side lives in `lmscale.parallel.checkpoint`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

SHARDS_DIR = "dcp"
MODEL_PREFIX = "model."


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a checkpoint written by a distributed run."""
    return (Path(path) / SHARDS_DIR / ".metadata").is_file()


def read_sharded_model_state(path: str | Path) -> dict[str, Tensor]:
    """The full model weights of a sharded checkpoint, under lmscale's parameter names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(path) / SHARDS_DIR))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # DCP warns that it reads on one process: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(MODEL_PREFIX) :]: tensor for key, tensor in state.items()}
