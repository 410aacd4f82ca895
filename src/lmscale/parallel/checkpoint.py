"""Checkpoints of distributed runs: every rank writes its shards with `torch.distributed.checkpoint`.

Model and optimizer state are saved under parameter names (not positions), as DTensors where they
are sharded, so a run saved on N processes loads on M processes with any strategy: DCP reshards
while reading. The format is described in `lmscale.checkpoint.sharded`; a save appears atomically
(all ranks write into a temp directory, rank 0 renames it into place once every shard is on disk).
"""

from __future__ import annotations

import base64
import copy
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from lmscale.checkpoint.native import (
    clear_leftovers,
    fsync_file,
    publish_checkpoint,
    temp_checkpoint_dir,
    write_text,
)
from lmscale.checkpoint.sharded import SHARDS_DIR
from lmscale.errors import LmscaleError


def save_sharded(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict,
    tokenizer_json: str | None,
    train_state: dict,
    keep: int | None = None,
) -> Path:
    """Save a checkpoint of `step` from every rank (a collective: all ranks must call it).

    Args:
        directory: the run's checkpoints folder (shared by all ranks).
        model: the parallelized model (FSDP/TP-sharded, or the module inside DDP).
        config, tokenizer_json: written by rank 0 as in the native format.
        train_state: JSON-able state (step, loader position); each rank's RNG state is added.
        keep: delete all but the newest `keep` checkpoints after the save.
    """
    directory = Path(directory)
    rank, world = _rank(), _world()
    tmp = temp_checkpoint_dir(directory, step, tag="sharded")
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        clear_leftovers(directory)  # also the temp dir of a save a killed run left behind
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDS_DIR))
    rngs = _all_gather(_rng_state())
    final = directory / f"step_{step:08d}"
    if rank == 0:
        for path in (tmp / SHARDS_DIR).iterdir():
            fsync_file(path)
        write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        if tokenizer_json is not None:
            write_text(tmp / "tokenizer.json", tokenizer_json)
        state = train_state | {"step": step, "world_size": world, "rng": rngs}
        write_text(tmp / "train_state.json", json.dumps(state) + "\n")
        publish_checkpoint(tmp, final, keep)
    _barrier()
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint into this rank's part of `model` and `optimizer`.

    Any world size and strategy may load it (one process without a process group, too). Each
    rank's RNG state comes back when the world size is the one that saved.

    Returns:
        The JSON train state (step, loader position, ...).
    """
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    # NOTE: DCP keeps one copy of the non-tensor entries, rank 0's: under pipeline parallel its
    # param_groups name only its own stage's parameters. This rank's own groups (the
    # hyperparameters come from the config and the schedule anyway) say which are here.
    own_groups = copy.deepcopy(optim_state["param_groups"])
    state = {"model": model_state, "optim": optim_state}
    try:
        renamed = _read_tied_output_as_embedding(state, path / SHARDS_DIR)
        with warnings.catch_warnings():  # one process without a group: DCP says so, needlessly
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path / SHARDS_DIR), no_dist=not dist.is_initialized())
    except Exception as error:  # DCP wraps a missing or damaged shard in several error types
        raise LmscaleError(f"cannot load the sharded checkpoint {path}: {error}") from None
    for part in renamed:
        part[TIED_OUTPUT] = part.pop(TIED_EMBEDDING)
    state["optim"]["param_groups"] = own_groups
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    train_state = json.loads((path / "train_state.json").read_text())
    rngs = train_state.get("rng") or []
    if train_state.get("world_size") == _world() and len(rngs) == _world():
        _set_rng_state(rngs[_rank()])
    return train_state


TIED_OUTPUT, TIED_EMBEDDING = "output.weight", "tok_embeddings.weight"


def _read_tied_output_as_embedding(state: dict, shards: Path) -> list[dict]:
    """Point a tied output weight at the embedding's saved values where only those were saved.

    A pipeline's last stage holds its own copy of a tied embedding, named `output.weight`; a
    run that held the two as one tensor saved its optimizer state once, under the embedding's
    name. Returns the parts of `state` renamed (to rename back after loading).
    """
    saved = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    renamed = []
    for prefix, part in (("model.", state["model"]), ("optim.state.", state["optim"]["state"])):
        if TIED_OUTPUT not in part or TIED_EMBEDDING in part:
            continue
        if not any(k.startswith(prefix + TIED_OUTPUT) for k in saved):
            part[TIED_EMBEDDING] = part.pop(TIED_OUTPUT)
            renamed.append(part)
    return renamed


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optim_state: dict,
) -> None:
    """Load a single-process (native) checkpoint's full state into a parallelized model.

    The native optimizer state is keyed by position in the optimizer's parameter groups; the
    groups hold the same parameters in the same order here (sharding keeps the order), so the
    positions translate to names, which `set_optimizer_state_dict` shards.
    """
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=full)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[int(i)]: value for i, value in optim_state["state"].items()},
        "param_groups": [
            group | {"params": [order[int(i)] for i in group["params"]]}
            for group in optim_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def _rng_state() -> dict[str, str]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in state.items()}


def _set_rng_state(state: dict[str, str]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(value: object) -> list:
    if not dist.is_initialized():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
