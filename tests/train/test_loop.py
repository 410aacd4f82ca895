import json
import shutil

import numpy as np
import pytest
import torch

from lmscale.checkpoint import list_checkpoints, load_checkpoint
from lmscale.errors import LmscaleError
from lmscale.train import NonFiniteLoss, load_run_config, train
from lmscale.train.loop import setup, train_step
from lmscale.train.loss import IGNORE_INDEX
from lmscale.train.metrics import read_metrics


def tiny_config(data_dir, *overrides):
    args = ["--data.path", str(data_dir), "--train.log_interval", "1", *overrides]
    return load_run_config("configs/tiny.toml", args)


def test_loss_falls_on_tiny(shakespeare_dir, tmp_path):
    summary = train(
        tiny_config(shakespeare_dir, "--train.max_steps", "40"), tmp_path / "run", progress=False
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert summary.val.perplexity < summary.unigram.perplexity


def test_run_directory_holds_config_metrics_events_and_checkpoints(shakespeare_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shakespeare_dir, "--train.max_steps", "10"), run, progress=False)
    records = read_metrics(run)
    step_keys = {"step", "loss", "lr", "tokens_per_s", "step_time_s", "peak_mem_bytes"}
    assert all(step_keys <= r.keys() for r in records if "loss" in r)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10] and evals[0]["val_ppl"] > 1
    assert load_run_config(run / "config.toml").train.max_steps == 10
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    (ckpt,) = list_checkpoints(run / "checkpoints")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in ckpt.iterdir()
    }


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(shakespeare_dir, tmp_path):
    args = ("--train.max_steps", "12", "--train.checkpoint_interval", "6", "--model.dropout", "0.1")
    straight = tmp_path / "straight"
    train(tiny_config(shakespeare_dir, *args), straight, progress=False)
    # The run "stopped" after step 6: only its first checkpoint survives.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(list_checkpoints(resumed / "checkpoints")[-1])
    summary = train(tiny_config(shakespeare_dir, *args), resumed, resume=True, progress=False)
    assert summary.steps == 12
    expected = load_checkpoint(straight / "checkpoints" / "step_00000012").model_state
    got = load_checkpoint(resumed / "checkpoints" / "step_00000012").model_state
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name


def test_a_new_run_never_overwrites_saved_checkpoints(shakespeare_dir, tmp_path):
    train(tiny_config(shakespeare_dir, "--train.max_steps", "2"), tmp_path / "run", progress=False)
    with pytest.raises(LmscaleError, match="--resume"):
        train(
            tiny_config(shakespeare_dir, "--train.max_steps", "2"), tmp_path / "run", progress=False
        )


class FixedBatches:
    """A loader that hands out given (inputs, targets) pairs in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def test_gradient_accumulation_equals_one_big_batch(shakespeare_dir, tmp_path):
    """k micro-batches with uneven target counts give exactly the gradient of one batch."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 512, (8, 16), generator=gen)
    targets = torch.randint(0, 512, (8, 16), generator=gen)
    targets[0, :12] = IGNORE_INDEX  # micro-batch 0 scores far fewer tokens than the others
    targets[5, 3:] = IGNORE_INDEX
    grads = {}
    for accum in (1, 4):
        cfg = tiny_config(
            shakespeare_dir, "--train.batch_size", str(8 // accum),
            "--train.grad_accum_steps", str(accum), "--train.optimizer", "sgd",
            "--train.grad_clip", "0", "--train.warmup_steps", "0", "--train.lr", "1",
            "--train.weight_decay", "0",
        )  # fmt: skip
        run = setup(cfg, tmp_path / f"accum{accum}", resume=False)
        run.loader = FixedBatches(
            zip(inputs.split(8 // accum), targets.split(8 // accum), strict=True)
        )
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        train_step(run)
        # One SGD step at lr 1 moves each weight by exactly its gradient.
        grads[accum] = {n: before[n] - p.detach() for n, p in run.model.named_parameters()}
    for name in grads[1]:
        assert torch.allclose(grads[4][name], grads[1][name], rtol=0, atol=1e-6), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shakespeare_dir, tmp_path):
    cfg = tiny_config(shakespeare_dir, "--train.max_steps", "4", "--train.checkpoint_interval", "2")
    run = setup(cfg, tmp_path / "run", resume=False)
    from lmscale.train.loop import save

    for _ in range(2):
        train_step(run)
    good = save(run)
    with torch.no_grad():
        run.model.norm.weight.fill_(float("nan"))  # the run diverges
    with pytest.raises(NonFiniteLoss, match="at step 3") as error:
        train_step(run)
    assert str(good) in str(error.value)
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == [good]
    assert torch.isfinite(load_checkpoint(good).model_state["norm.weight"]).all()


def test_config_errors_name_the_option(shakespeare_dir):
    with pytest.raises(LmscaleError, match="train.max_steps"):
        tiny_config(shakespeare_dir, "--train.max_steps", "abc")
    with pytest.raises(LmscaleError, match="unknown option 'train.max_stepz'"):
        tiny_config(shakespeare_dir, "--train.max_stepz", "3")
    with pytest.raises(LmscaleError, match="train.dtype"):
        tiny_config(shakespeare_dir, "--train.dtype", "float8")
    with pytest.raises(LmscaleError, match="unknown model preset"):
        tiny_config(shakespeare_dir, "--model.preset", "huge")


def test_metrics_lines_are_json(shakespeare_dir, tmp_path):
    train(tiny_config(shakespeare_dir, "--train.max_steps", "3"), tmp_path / "run", progress=False)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def one_step_weights(data_dir, run_dir, *overrides):
    cfg = tiny_config(data_dir, "--train.max_steps", "2", *overrides)
    run = setup(cfg, run_dir, resume=False)
    train_step(run)
    return {name: p.detach().clone() for name, p in run.model.named_parameters()}


def test_activation_checkpointing_and_compile_train_the_same_weights(shakespeare_dir, tmp_path):
    plain = one_step_weights(shakespeare_dir, tmp_path / "plain")
    for i, option in enumerate(("--train.activation_checkpointing", "--train.compile")):
        other = one_step_weights(shakespeare_dir, tmp_path / str(i), option, "true")
        for name, tensor in plain.items():
            assert torch.allclose(other[name], tensor, atol=1e-5), (option, name)
