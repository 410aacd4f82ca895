"""Federated runs on Flower's Simulation Engine (real Ray actors), on the tiny model."""

import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("opacus")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lmscale.federated.apps import client_app  # noqa: E402
from lmscale.federated.config import FederateConfig  # noqa: E402
from lmscale.federated.local import (  # noqa: E402
    LocalConfig,
    evaluate_tokens,
    load_shared_,
    shared_state,
    token_windows,
)
from lmscale.federated.partition import client_partitions  # noqa: E402
from lmscale.federated.results import ROUNDS  # noqa: E402
from lmscale.federated.runtime import federate  # noqa: E402
from lmscale.federated.site import encode, starting_model  # noqa: E402
from lmscale.train.loss import lm_loss_sum  # noqa: E402

ROUND_TRIP = 3  # rounds of the runs below


@pytest.fixture(scope="module", autouse=True)
def one_ray_for_the_module():
    """One local Ray for the module's eight simulations, started as `run_simulated` asks.

    Flower's Ray backend joins a Ray that is already running, and at the end of each run kills
    its actors (so every run still starts fresh ones) and shuts Ray down; keeping Ray up
    between runs saves its start and stop, seconds a run on a small machine.
    """
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR,
        log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
    )  # fmt: skip
    shutdown = ray.shutdown
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "shutdown", lambda *args, **kwargs: None)
        yield
    shutdown()


def config(model, data, **kw) -> FederateConfig:
    local = kw.pop("local", {})
    local = LocalConfig(**{"steps": 2, "batch_size": 4, "context": 64, "lr": 3e-3,
                           "eval_tokens": 512} | local)  # fmt: skip
    kw = {"adapter": "full"} | kw
    return FederateConfig(model=str(model), data=str(data), clients=3, rounds=ROUND_TRIP,
                          local=local, **kw)  # fmt: skip


def final_weights(out) -> dict[str, torch.Tensor]:
    folder = out / "model" if (out / "model").exists() else out / "adapter"
    name = "model.safetensors" if folder.name == "model" else "adapter_model.safetensors"
    return load_file(str(folder / name))


def test_fedavg_of_one_full_batch_sgd_step_equals_centralised_training(
    fed_model_dir, client_folder, tmp_path
):
    """Each round, every client takes one full-batch SGD step from the global weights; the
    example-weighted average is then one full-batch step on the union of their data."""
    cfg = config(fed_model_dir, client_folder, local={
        "steps": 1, "batch_size": 10_000, "optimizer": "sgd", "grad_clip": 0.0, "lr": 0.05,
    })  # fmt: skip
    cfg.rounds = 2
    federate(cfg, tmp_path / "fed")
    model, tokenizer = starting_model(cfg)
    union = torch.cat([
        token_windows(encode(tokenizer, part.train_text), cfg.local.context)
        for part in client_partitions(cfg.data, cfg.clients)
    ])  # fmt: skip
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(cfg.rounds):
        inputs, targets = union[:, :-1], union[:, 1:]
        (lm_loss_sum(model, inputs, targets) / targets.numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    fed = final_weights(tmp_path / "fed")
    params = dict(model.named_parameters())  # the tied output head once, as the embedding
    assert set(fed) == set(params)
    for name, p in params.items():
        torch.testing.assert_close(fed[name], p.detach(), atol=1e-5, rtol=1e-5, msg=name)
    start = dict(starting_model(cfg)[0].named_parameters())
    assert all(not torch.equal(fed[n], start[n]) for n in ("layers.0.attention.wq.weight",))


@pytest.fixture(scope="module")
def fedavg_run(fed_model_dir, client_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("fedavg") / "run"
    rounds = federate(config(fed_model_dir, client_folder), out)
    return out, rounds


def test_a_three_client_run_lowers_every_clients_heldout_loss(fedavg_run):
    out, rounds = fedavg_run
    cfg = FederateConfig.from_json((out / "config.json").read_text())
    model, tokenizer = starting_model(cfg)
    parts = client_partitions(cfg.data, cfg.clients)
    last = rounds[-1]
    for part in parts:
        before = evaluate_tokens(model, encode(tokenizer, part.heldout_text), cfg.local).loss
        assert last["clients"][part.name]["heldout_loss"] < before - 0.05, part.name
    assert rounds[-1]["global"]["loss"] < rounds[0]["global"]["loss"]
    lines = [json.loads(x) for x in (out / ROUNDS).read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(ROUND_TRIP + 1))
    one_model = sum(t.numel() * 4 for t in shared_state(model).values())
    for line in lines[1:]:
        assert line["trained"] == 3 and line["failures"] == 0
        # Three replies of the shared tensors (plus each array's dtype and shape), and the
        # global tensors sent to each client twice (train, evaluate).
        assert 3 * one_model <= line["bytes_received"] < 3.03 * one_model
        assert line["bytes_sent"] == 2 * line["bytes_received"]
        assert line["seconds"] > 0 and line["epsilon"] is None
    assert (out / "perplexity.png").stat().st_size > 10_000
    assert (out / "model" / "model.safetensors").exists()


def test_fedprox_with_mu_zero_equals_fedavg(fed_model_dir, client_folder, fedavg_run, tmp_path):
    out, rounds = fedavg_run
    prox = federate(config(fed_model_dir, client_folder, strategy="fedprox", mu=0.0),
                    tmp_path / "prox")  # fmt: skip
    a, b = final_weights(out), final_weights(tmp_path / "prox")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r["global"]["loss"] for r in prox] == [r["global"]["loss"] for r in rounds]


def test_a_client_that_crashes_mid_round_is_dropped_and_rejoins(
    fed_model_dir, client_folder, tmp_path
):
    def crash_once(msg, context, call_next):
        """Site 1 fails its training in round 2 (after loading its data and the model)."""
        round_ = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
        if msg.metadata.message_type == "train" and round_ == 2:
            if int(context.node_config["partition-id"]) == 1:
                raise RuntimeError("site 1 lost power")
        return call_next(msg, context)

    rounds = federate(config(fed_model_dir, client_folder), tmp_path / "crash",
                      mods=[crash_once])  # fmt: skip
    names = [p.name for p in client_partitions(client_folder, 3)]
    assert [r.get("trained") for r in rounds[1:]] == [3, 2, 3]
    assert rounds[2]["failures"] == 1
    assert "train_loss" not in rounds[2]["clients"][names[1]]
    assert "train_loss" in rounds[3]["clients"][names[1]]  # it rejoined
    assert all(math.isfinite(r["global"]["loss"]) for r in rounds)


def test_a_client_sends_only_its_trained_tensors(fed_model_dir, client_folder):
    cfg = config(fed_model_dir, client_folder, adapter="lora")
    model, tokenizer = starting_model(cfg)
    state = {k: v.clone() for k, v in shared_state(model).items()}
    message = Message(
        content=RecordDict({"arrays": ArrayRecord(state),
                            "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7, message_type="train",
    )  # fmt: skip
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})  # fmt: skip
    reply = client_app(cfg)(message, context)
    content = reply.content
    assert list(content.array_records) == ["arrays"] and not content.config_records
    sent = content["arrays"]
    assert set(sent.keys()) == set(state) and all("lora_" in k for k in sent.keys())
    for key, array in sent.items():
        assert array.dtype == "float32" and tuple(array.shape) == tuple(state[key].shape)
    assert set(content["metrics"].keys()) == {"num-examples", "train-loss", "client"}
    # The bytes on the wire hold none of the client's text or token ids.
    wire = b"".join(a.data for a in sent.values()) + content.deflate()
    part = client_partitions(client_folder, 3)[0]
    line = next(x for x in part.train_text.splitlines() if len(x) > 30).encode()
    assert line not in wire
    ids = encode(tokenizer, part.train_text)[:8]
    for dtype in (np.int64, np.int32):
        assert ids.astype(dtype).tobytes() not in wire
    load_shared_(model, sent.to_torch_state_dict())  # the reply is a valid model update
    assert any(not torch.equal(shared_state(model)[k], state[k]) for k in state)


def test_client_level_dp_runs_repeat_to_the_bit_and_report_the_accountants_epsilon(
    fed_model_dir, client_folder, tmp_path
):
    from lmscale.federated.privacy import epsilon

    dp = {"adapter": "lora", "dp_clip": 0.5, "dp_epsilon": 8.0, "dp_delta": 1e-5}
    runs = [federate(config(fed_model_dir, client_folder, **dp), tmp_path / name)
            for name in ("a", "b")]  # fmt: skip
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    other = federate(config(fed_model_dir, client_folder, **dp, seed=1), tmp_path / "c")
    assert other[-1]["global"]["loss"] != runs[0][-1]["global"]["loss"]
    noise = json.loads((tmp_path / "a" / "config.json").read_text())  # the run's own record
    assert noise["dp_epsilon"] == 8.0
    for line in runs[0][1:]:
        assert max(line["update_norms"]) > 0
        assert line["delta"] == 1e-5
    final = runs[0][-1]["epsilon"]
    assert final <= 8.0 and final > 7.5  # the noise was chosen to spend the budget
    eps = [line["epsilon"] for line in runs[0]]
    assert eps[0] == 0.0 and eps == sorted(eps)
    from lmscale.federated.apps import privacy_parameters

    z, delta = privacy_parameters(FederateConfig.from_json(
        (tmp_path / "a" / "config.json").read_text()))  # fmt: skip
    for r, line in enumerate(runs[0]):
        assert line["epsilon"] == pytest.approx(epsilon(z, r, 1.0, delta), rel=1e-9)


def test_dp_sgd_in_each_client_reports_each_sites_epsilon(fed_model_dir, client_folder, tmp_path):
    dp = {"adapter": "lora", "dp_sgd": True, "dp_noise": 1.0, "dp_clip": 1.0}
    rounds = federate(config(fed_model_dir, client_folder, **dp), tmp_path / "dpsgd")
    per_site = [c["epsilon"] for c in rounds[-1]["clients"].values() if "epsilon" in c]
    assert len(per_site) == 3 and all(0 < e < math.inf for e in per_site)
    assert rounds[-1]["epsilon"] == max(per_site) > rounds[1]["epsilon"]
    assert all(math.isfinite(r["global"]["loss"]) for r in rounds)
