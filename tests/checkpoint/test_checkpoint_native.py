"""The native checkpoint format: round trips, tied weights, keep-last-K, overwrite, corruption."""

import dataclasses
import json

import pytest
import torch

from lmscale.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset


def tiny_run():
    """A tiny tied model and an AdamW that has taken two real steps."""
    torch.manual_seed(0)
    config = preset("tiny")
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    for _ in range(2):
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, {"model": dataclasses.asdict(config), "run": {"lr": 1e-2}}


def save_tiny(directory, step, **kwargs):
    return save_checkpoint(directory, step, {"w": torch.full((4,), float(step))}, {}, **kwargs)


def test_model_and_optimizer_round_trip(tmp_path):
    model, optimizer, config = tiny_run()
    path = save_checkpoint(
        tmp_path / "checkpoints", 2, model.state_dict(), config, tokenizer_json='{"t": 1}',
        train_state={"optimizer": optimizer.state_dict(), "step": 2},
    )  # fmt: skip
    assert path.name == "step_00000002"
    checkpoint = load_checkpoint(tmp_path)
    assert (checkpoint.step, checkpoint.config, checkpoint.tokenizer_json) == (
        2,
        config,
        '{"t": 1}',
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint.model_state[name], tensor), name
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(checkpoint.train_state["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)
    assert load_checkpoint(path, with_train_state=False).train_state is None


def test_tied_embeddings_stored_once_and_still_tied(tmp_path):
    model, _, config = tiny_run()
    path = save_checkpoint(tmp_path, 7, model.state_dict(), config)
    size = (path / "model.safetensors").stat().st_size
    assert size < sum(t.numel() * t.element_size() for t in model.state_dict().values())
    loaded, checkpoint = load_model(tmp_path, dtype="bfloat16")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert loaded.output.weight.dtype == torch.bfloat16 and not loaded.training
    loaded, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, 512, (1, 8))
    assert torch.equal(loaded(tokens), model.eval()(tokens))


def test_load_model_rejects_mismatched_weights(tmp_path):
    model, _, config = tiny_run()
    state = model.state_dict()
    del state["norm.weight"]
    save_checkpoint(tmp_path, 1, state, config)
    with pytest.raises(LmscaleError, match="missing.*norm.weight"):
        load_model(tmp_path)
    config["model"]["dim"] = 128
    save_checkpoint(tmp_path, 2, model.state_dict(), config)
    with pytest.raises(LmscaleError, match="shape"):
        load_model(tmp_path)


def test_keep_last_k(tmp_path):
    for step in (5, 10, 100, 20):
        save_tiny(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000100"]
    assert latest_checkpoint(tmp_path).name == "step_00000100"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000100"]


def test_overwrite_same_step(tmp_path):
    save_tiny(tmp_path, 3, tokenizer_json="old")
    path = save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"new": True})
    checkpoint = load_checkpoint(path)
    assert checkpoint.config == {"new": True} and checkpoint.tokenizer_json is None
    assert torch.equal(checkpoint.model_state["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_interrupted_overwrite_is_undone_by_next_save(tmp_path):
    old = save_tiny(tmp_path, 3)
    # A crash between the two renames of an overwrite: the old step moved aside, nothing in place.
    old.rename(tmp_path / ".old-step_00000003-999")
    (tmp_path / ".tmp-step_00000003-999").mkdir()
    assert list_checkpoints(tmp_path) == []
    save_tiny(tmp_path, 4)
    assert [p.name for p in tmp_path.iterdir()] == sorted(["step_00000003", "step_00000004"])
    assert torch.equal(load_checkpoint(old).model_state["w"], torch.full((4,), 3.0))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_weights_raise_naming_the_file(tmp_path, damage):
    model, _, config = tiny_run()
    path = save_checkpoint(tmp_path, 1, model.state_dict(), config)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    else:
        weights.unlink()
    with pytest.raises(LmscaleError, match="model.safetensors"):
        load_model(path)


def test_damaged_config_or_train_state_raise_naming_the_file(tmp_path):
    path = save_tiny(tmp_path, 1, train_state={"a": torch.ones(1000)})
    ts = path / "train_state.safetensors"
    ts.write_bytes(ts.read_bytes()[:-100])
    with pytest.raises(LmscaleError, match="train_state.safetensors"):
        load_checkpoint(path)
    assert load_checkpoint(path, with_train_state=False).step == 1
    (path / "config.json").write_text('{"model": ')
    with pytest.raises(LmscaleError, match="config.json"):
        load_checkpoint(path)


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LmscaleError, match="no checkpoint in"):
        resolve_checkpoint(run)
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(LmscaleError, match="no checkpoint in"):
        resolve_checkpoint(run)
    save_tiny(run / "checkpoints", 1)
    latest = save_tiny(run / "checkpoints", 2)
    (run / "checkpoints" / ".tmp-step_00000009-1").mkdir()
    assert resolve_checkpoint(run) == latest
    assert resolve_checkpoint(run / "checkpoints") == latest
    assert resolve_checkpoint(run / "checkpoints" / "step_00000001").name == "step_00000001"
    assert json.loads((latest / "config.json").read_text()) == {}


def test_bad_arguments(tmp_path):
    with pytest.raises(LmscaleError, match="step"):
        save_tiny(tmp_path, -1)
    with pytest.raises(LmscaleError, match="keep"):
        save_tiny(tmp_path, 1, keep=0)


def test_failed_save_leaves_nothing_behind(tmp_path):
    save_tiny(tmp_path, 1)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
