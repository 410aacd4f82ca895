"""The strategy table, mesh shapes, batch arithmetic and the launcher's command line."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.parallel import ParallelConfig, Ranks
from lmscale.parallel.launch import torchrun_command
from lmscale.parallel.mesh import mesh_shape
from lmscale.train.config import TrainConfig, load_run_config


@pytest.mark.parametrize(
    "strategy, extra, world, local, shape",
    [
        ("ddp", {}, 4, 4, {"dp_replicate": 4}),
        ("fsdp", {}, 8, 8, {"dp_shard": 8}),
        ("hsdp", {}, 16, 8, {"dp_replicate": 2, "dp_shard": 8}),  # shard within a node
        ("hsdp", {"dp_shard": 2}, 4, 4, {"dp_replicate": 2, "dp_shard": 2}),
        ("tp", {}, 2, 2, {"tp": 2}),
        ("fsdp+tp", {"tp": 2}, 16, 8, {"dp_shard": 8, "tp": 2}),
    ],
)
def test_mesh_shapes(strategy, extra, world, local, shape):
    config = ParallelConfig(strategy=strategy, **extra)
    assert mesh_shape(strategy, config, Ranks(0, world, 0, local)) == shape


def test_auto_strategy_and_bad_settings():
    assert ParallelConfig().resolved_strategy(1) == "none"
    assert ParallelConfig().resolved_strategy(4) == "fsdp"
    with pytest.raises(LmscaleError, match="runs on one process"):
        ParallelConfig(strategy="none").resolved_strategy(2)
    with pytest.raises(LmscaleError, match="parallel.strategy must be one of"):
        ParallelConfig(strategy="zero3")
    with pytest.raises(LmscaleError, match="does not divide the 6 processes"):
        mesh_shape("fsdp+tp", ParallelConfig(strategy="fsdp+tp", tp=4), Ranks(0, 6, 0, 6))
    with pytest.raises(LmscaleError, match="parallel.timeout_s"):
        ParallelConfig(timeout_s=0)


def test_global_batch_fixes_the_accumulation_at_any_world_size():
    cfg = TrainConfig(batch_size=2, global_batch_size=16)
    assert [cfg.accumulation_steps(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LmscaleError, match="not a multiple"):
        cfg.accumulation_steps(3)
    assert TrainConfig(grad_accum_steps=3).accumulation_steps(4) == 3


def test_parallel_section_in_run_config():
    config = load_run_config(
        "configs/tiny.toml", ["--parallel.strategy", "fsdp+tp", "--parallel.tp", "2"]
    )
    assert (config.parallel.strategy, config.parallel.tp) == ("fsdp+tp", 2)
    assert "[parallel]" in config.to_toml()


def test_torchrun_command_runs_the_train_module():
    command = torchrun_command(4, ["--config", "c.toml"], max_restarts=2)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in command and "--max-restarts=2" in command
    assert command[-4:] == ["-m", "lmscale.train", "--config", "c.toml"]
    with pytest.raises(LmscaleError, match="--nproc"):
        torchrun_command(0, [])
