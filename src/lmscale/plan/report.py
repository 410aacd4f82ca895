"""What `lmscale plan` prints: the plan as text for people, or as JSON for programs."""

from __future__ import annotations

from dataclasses import asdict

from lmscale.plan.calibrate import TOLERANCE, Calibration
from lmscale.plan.flops import forward_flops, training_flops_per_token
from lmscale.plan.inference import ServePlan
from lmscale.plan.memory import MemoryBreakdown
from lmscale.plan.perf import Cluster, strategy_p2p_bytes
from lmscale.plan.pipeline import in_flight_micro_batches, pipeline_bubble_fraction
from lmscale.plan.recommend import Candidate, Recommendation
from lmscale.plan.strategy import Strategy
from lmscale.plan.units import fmt_bytes, fmt_count, fmt_money, fmt_seconds
from lmscale.plan.workload import Workload

# --- training ----------------------------------------------------------------------------------


def training_text(
    workload: Workload, cluster: Cluster, rec: Recommendation, chosen: Candidate | None,
    top: int = 10, show_all: bool = False,
) -> str:  # fmt: skip
    """The whole training plan: the job, the chosen (or best) strategy in detail, the ranking."""
    lines = _job_lines(workload, cluster)
    focus = chosen or rec.best
    if focus is None:
        lines.append(f"\nnothing fits on {cluster.n_devices} x {cluster.device.name}: "
                     "every kind of strategy fails (reasons below)")  # fmt: skip
    else:
        title = "your strategy" if chosen else "recommended"
        lines += ["", f"{title}: {focus.strategy.label}  [{focus.strategy.family}]"]
        if not focus.fits:
            lines.append(f"  does not fit: {focus.problem}")
        lines += _detail_lines(workload, cluster, focus)
    rows = rec.considered if show_all else rec.ranked
    fitting = sorted((c for c in rows if c.fits), key=Candidate.sort_key)
    shown = fitting if top <= 0 else fitting[:top]
    if shown:
        lines += ["", "strategies that fit, fastest first" + (" (every configuration)" if show_all else " (the best of each kind)") + ":"]  # fmt: skip
        lines += _table(shown, workload)
        if len(fitting) > len(shown):
            lines.append(f"  ... and {len(fitting) - len(shown)} more (--top 0 shows all)")
    failing = [c for c in rows if not c.fits] if show_all else rec.failing
    if failing:
        lines += ["", "strategies that do not fit:"]
        width = max(len(c.strategy.family) for c in failing)
        lines += [
            f"  {c.strategy.family:<{width}}  {c.strategy.label}: {c.problem}" for c in failing
        ]
    return "\n".join(lines)


def _job_lines(workload: Workload, cluster: Cluster) -> list[str]:
    model, recipe = workload.model, workload.recipe
    n = model.num_params()
    fwd = forward_flops(model, workload.seq_len)
    per_token, _ = training_flops_per_token(model, workload.seq_len)
    nodes = f"{cluster.nodes} node{'s' if cluster.nodes > 1 else ''} of {cluster.devices_per_node}"
    tokens = workload.train_tokens
    tokens_note = "" if workload.tokens else " (Chinchilla-optimal: 20 per parameter)"
    return [
        f"model: {fmt_count(n)} parameters ({fmt_count(model.num_params(embeddings=False))} "
        f"without embeddings): {model.n_layers} layers, dim {model.dim}, {model.n_heads} heads "
        f"({model.n_kv_heads} kv), MLP {model.hidden_dim}, vocab {model.vocab_size}, {model.family}",
        f"cluster: {cluster.n_devices} x {cluster.device.name} ({nodes}); "
        f"{cluster.device.description}",
        f"job: sequence {workload.seq_len}, global batch {workload.global_batch} sequences "
        f"({fmt_count(workload.global_batch * workload.seq_len)} tokens), "
        f"{fmt_count(tokens)} tokens{tokens_note}, {workload.optimizer}, {workload.attention} "
        f"attention, {recipe.name} precision: {recipe.description}",
        f"compute: {per_token:.3g} FLOPs per token (6N {6 * n:.3g}; attention "
        f"{3 * fwd.attention:.3g}), {per_token * tokens:.3g} FLOPs in all",
    ]


def _detail_lines(workload: Workload, cluster: Cluster, c: Candidate) -> list[str]:
    lines = [
        f"  memory per device ({c.memory.stage}; {fmt_bytes(cluster.device.usable_bytes)} usable):"
    ]
    lines += _memory_lines(c.memory)
    cost, step = c.cost, c.cost.step
    s = c.strategy
    lines += [
        f"  step: {fmt_seconds(step.total)} = compute {fmt_seconds(step.compute)}"
        + (f" + pipeline bubble {fmt_seconds(step.bubble)}" if step.bubble else "")
        + (f" + tensor parallel {fmt_seconds(step.tensor_parallel)}" if step.tensor_parallel else "")
        + (f" + pipeline sends {fmt_seconds(step.pipeline)}" if step.pipeline else "")
        + (f" + exposed data parallel {fmt_seconds(step.exposed_data_parallel)}" if step.exposed_data_parallel else "")
        + f"; {s.micro_batches(workload)} micro-batches of {s.micro_batch} per rank",
        "  communication per device per step: " + (", ".join(
            f"{kind} {fmt_bytes(size)}" for kind, size in step.comm_bytes.items()) or "none")
        + (f" (data parallel takes {fmt_seconds(step.data_parallel)}, hidden behind compute "
           "where shorter)" if step.data_parallel else ""),
        *_pipeline_lines(workload, s),
        f"  bound by {step.bound}",
        f"  to train: {fmt_seconds(cost.seconds)}, {cost.device_hours:,.0f} device-hours, "
        f"{fmt_money(cost.dollars)} at ${cluster.price_per_hour:.2f}/device-hour; "
        f"MFU {cost.mfu:.2f} (assumed {cluster.mfu:.2f} of executed FLOPs)",
        f"  energy: {cost.energy_kwh / 1000:,.3g} MWh ({cluster.power_w:.0f} W per device x PUE "
        f"{cluster.pue}); {cost.co2_kg / 1000:,.3g} t CO2e at {cluster.grid_kg_per_kwh} kg/kWh",
    ]  # fmt: skip
    return lines


def _pipeline_lines(workload: Workload, s: Strategy) -> list[str]:
    """The schedule, its bubble and what its stages keep and send; nothing without a pipeline."""
    if s.pp == 1:
        return []
    p = pipeline_summary(workload, s)
    chunks = f" x {s.virtual_stages} chunks per rank" if s.virtual_stages > 1 else ""
    return [
        f"  pipeline: {s.pp_schedule}, {s.pp} stages{chunks}, {p['micro_batches']} micro-batches: "
        f"bubble {p['bubble_fraction']:.1%} of the step; the first stage keeps "
        f"{p['first_stage_micro_batches']:g} micro-batches' activations; p2p "
        f"{fmt_bytes(p['p2p_bytes'])} sent per rank per step (busiest rank)"
    ]


def pipeline_summary(workload: Workload, s: Strategy) -> dict:
    """What the report says of a pipeline: schedule, bubble fraction, in-flight count, p2p bytes."""
    micro = s.micro_batches(workload)
    return {
        "schedule": s.pp_schedule, "virtual_stages": s.virtual_stages, "micro_batches": micro,
        "bubble_fraction": pipeline_bubble_fraction(s.pp, micro, s.pp_schedule, s.virtual_stages),
        "first_stage_micro_batches": in_flight_micro_batches(
            s.pp, micro, s.pp_schedule, s.virtual_stages),
        "p2p_bytes": strategy_p2p_bytes(workload, s),
    }  # fmt: skip


def _memory_lines(m: MemoryBreakdown) -> list[str]:
    rows = [("parameters", m.parameters), ("gradients", m.gradients),
            ("optimizer states", m.optimizer), ("activations", m.activations)]  # fmt: skip
    rows += [(f"buffer: {name}", size) for name, size in m.buffers.items()]
    rows.append(("peak", m.peak))
    width = max(len(name) for name, _ in rows)
    return [f"    {name:<{width}}  {fmt_bytes(size):>11}" for name, size in rows]


def _table(rows: list[Candidate], workload: Workload) -> list[str]:
    header = ("#", "strategy", "memory/device", "batch", "step", "time to train", "cost", "bound")
    body = [(str(i + 1), c.strategy.label, fmt_bytes(c.memory.peak),
             str(c.strategy.step_tokens(workload) // workload.seq_len), fmt_seconds(c.cost.step.total),
             fmt_seconds(c.cost.seconds), fmt_money(c.cost.dollars),
             c.cost.step.bound.split(" (")[0]) for i, c in enumerate(rows)]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *body)]  # fmt: skip


def training_json(workload: Workload, cluster: Cluster, rec: Recommendation,
                  chosen: Candidate | None, show_all: bool = False) -> dict:  # fmt: skip
    per_token, hardware = training_flops_per_token(workload.model, workload.seq_len)
    rows = rec.considered if show_all else rec.ranked + rec.failing
    return {
        "model": asdict(workload.model) | {"params": workload.model.num_params(),
                  "params_without_embeddings": workload.model.num_params(embeddings=False)},
        "cluster": {"device": asdict(cluster.device)} | {k: v for k, v in asdict(cluster).items() if k != "device"},
        "job": {"seq_len": workload.seq_len, "global_batch": workload.global_batch,
                "tokens": workload.train_tokens, "precision": workload.precision,
                "optimizer": workload.optimizer, "attention": workload.attention,
                "flops_per_token": per_token, "flops": per_token * workload.train_tokens},
        "chosen": candidate_json(chosen, workload) if chosen else None,
        "recommended": candidate_json(rec.best, workload) if rec.best else None,
        "strategies": [candidate_json(c, workload) for c in rows],
    }  # fmt: skip


def candidate_json(c: Candidate, workload: Workload) -> dict:
    out = {"label": c.strategy.label, "kind": c.strategy.family, "strategy": asdict(c.strategy),
           "fits": c.fits, "problem": c.problem}  # fmt: skip
    if c.memory is not None:
        out["memory_bytes"] = asdict(c.memory) | {"model_states": c.memory.model_states}
    if c.cost is not None:
        cost = asdict(c.cost)
        cost["step"] |= {"total": c.cost.step.total, "bound": c.cost.step.bound}
        cost["micro_batches"] = c.strategy.micro_batches(workload)
        out["cost"] = cost
        if c.strategy.pp > 1:
            out["pipeline"] = pipeline_summary(workload, c.strategy)
    return out


# --- serving -----------------------------------------------------------------------------------


def serve_text(plan: ServePlan, model_name: str, device_name: str, others: list[ServePlan]) -> str:
    weights = " | ".join(f"{name} {fmt_bytes(size)}" for name, size in plan.weights_bytes.items())
    lines = [
        f"serving {model_name} on {plan.devices} x {device_name}: {plan.dtype} weights, "
        f"{plan.kv_dtype} KV cache, context {plan.context}",
        f"  weights: {weights}",
        f"  KV cache: {fmt_bytes(plan.kv_bytes_per_token)} per token, "
        f"{fmt_bytes(plan.kv_bytes_per_sequence)} per sequence of {plan.context} tokens",
        f"  memory: {fmt_bytes(plan.kv_budget_bytes)} left for the KV cache after "
        f"{fmt_bytes(plan.weights)} of weights and {fmt_bytes(plan.workspace_bytes)} of "
        "workspace (90% of device memory used)",
        f"  concurrent sequences of {plan.context} tokens: {plan.max_sequences}",
        f"  decode (memory-bandwidth ceiling): {plan.decode_tokens_per_s_single:,.1f} tokens/s "
        f"for one sequence at full context; {plan.decode_tokens_per_s_batch:,.0f} tokens/s over "
        f"{plan.max_sequences} sequences (bound by {plan.batch_bound})",
        f"  prefill of {plan.context} tokens: {fmt_seconds(plan.prefill_seconds)}",
    ]
    if others:
        lines += ["", "  context  sequences  tokens/s (one)  tokens/s (all)"]
        lines += [f"  {p.context:>7}  {p.max_sequences:>9}  {p.decode_tokens_per_s_single:>14,.1f}"
                  f"  {p.decode_tokens_per_s_batch:>14,.0f}" for p in others]  # fmt: skip
    return "\n".join(lines)


def serve_json(plan: ServePlan, others: list[ServePlan]) -> dict:
    return asdict(plan) | {"by_context": [asdict(p) for p in others]}


# --- calibration -------------------------------------------------------------------------------


def calibration_text(c: Calibration) -> str:
    m, w, info = c.memory, c.workload, c.info
    error = c.memory_error
    verdict = f"within {TOLERANCE:.0%}" if c.memory_agrees else f"OUTSIDE {TOLERANCE:.0%}"
    return "\n".join([
        f"calibration of {c.run_dir}: {fmt_count(w.model.num_params())} parameters, batch "
        f"{c.strategy.micro_batch} x {w.seq_len}, {w.precision} precision, "
        f"{info.get('strategy', 'none')} on {info.get('world_size', 1)} process(es), "
        f"{info.get('device_name')} ({c.device.name}, {info.get('threads')} threads)",
        f"  {'':<22}{'predicted':>12}{'measured':>12}",
        f"  {'peak memory':<22}{fmt_bytes(m.peak):>12}{fmt_bytes(c.measured_peak):>12}"
        f"   {error:+.1%} ({verdict})",
        f"  {'step time':<22}{fmt_seconds(c.predicted_step.total):>12}"
        f"{fmt_seconds(c.measured_step_s):>12}   at MFU {c.device.mfu:.2f}; measured: "
        f"MFU {c.measured_mfu:.2f}",
        "  predicted parts: " + ", ".join(f"{name} {fmt_bytes(size)}" for name, size in (
            ("parameters", m.parameters), ("gradients", m.gradients),
            ("optimizer", m.optimizer), ("activations", m.activations),
            ("buffers", m.buffer_total))),
        f"  measured: the steps' peak of allocated memory less the "
        f"{fmt_bytes(info['baseline_alloc_bytes'])} allocated before the model was built; the "
        f"process held {fmt_bytes(c.measured_held)} more than before at its peak (the "
        "allocator's retained free blocks included)",
    ])  # fmt: skip


def calibration_json(c: Calibration) -> dict:
    return {
        "run_dir": str(c.run_dir), "device": c.device.name, "info": c.info,
        "strategy": asdict(c.strategy), "precision": c.workload.precision,
        "predicted_memory": asdict(c.memory), "measured_peak_bytes": c.measured_peak,
        "measured_held_bytes": c.measured_held,
        "memory_error": c.memory_error, "memory_agrees": c.memory_agrees,
        "predicted_step_s": c.predicted_step.total, "measured_step_s": c.measured_step_s,
        "measured_mfu": c.measured_mfu,
    }  # fmt: skip
