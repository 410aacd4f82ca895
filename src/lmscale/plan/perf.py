"""Time, communication, cost and energy of a training job under one strategy.

    compute   = tokens per step x hardware FLOPs per token / (devices x peak x MFU)
    bubble    = compute x f / (1 - f), f = `pipeline_bubble_fraction`: (p - 1) / (m + p - 1) of
                the step for GPipe and 1F1B, (p - 1) / (v m + p - 1) interleaved (Narayanan et
                al. 2021); so the bubble is compute x (p - 1) / (v m)
    pipeline: each rank's point-to-point sends (`pipeline_p2p_bytes`, the busiest rank), exposed
    tensor parallel: 4 all-reduces of the activations per block and micro-batch (2 forward,
                2 backward; 2 more when the forward is recomputed), on the critical path
    data parallel:   ring all-reduce of the gradients, 2 (n-1)/n of their bytes per device
                (ZeRO-1: reduce-scatter + all-gather, the same bytes; ZeRO-3 re-gathers the
                parameters for forward and backward of every micro-batch: 1.5x, as the ZeRO paper
                says); it hides behind the backward (ZeRO-3 behind the whole step) until it is
                longer
    energy    = device-hours x board power x PUE; CO2 = energy x grid intensity

MFU here is the fraction of peak the devices sustain on the FLOPs they execute; the model-FLOPs
utilisation reported back is lower when recomputation adds executed FLOPs the model does not need.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.plan.flops import training_flops_per_token
from lmscale.plan.hardware import Accelerator
from lmscale.plan.memory import stage_parameters
from lmscale.plan.pipeline import (
    pipeline_bubble_fraction,
    pipeline_message_bytes,
    pipeline_p2p_bytes,
)
from lmscale.plan.strategy import Strategy
from lmscale.plan.workload import Workload

PUE = 1.1
"""Power usage effectiveness of a modern data centre (Patterson et al. 2021 use 1.1 for GPT-3)."""
GRID_KG_PER_KWH = 0.429
"""kg CO2e per kWh: the U.S. average Patterson et al. 2021 use for GPT-3's training."""


@dataclass(frozen=True)
class Cluster:
    """The devices a job runs on, and the prices and efficiencies to assume."""

    device: Accelerator
    n_devices: int
    devices_per_node: int
    mfu: float
    price_per_hour: float
    power_w: float
    pue: float = PUE
    grid_kg_per_kwh: float = GRID_KG_PER_KWH

    @classmethod
    def of(cls, device: Accelerator, n_devices: int, **overrides) -> Cluster:
        """`device` x `n_devices` with the catalog's defaults unless overridden (None keeps them)."""
        values = dict(devices_per_node=device.devices_per_node, mfu=device.mfu,
                      price_per_hour=device.price_per_hour, power_w=device.power_w)  # fmt: skip
        values |= {k: v for k, v in overrides.items() if v is not None}
        cluster = cls(device, n_devices, **values)
        cluster.validate()
        return cluster

    def validate(self) -> None:
        if self.n_devices < 1:
            raise LmscaleError(f"--gpus must be positive, got {self.n_devices}")
        if self.devices_per_node < 1:
            raise LmscaleError(f"--gpus-per-node must be positive, got {self.devices_per_node}")
        if not 0 < self.mfu <= 1:
            raise LmscaleError(f"--mfu must be in (0, 1], got {self.mfu}")
        for name in ("price_per_hour", "power_w", "grid_kg_per_kwh"):
            if getattr(self, name) < 0:
                raise LmscaleError(
                    f"--{_flag(name)} must not be negative, got {getattr(self, name)}"
                )
        if self.pue < 1:
            raise LmscaleError(f"--pue must be at least 1, got {self.pue}")

    @property
    def nodes(self) -> int:
        return -(-self.n_devices // self.devices_per_node)


def _flag(name: str) -> str:
    return {"price_per_hour": "price", "power_w": "power", "grid_kg_per_kwh": "grid"}[name]


@dataclass
class StepTime:
    """Seconds of one optimizer step, by part, and what bounds it."""

    compute: float
    bubble: float
    tensor_parallel: float
    pipeline: float
    data_parallel: float
    """Gradient (and ZeRO parameter) traffic, whether or not it hides behind compute."""
    exposed_data_parallel: float
    comm_bytes: dict[str, float]
    """Bytes each device sends per step, by kind of traffic."""

    @property
    def total(self) -> float:
        return (self.compute + self.bubble + self.tensor_parallel + self.pipeline
                + self.exposed_data_parallel)  # fmt: skip

    @property
    def communication(self) -> float:
        return self.tensor_parallel + self.pipeline + self.data_parallel

    @property
    def bound(self) -> str:
        """`compute`, or the communication that takes longer than the compute does."""
        parts = {"tensor-parallel": self.tensor_parallel, "pipeline": self.pipeline,
                 "data-parallel": self.data_parallel}  # fmt: skip
        name, seconds = max(parts.items(), key=lambda kv: kv[1])
        if self.communication <= self.compute:
            return "compute"
        return f"communication ({name}: {seconds:.3g} s per step against {self.compute:.3g} s of compute)"


@dataclass
class TrainingCost:
    """The whole run: time, device-hours, money, energy and emissions."""

    steps: float
    step: StepTime
    seconds: float
    device_hours: float
    dollars: float
    energy_kwh: float
    co2_kg: float
    model_flops: float
    """Model FLOPs of the whole run (recomputation not counted)."""
    mfu: float
    """Model-FLOPs utilisation the plan implies."""


def step_time(workload: Workload, strategy: Strategy, cluster: Cluster) -> StepTime:
    """Seconds of one optimizer step of `workload` under `strategy` on `cluster`."""
    model, recipe, s = workload.model, workload.recipe, strategy
    _, hardware = training_flops_per_token(model, workload.seq_len, s.recompute)
    peak = cluster.device.peak_flops(recipe.math)
    compute = s.step_tokens(workload) * hardware / (cluster.n_devices * peak * cluster.mfu)
    micro = s.micro_batches(workload)
    bubble = _bubble(compute, s, micro)
    act_bytes = s.micro_batch * workload.seq_len * model.dim * recipe.activation_bytes
    layers = model.n_layers // s.pp
    comm: dict[str, float] = {}
    if s.tp > 1:
        per_block = 6 if s.recompute == "full" else 4
        comm["tensor parallel"] = per_block * layers * micro * _ring(s.tp) * 2 * act_bytes
    if s.pp > 1:
        comm["pipeline"] = strategy_p2p_bytes(workload, s)
    if s.dp > 1:
        comm["data parallel"] = _data_parallel_bytes(workload, s, micro)
    intra, inter = cluster.device.intra_node_gbs * 1e9, cluster.device.inter_node_gbs * 1e9
    tp_bw = intra if s.tp <= cluster.devices_per_node else inter
    pp_bw = intra if s.tp * s.pp <= cluster.devices_per_node else inter
    dp_bw = intra if cluster.n_devices <= cluster.devices_per_node else inter
    tp_time = comm.get("tensor parallel", 0.0) / tp_bw
    pp_time = comm.get("pipeline", 0.0) / pp_bw
    dp_time = comm.get("data parallel", 0.0) / dp_bw
    hidden_behind = compute * (1.0 if s.zero == 3 else 2 / 3)  # ZeRO-3 prefetches in forward too
    exposed = max(0.0, dp_time - hidden_behind)
    return StepTime(compute, bubble, tp_time, pp_time, dp_time, exposed, comm)


def _bubble(compute: float, s: Strategy, micro: int) -> float:
    """Idle seconds such that bubble / (compute + bubble) is the schedule's bubble fraction."""
    if s.pp == 1:
        return 0.0
    fraction = pipeline_bubble_fraction(s.pp, micro, s.pp_schedule, s.virtual_stages)
    return compute * fraction / (1 - fraction)


def strategy_p2p_bytes(workload: Workload, s: Strategy) -> float:
    """Pipeline bytes the busiest rank sends per step: activations forward, gradients back."""
    model = workload.model
    message = pipeline_message_bytes(s.micro_batch, workload.seq_len, model.dim,
                                     workload.recipe.activation_bytes, s.tp, s.sp)  # fmt: skip
    return pipeline_p2p_bytes(s.pp, s.micro_batches(workload), message, s.virtual_stages)


def _ring(n: int) -> float:
    """Share of a buffer each of n devices sends in a ring reduce-scatter or all-gather."""
    return (n - 1) / n


def _data_parallel_bytes(workload: Workload, s: Strategy, micro: int) -> float:
    """Bytes per device per step of gradient reduction and ZeRO parameter gathering."""
    params = stage_parameters(workload.model, s)
    recipe = workload.recipe
    grad = 4 if recipe.grad_bytes == 4 else 2
    param = 4 if recipe.math == "fp32" else 2
    ring = _ring(s.dp)
    if s.zero == 0:
        return 2 * ring * params * grad
    if s.zero == 1:
        return ring * params * (grad + param)
    if s.zero == 2:  # gradients are sharded, so every micro-batch reduce-scatters its own
        return ring * params * (micro * grad + param)
    return ring * params * micro * (2 * param + grad)


def training_cost(workload: Workload, strategy: Strategy, cluster: Cluster) -> TrainingCost:
    """Time, device-hours, dollars, energy and CO2 of training on `workload.train_tokens`."""
    step = step_time(workload, strategy, cluster)
    steps = workload.train_tokens / strategy.step_tokens(workload)
    seconds = steps * step.total
    device_hours = seconds * cluster.n_devices / 3600
    energy = energy_kwh(device_hours, cluster.power_w, cluster.pue)
    model_per_token, _ = training_flops_per_token(workload.model, workload.seq_len)
    model_flops = model_per_token * workload.train_tokens
    peak = cluster.device.peak_flops(workload.recipe.math)
    mfu = model_flops / (seconds * cluster.n_devices * peak) if seconds else 0.0
    return TrainingCost(
        steps, step, seconds, device_hours, device_hours * cluster.price_per_hour, energy,
        energy * cluster.grid_kg_per_kwh, model_flops, mfu,
    )  # fmt: skip


def energy_kwh(device_hours: float, power_w: float, pue: float = PUE) -> float:
    """Energy drawn from the grid: device-hours x power per device x PUE."""
    return device_hours * power_w / 1000 * pue
