"""Fine-tuning on several processes: which strategies fit an adapter, and starting them.

`lmscale finetune lora --nproc N` starts `python -m lmscale.finetune lora ...` on N processes
through torchrun (as `lmscale train --nproc` does); each joins the process group and the
frozen base plus its adapters is handed to `lmscale.parallel.parallelize` like any model:

    strategy   what each rank holds                          adapter gradients
    ddp        the whole model (a QLoRA base's integers too)  all-reduced (only A and B train)
    fsdp/hsdp  1/N of every parameter, frozen ones included   reduce-scattered (only A and B)

FSDP2 keeps each parameter a DTensor of its own, so frozen base weights and trainable
adapters share a block's shard group; a QLoRA base's integers are buffers, which FSDP leaves
whole on every rank. Tensor parallel is refused: its plan names the plain linear layers that
LoRA wraps.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmscale.config import from_dict, parse_overrides
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import WEIGHTS
from lmscale.finetune.lora import adapter_state_dict
from lmscale.finetune.sft_data import read_chat_jsonl
from lmscale.finetune.shakespeare_chat import NAME as SHAKESPEARE_SPEAKERS
from lmscale.parallel import ParallelConfig, Ranks
from lmscale.parallel.mesh import mesh_shape

if TYPE_CHECKING:
    from lmscale.finetune.sft import SFTConfig

ADAPTER_STRATEGIES = ("none", "ddp", "fsdp", "hsdp")


def parallel_config(overrides: list[str]) -> ParallelConfig:
    """A `ParallelConfig` from `--parallel.FIELD VALUE` arguments (no other section)."""
    sections = parse_overrides(overrides)
    for section, values in sections.items():
        if section != "parallel":
            raise LmscaleError(
                f"unrecognized option '--{section}.{next(iter(values))}' "
                "(fine-tuning takes --parallel.FIELD VALUE overrides only)"
            )
    return from_dict(ParallelConfig, sections.get("parallel", {}), "parallel.")


def adapter_strategy(config: ParallelConfig, world_size: int) -> str:
    """The strategy `config` resolves to on `world_size` processes; one adapters can train under."""
    if config.strategy not in ADAPTER_STRATEGIES + ("auto",):
        raise LmscaleError(
            f"parallel.strategy {config.strategy} is not supported for LoRA fine-tuning "
            "(its plan cannot shard wrapped layers): use ddp, fsdp or hsdp"
        )
    if config.strategy == "none" and world_size > 1:
        raise LmscaleError(
            f"parallel.strategy none runs on one process, but {world_size} were started: "
            "choose ddp, fsdp or hsdp"
        )
    return config.resolved_strategy(world_size)


def check_launch(config: SFTConfig, nproc: int, out: str | Path) -> None:
    """Refuse, before any process starts, what every worker would refuse (an `SFTConfig`)."""
    if nproc < 1:
        raise LmscaleError(f"--nproc must be positive, got {nproc}")
    strategy = adapter_strategy(config.parallel, nproc)
    if strategy != "none":
        mesh_shape(strategy, config.parallel, Ranks(0, nproc, 0, nproc))  # hsdp's divisibility
    if config.batch_size < nproc:
        raise LmscaleError(
            f"--batch-size {config.batch_size} (rows per step) is fewer than --nproc {nproc}"
        )
    if (Path(out) / WEIGHTS).exists():
        raise LmscaleError(f"{out} already holds an adapter: choose a new --out")
    if config.data != SHAKESPEARE_SPEAKERS:
        read_chat_jsonl(config.data)


def full_adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's whole tensors on every rank (a collective under FSDP: all ranks call it)."""
    return {
        key: value.full_tensor() if isinstance(value, DTensor) else value
        for key, value in adapter_state_dict(model).items()
    }


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def worker_args(args: argparse.Namespace, skip: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The parsed `finetune lora` flags again, for the workers.

    NOTE: every flag of `finetune lora` is `--` + its dest with `-` for `_`; store_true flags
    come back when set. A flag added with another spelling needs its own case here.
    """
    out = []
    for dest, value in vars(args).items():
        if dest in skip or callable(value) or dest == "accepts_overrides":
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def launch_finetune(nproc: int, args: list[str]) -> None:
    """Run `lmscale finetune ARGS` on `nproc` processes of this machine through torchrun."""
    from lmscale.parallel.launch import launch

    code = launch(nproc, args, module="lmscale.finetune")
    if code:
        raise LmscaleError(
            f"distributed fine-tuning failed (torchrun exit code {code}); the failing rank's "
            "error is above"
        )
