"""Every strategy for a job on a cluster: which fit, ranked by time (then cost), and why each
other one does not.

Candidates: tensor parallel in powers of two up to a node, pipeline stages that divide the layers
(1F1B, and interleaved 1F1B with 2 chunks per rank where the layers and micro-batches allow;
GPipe has 1F1B's bubble and more memory, so it never wins), data parallel over the rest, each
ZeRO stage, with and without sequence parallel and recomputation. The best of each kind ("TP+SP x ZeRO-1", "FSDP/ZeRO-3", ...) makes the table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmscale.errors import LmscaleError
from lmscale.plan.memory import MemoryBreakdown, training_memory
from lmscale.plan.perf import Cluster, TrainingCost, training_cost
from lmscale.plan.pipeline import INTERLEAVED
from lmscale.plan.strategy import Strategy, strategy_problem
from lmscale.plan.units import fmt_bytes
from lmscale.plan.workload import Workload


@dataclass
class Candidate:
    """One strategy, evaluated: its memory and cost, or why it cannot run."""

    strategy: Strategy
    memory: MemoryBreakdown | None = None
    cost: TrainingCost | None = None
    problem: str | None = None

    @property
    def fits(self) -> bool:
        return self.problem is None

    def sort_key(self) -> tuple[float, float, float]:
        return (self.cost.seconds, self.cost.dollars, self.memory.peak)


@dataclass
class Recommendation:
    """The best candidate of each kind of strategy: those that fit ranked first, then the rest."""

    ranked: list[Candidate]
    """The fastest fitting candidate of each kind, fastest first."""
    failing: list[Candidate]
    """For each kind with no fitting candidate, the one closest to fitting, with its reason."""
    considered: list[Candidate]
    """Every candidate evaluated."""

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


def evaluate(workload: Workload, strategy: Strategy, cluster: Cluster) -> Candidate:
    """Memory and cost of `strategy`, or the reason it cannot run on `cluster`."""
    problem = strategy_problem(strategy, workload)
    if problem is None and strategy.n_devices != cluster.n_devices:
        problem = (
            f"dp x tp x pp = {strategy.dp} x {strategy.tp} x {strategy.pp} = "
            f"{strategy.n_devices} devices, but the cluster has {cluster.n_devices}"
        )
    if problem:
        return Candidate(strategy, problem=problem)
    memory = training_memory(workload, strategy)
    cost = training_cost(workload, strategy, cluster)
    candidate = Candidate(strategy, memory, cost)
    if memory.peak > cluster.device.usable_bytes:
        candidate.problem = memory_problem(memory, cluster)
    return candidate


def memory_problem(memory: MemoryBreakdown, cluster: Cluster) -> str:
    """`needs 97.1 GiB per device > 79.0 GiB usable on h100-80gb (activations 52.0 GiB, ...)`."""
    parts = ", ".join(f"{name} {fmt_bytes(size)}" for name, size in memory.largest_parts())
    where = "" if memory.stage == "every device" else f" on the {memory.stage}"
    return (
        f"needs {fmt_bytes(memory.peak)} per device{where} > {fmt_bytes(cluster.device.usable_bytes)}"
        f" usable on {cluster.device.name} ({parts})"
    )


def candidates(workload: Workload, cluster: Cluster, micro_batch: int = 1) -> list[Strategy]:
    """Every strategy worth evaluating for `workload` on all of `cluster`'s devices."""
    n, model = cluster.n_devices, workload.model
    recomputes = ["none", "full"] + (["selective"] if workload.attention == "eager" else [])
    tps = [t for t in _powers_of_two(min(n, cluster.devices_per_node)) if n % t == 0]
    out = []
    for tp in tps:
        for pp in (p for p in range(1, model.n_layers + 1) if model.n_layers % p == 0):
            if n % (tp * pp):
                continue
            dp = n // (tp * pp)
            zeros = [0] if dp == 1 else ([0, 1] if pp > 1 else [0, 1, 2, 3])
            for zero in zeros:
                for sp in (False, True) if tp > 1 else (False,):
                    for recompute in recomputes:
                        strategy = Strategy(dp, tp, pp, zero, sp, recompute, micro_batch)
                        out += [strategy, *_interleaved(strategy, workload)]
    return out


def _interleaved(strategy: Strategy, workload: Workload) -> list[Strategy]:
    """The strategy with two model chunks per pipeline rank, where that can run."""
    if strategy.pp == 1:
        return []
    interleaved = replace(strategy, pp_schedule=INTERLEAVED, virtual_stages=2)
    return [] if strategy_problem(interleaved, workload) else [interleaved]


def recommend(workload: Workload, cluster: Cluster, micro_batch: int = 1) -> Recommendation:
    """Evaluate every candidate; keep the best of each kind, ranked by time then cost."""
    evaluated = [evaluate(workload, s, cluster) for s in candidates(workload, cluster, micro_batch)]
    if not evaluated:
        raise LmscaleError(f"no strategy can spread {workload.model.n_layers} layers over "
                           f"{cluster.n_devices} devices")  # fmt: skip
    kinds: dict[str, list[Candidate]] = {}
    for candidate in evaluated:
        kinds.setdefault(candidate.strategy.family, []).append(candidate)
    ranked, failing = [], []
    for group in kinds.values():
        fitting = [c for c in group if c.fits]
        if fitting:
            ranked.append(min(fitting, key=Candidate.sort_key))
        else:
            failing.append(_closest(group))
    ranked.sort(key=Candidate.sort_key)
    return Recommendation(ranked, failing, evaluated)


def _closest(group: list[Candidate]) -> Candidate:
    """The candidate nearest to fitting: the smallest memory overflow, else any other reason."""
    measured = [c for c in group if c.memory is not None]
    return min(measured, key=lambda c: c.memory.peak) if measured else group[0]


def _powers_of_two(limit: int) -> list[int]:
    out, value = [], 1
    while value <= limit:
        out.append(value)
        value *= 2
    return out
