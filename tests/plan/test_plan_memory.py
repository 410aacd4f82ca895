"""Training memory, time and the recommendation: the rules each part of the accounting follows."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.plan.hardware import accelerator
from lmscale.plan.memory import block_activations, training_memory
from lmscale.plan.models import named_model
from lmscale.plan.perf import Cluster, step_time, training_cost
from lmscale.plan.recommend import evaluate, recommend
from lmscale.plan.strategy import Strategy, check_strategy
from lmscale.plan.workload import Workload


def llama7b(**kwargs) -> Workload:
    return Workload(named_model("llama2-7b"), 4096, 4096 * 512, tokens=2e12, **kwargs)


def test_each_zero_stage_shards_one_more_part():
    w = llama7b()
    states = [training_memory(w, Strategy(dp=8, zero=z)) for z in range(4)]
    n = w.model.num_params()
    assert states[0].optimizer == pytest.approx(12 * n) and states[0].gradients == pytest.approx(
        2 * n
    )
    assert states[1].optimizer == pytest.approx(12 * n / 8)
    assert states[2].gradients == pytest.approx(2 * n / 8) and states[
        2
    ].parameters == pytest.approx(2 * n)
    assert states[3].parameters == pytest.approx(2 * n / 8)
    assert [s.peak for s in states] == sorted((s.peak for s in states), reverse=True)


def test_precision_recipes_bytes_per_parameter():
    n = named_model("llama2-7b").num_params()
    expected = {"mixed": (2, 2, 12), "amp": (4, 4, 8), "fp32": (4, 4, 8), "bf16": (2, 2, 4)}
    for precision, (p, g, o) in expected.items():
        m = training_memory(llama7b(precision=precision), Strategy())
        assert (m.parameters, m.gradients, m.optimizer) == pytest.approx((p * n, g * n, o * n))
    sgd = training_memory(llama7b(optimizer="sgd"), Strategy())
    assert sgd.optimizer == pytest.approx(8 * n)  # fp32 master weights + momentum


def test_tensor_parallel_splits_all_but_the_replicated_tenth_and_sp_splits_the_rest():
    w = llama7b()
    one = block_activations(w, Strategy())
    tp = block_activations(w, Strategy(tp=8))
    sp = block_activations(w, Strategy(tp=8, sp=True))
    assert sp == pytest.approx(one / 8)
    assert sp < tp < one


def test_flash_attention_keeps_no_score_matrix():
    eager, flash = llama7b(attention="eager"), llama7b(attention="flash")
    s = Strategy()
    scores = 32 * 4096 * 2 * 4096  # heads x seq x 2 bytes, per token, times seq tokens
    assert block_activations(eager, s) - block_activations(flash, s) > 0.9 * scores


def test_full_recomputation_keeps_only_block_inputs_and_costs_a_forward():
    w = llama7b()
    none, full = Strategy(), Strategy(recompute="full")
    assert block_activations(w, full) == 4096 * 4096 * 2  # (s, h) in 16-bit
    mem = training_memory(w, full)
    assert "one block recomputed in the backward" in mem.buffers
    cluster = Cluster.of(accelerator("h100-80gb"), 1)
    ratio = step_time(w, full, cluster).compute / step_time(w, none, cluster).compute
    assert 1.25 < ratio < 1.34  # (3 + 1) / 3 of the block FLOPs; the output layer is not rerun


def test_pipeline_first_stage_holds_activations_of_pp_micro_batches():
    w = llama7b()
    one = training_memory(w, Strategy(pp=1, micro_batch=1))
    four = training_memory(w, Strategy(pp=4, micro_batch=1))
    assert four.stage == "first pipeline stage"
    # 1F1B: the first stage keeps `pp` micro-batches of its L/pp layers: as many as one device
    assert four.activations == pytest.approx(one.activations - _head(w), rel=0.01)
    assert four.parameters < one.parameters / 3


def _head(w: Workload) -> float:
    full = training_memory(w, Strategy())
    return full.activations - w.model.n_layers * block_activations(w, Strategy())


def test_gradient_accumulation_keeps_gradients_beside_activations():
    w1 = Workload(named_model("gpt2"), 1024, 1024 * 8, precision="amp")
    w4 = Workload(named_model("gpt2"), 1024, 1024 * 32, precision="amp")
    s = Strategy(micro_batch=8)
    single, accumulating = training_memory(w1, s), training_memory(w4, s)
    assert single.activations == accumulating.activations
    assert accumulating.peak - single.peak == pytest.approx(single.gradients, rel=0.1)


def test_data_parallel_traffic_makes_a_slow_network_the_bound():
    w = llama7b()
    fast = Cluster.of(accelerator("h100-80gb"), 64)
    slow = Cluster.of(accelerator("h100-80gb"), 64, devices_per_node=1)  # no NVLink peers
    slow = Cluster(slow.device.__class__(**{**slow.device.__dict__, "inter_node_gbs": 0.5}), 64, 1,
                   slow.mfu, slow.price_per_hour, slow.power_w)  # fmt: skip
    s = Strategy(dp=64, zero=3, micro_batch=8)  # one micro-batch per step
    assert step_time(w, s, fast).bound == "compute"
    assert step_time(w, s, slow).bound.startswith("communication (data-parallel")
    assert training_cost(w, s, slow).seconds > training_cost(w, s, fast).seconds


def test_cost_energy_and_co2_follow_device_hours():
    w = llama7b()
    cluster = Cluster.of(accelerator("a100-80gb"), 64, price_per_hour=2.0, power_w=400, pue=1.2,
                         grid_kg_per_kwh=0.5)  # fmt: skip
    cost = training_cost(w, Strategy(dp=64, zero=1), cluster)
    assert cost.device_hours == pytest.approx(cost.seconds * 64 / 3600)
    assert cost.dollars == pytest.approx(2.0 * cost.device_hours)
    assert cost.energy_kwh == pytest.approx(cost.device_hours * 0.4 * 1.2)
    assert cost.co2_kg == pytest.approx(cost.energy_kwh * 0.5)
    assert 0.4 < cost.mfu < 0.45 + 1e-9


def test_recommendation_ranks_fitting_kinds_by_time_and_explains_the_rest():
    w = llama7b()
    cluster = Cluster.of(accelerator("a100-40gb"), 16)
    rec = recommend(w, cluster)
    times = [c.cost.seconds for c in rec.ranked]
    assert times == sorted(times) and rec.ranked
    assert all(c.memory.peak <= cluster.device.usable_bytes for c in rec.ranked)
    kinds = {c.strategy.family for c in rec.failing}
    assert "DDP" in kinds  # 7B with AdamW states on every device cannot fit 40 GB
    ddp = next(c for c in rec.failing if c.strategy.family == "DDP")
    assert "needs" in ddp.problem and "optimizer states" in ddp.problem
    assert {c.strategy.family for c in rec.ranked}.isdisjoint(kinds)


def test_a_strategy_that_does_not_fit_says_by_how_much_and_why():
    cluster = Cluster.of(accelerator("h100-80gb"), 8)
    candidate = evaluate(llama7b(), Strategy(dp=8), cluster)
    assert not candidate.fits
    assert "> 79.00 GiB usable on h100-80gb" in candidate.problem


@pytest.mark.parametrize(
    "strategy, message",
    [
        (Strategy(tp=5), "does not divide the 32 attention heads"),
        (Strategy(tp=64), "larger than the 32 attention heads"),
        (Strategy(pp=3), "does not divide the 32 layers"),
        (Strategy(pp=64), "more stages than the 32 layers"),
        (Strategy(sp=True), "needs --tp above 1"),
        (Strategy(pp=2, zero=2), "use --zero 1"),
        (Strategy(dp=1024), "cannot give 1024 data-parallel ranks"),
        (Strategy(recompute="some"), "--recompute must be one of"),
    ],
)
def test_impossible_strategies_are_one_line_errors(strategy, message):
    with pytest.raises(LmscaleError, match=message) as err:
        check_strategy(strategy, llama7b())
    assert "\n" not in str(err.value)


def test_grouped_kv_heads_must_split_or_replicate_evenly():
    w = Workload(named_model("llama2-70b"), 4096, 4096 * 64)
    check_strategy(Strategy(tp=16), w)  # 8 kv heads, each replicated on 2 ranks
    w12 = Workload(named_model("smollm2-360m"), 4096, 4096 * 64)  # 15 heads, 5 kv heads
    with pytest.raises(LmscaleError, match="does not divide the 15 attention heads"):
        check_strategy(Strategy(tp=2), w12)
