"""Pipeline schedules: GPipe, 1F1B and interleaved 1F1B's bubble, activations and sends, against
Narayanan et al. 2021 (section 2.2) and Korthikanti et al. 2022 (section 4.2.3)."""

import json
import subprocess
import sys

import pytest

from lmscale.errors import LmscaleError
from lmscale.plan.hardware import accelerator
from lmscale.plan.memory import block_activations, training_memory
from lmscale.plan.models import named_model
from lmscale.plan.perf import Cluster, step_time
from lmscale.plan.pipeline import (
    in_flight_micro_batches,
    pipeline_bubble_fraction,
    pipeline_message_bytes,
    pipeline_p2p_bytes,
)
from lmscale.plan.recommend import candidates
from lmscale.plan.strategy import Strategy, check_strategy
from lmscale.plan.workload import Workload

INTERLEAVED = "interleaved-1f1b"


def llama7b(sequences: int = 64) -> Workload:
    """32 layers, 64 sequences of 4096 per step: 16 micro-batches per pipeline over dp 4."""
    return Workload(named_model("llama2-7b"), 4096, 4096 * sequences, tokens=1e9)


def pipeline(schedule: str = "1f1b", v: int = 1, **kwargs) -> Strategy:
    return Strategy(**({"dp": 4, "pp": 4} | kwargs), pp_schedule=schedule, virtual_stages=v)


@pytest.mark.parametrize(
    "p, m, schedule, v, fraction",
    [
        (1, 8, "1f1b", 1, 0.0),
        (4, 16, "1f1b", 1, 3 / 19),
        (4, 16, "gpipe", 1, 3 / 19),
        (8, 8, "1f1b", 1, 7 / 15),  # m = p: almost half the step idle
        (4, 16, INTERLEAVED, 2, 3 / 35),
        (4, 16, INTERLEAVED, 4, 3 / 67),
        (8, 64, INTERLEAVED, 3, 7 / 199),
    ],
)
def test_bubble_fraction_of_the_step(p, m, schedule, v, fraction):
    assert pipeline_bubble_fraction(p, m, schedule, v) == pytest.approx(fraction)


def test_interleaving_divides_the_bubble_time_by_the_virtual_stages():
    """Narayanan et al. 2021: bubble time / ideal compute is (p - 1)/m, and (1/v)(p - 1)/m."""
    ratio = {}
    for v in (1, 2, 4):
        f = pipeline_bubble_fraction(8, 32, INTERLEAVED if v > 1 else "1f1b", v)
        ratio[v] = f / (1 - f)
    assert ratio[1] == pytest.approx(7 / 32)
    assert ratio[2] == pytest.approx(ratio[1] / 2) and ratio[4] == pytest.approx(ratio[1] / 4)


@pytest.mark.parametrize("schedule, v", [("gpipe", 1), ("1f1b", 1), (INTERLEAVED, 2)])
def test_step_bubble_is_that_fraction_of_compute_and_bubble(schedule, v):
    w, s = llama7b(), pipeline(schedule, v)
    t = step_time(w, s, Cluster.of(accelerator("h100-80gb"), 16))
    assert t.bubble / (t.compute + t.bubble) == pytest.approx(
        pipeline_bubble_fraction(4, s.micro_batches(w), schedule, v)
    )


def test_interleaved_bubble_is_smaller_and_the_step_shorter():
    w, cluster = llama7b(), Cluster.of(accelerator("h100-80gb"), 16)
    plain, interleaved = (
        step_time(w, pipeline(), cluster),
        step_time(w, pipeline(INTERLEAVED, 2), cluster),
    )
    assert interleaved.bubble == pytest.approx(plain.bubble / 2)
    assert interleaved.total < plain.total
    assert interleaved.comm_bytes["pipeline"] == pytest.approx(2 * plain.comm_bytes["pipeline"])


def test_in_flight_micro_batches_per_schedule():
    assert in_flight_micro_batches(4, 16, "gpipe") == 16
    assert [in_flight_micro_batches(4, 16, "1f1b", rank=r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(8, 3, "1f1b") == 3  # fewer micro-batches than stages
    # Korthikanti et al. 2022, 4.2.3: the first stage keeps L (1 + (p - 1)/(p v)) layers' worth,
    # p (1 + (p - 1)/(p v)) micro-batches of its L/p layers.
    for p, v in ((4, 2), (8, 4), (2, 3)):
        held = in_flight_micro_batches(p, 4 * p, INTERLEAVED, v)
        assert held == pytest.approx(p * (1 + (p - 1) / (p * v)))
    assert in_flight_micro_batches(4, 4, INTERLEAVED, 2) == 4  # m = p: every forward first


def test_gpipe_keeps_every_micro_batch_and_1f1b_only_pp_of_them():
    w = llama7b()  # 16 micro-batches per pipeline, 4 stages
    kept = block_activations(w, pipeline()) * 32 // 4
    gpipe, one_f_one_b = training_memory(w, pipeline("gpipe")), training_memory(w, pipeline())
    assert gpipe.activations > one_f_one_b.activations and gpipe.peak > one_f_one_b.peak
    assert one_f_one_b.stage == "first pipeline stage"
    assert one_f_one_b.activations == pytest.approx(4 * kept)
    assert gpipe.activations >= 16 * kept


def test_interleaved_first_stage_keeps_korthikanti_share_more():
    w = llama7b()
    plain = training_memory(w, pipeline())
    interleaved = training_memory(w, pipeline(INTERLEAVED, 2))
    assert interleaved.stage == "first pipeline stage"
    assert interleaved.activations == pytest.approx(plain.activations * (1 + 3 / 8))


def test_p2p_bytes_cross_every_boundary_twice():
    message = pipeline_message_bytes(2, 4096, 4096, 2)
    assert message == 2 * 4096 * 4096 * 2
    assert pipeline_message_bytes(2, 4096, 4096, 2, tp=8, sp=True) == message / 8
    assert pipeline_message_bytes(2, 4096, 4096, 2, tp=8) == message  # each tp rank sends a copy
    for p, v in ((2, 1), (4, 1), (4, 2), (8, 3)):
        per_rank = [pipeline_p2p_bytes(p, 16, message, v, rank=r) for r in range(p)]
        assert sum(per_rank) == pytest.approx(2 * 16 * (v * p - 1) * message)
        assert pipeline_p2p_bytes(p, 16, message, v) == max(per_rank)
    assert pipeline_p2p_bytes(4, 16, message, rank=0) == 16 * message  # forward only
    assert pipeline_p2p_bytes(4, 16, message) == 2 * 16 * message  # an inner rank, both ways
    assert pipeline_p2p_bytes(1, 16, message) == 0


def test_step_sends_the_busiest_ranks_bytes_and_times_them():
    w, s = llama7b(), pipeline(tp=2, dp=2, sp=True)
    cluster = Cluster.of(accelerator("h100-80gb"), 16)
    t = step_time(w, s, cluster)
    message = 4096 * 4096 * 2 / 2  # (b, s, h) in 16-bit, split by sequence parallel
    assert t.comm_bytes["pipeline"] == pytest.approx(2 * s.micro_batches(w) * message)
    assert t.pipeline > 0


@pytest.mark.parametrize(
    "strategy, message",
    [
        (pipeline("zigzag"), "--pp-schedule must be one of gpipe, 1f1b, interleaved-1f1b"),
        (pipeline(INTERLEAVED, 1), "needs --virtual-stages 2 or more"),
        (pipeline("1f1b", 2), "--virtual-stages above 1 needs --pp-schedule interleaved-1f1b"),
        (pipeline(INTERLEAVED, 3), "12 model chunks do not divide the 32 layers"),
        (pipeline(INTERLEAVED, 2, pp=1, dp=16), "needs --pp above 1"),
        (pipeline("gpipe", pp=1, dp=16), "needs --pp above 1"),
        (pipeline(INTERLEAVED, 0), "--virtual-stages must be positive"),
    ],
)
def test_impossible_schedules_are_one_line_errors(strategy, message):
    with pytest.raises(LmscaleError, match=message) as err:
        check_strategy(strategy, llama7b())
    assert "\n" not in str(err.value)


def test_interleaving_needs_micro_batches_in_groups_of_pp():
    w = llama7b(sequences=60)  # 15 micro-batches per pipeline
    with pytest.raises(LmscaleError, match="gets 15: .* a multiple of 4"):
        check_strategy(pipeline(INTERLEAVED, 2), w)


def test_recommend_considers_interleaving_where_it_can_run():
    cluster = Cluster.of(accelerator("h100-80gb"), 16)
    schedules = {(s.pp, s.pp_schedule) for s in candidates(llama7b(), cluster)}
    assert (4, INTERLEAVED) in schedules and (4, "1f1b") in schedules
    assert (1, INTERLEAVED) not in schedules
    uneven = candidates(llama7b(sequences=60), cluster)  # dp 4 x pp 4: 15 micro-batches each
    interleaved = {(s.dp, s.pp) for s in uneven if s.pp_schedule == INTERLEAVED}
    assert (4, 4) not in interleaved and (1, 4) in interleaved  # 60 micro-batches with tp 4


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmscale", "plan", "--model", "llama2-7b", "--gpus", "16",
         "--global-batch-tokens", "262144", "--tokens", "1B", *args],
        capture_output=True, text=True,
    )  # fmt: skip


def test_cli_shows_the_schedule_bubble_and_sends():
    result = plan("--pp", "4", "--pp-schedule", INTERLEAVED, "--virtual-stages", "2")
    assert result.returncode == 0, result.stderr
    assert "your strategy: pp4 interleaved v2 x dp4" in result.stdout
    assert "pipeline: interleaved-1f1b, 4 stages x 2 chunks per rank, 16 micro-batches: " \
           "bubble 8.6% of the step" in result.stdout  # fmt: skip
    chosen = json.loads(plan("--pp", "4", "--pp-schedule", "gpipe", "--json").stdout)["chosen"]
    assert chosen["strategy"]["pp_schedule"] == "gpipe"
    assert chosen["pipeline"]["bubble_fraction"] == pytest.approx(3 / 19)
    assert chosen["pipeline"]["first_stage_micro_batches"] == 16
    assert chosen["pipeline"]["p2p_bytes"] == chosen["cost"]["step"]["comm_bytes"]["pipeline"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--pp", "4", "--pp-schedule", "zigzag"), "--pp-schedule must be one of"),
        (("--pp", "4", "--virtual-stages", "2"), "needs --pp-schedule interleaved-1f1b"),
        (("--pp-schedule", "gpipe"), "needs --pp above 1"),
        (("--pp", "4", "--pp-schedule", INTERLEAVED, "--virtual-stages", "3"), "do not divide"),
    ],
)
def test_cli_bad_schedules_are_one_line_errors(args, message):
    result = plan(*args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
