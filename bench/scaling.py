"""Scaling of lmscale's parallel strategies: tokens/s, per-rank memory and communication per step.

The parent prepares the data once, then runs every point of the grid (a strategy on N processes)
under torchrun, with this script's `--worker` mode as the training process. Each worker trains
through the real loop (`setup` + `train_step`) and writes one JSON file per rank; the parent
prints one table:

    tok/s        median over the timed steps, all ranks together (global tokens per step)
    vs 1p        ratio to the 1-process plain run, at its default threads (all cores) and at 1
    memory       per-rank peak RSS (CUDA: peak allocated), and the bytes of parameters,
                 gradients and optimizer state each rank holds (local shards of DTensors)
    comm         bytes per step of every collective, counted by a dispatch mode over one step:
                 the full buffer each collective assembles or reduces (all-gather: its output,
                 reduce-scatter: its input, all-reduce: its tensor; a ring moves (N-1)/N of that
                 per rank for the first two, twice that for the last), next to the analytic figure
                 for DDP and FSDP (DDP's own byte counter is in the JSON as a cross-check)
    time         from torch.profiler over a few steps: main-thread time inside communication
                 events (the training thread waiting) and outside them (compute), and the time
                 gloo's own threads spend in collectives, waiting for the peers included

    python bench/scaling.py                                  # the CPU grid, a few minutes
    python bench/scaling.py --points none@1 ddp@2,hook=bf16 fsdp+tp@4,tp=2 --json
    python bench/scaling.py --device cuda --preset gpt2-124m # plain vs FSDP on one GPU

A point is STRATEGY@NPROC[,key=value...] with keys tp, dp_shard, hook (DDP comm hook), threads,
pp, schedule (gpipe, 1f1b, interleaved-1f1b), mb (pipeline micro-batches), v (stages per rank)
and meta (0: build the whole model on every rank before sharding it);
`hf-ddp` is Hugging Face transformers' twin of the model under torch DDP (the same shape and
weights, batch, fused AdamW and clip 1.0), the comparison the house rules ask for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
CPU_GRID = ("none@1", "none@1,threads=1", "ddp@2", "fsdp@2", "tp@2", "fsdp+tp@4,tp=2",
            "hsdp@4,dp_shard=2", "ddp@2,hook=bf16", "ddp@2,hook=powersgd", "fsdp@1",
            "hf-ddp@2", "pp@2", "pp@2,schedule=gpipe", "pp@2,schedule=interleaved-1f1b",
            "pp+fsdp@4,pp=2", "pp+tp@4,tp=2", "fsdp@2,meta=0")  # fmt: skip
GPU_GRID = ("none@1", "fsdp@1", "ddp@2", "fsdp@2", "hf-ddp@2")
MiB = 2**20


@dataclass(frozen=True)
class Point:
    """One grid point: a strategy on `nproc` processes."""

    strategy: str
    nproc: int
    tp: int = 1
    dp_shard: int = 0
    hook: str = "none"
    threads: int = 0
    """Torch threads per process; 0 keeps torchrun's choice (all cores for 1 process, else 1)."""
    pp: int = 0
    schedule: str = "1f1b"
    mb: int = 0
    """Pipeline micro-batches per step (0: one per sequence)."""
    v: int = 2
    """interleaved-1f1b: stages per rank."""
    meta: int = 1
    """1 builds the model on the meta device (each rank allocates its part), 0 everywhere first."""

    @classmethod
    def parse(cls, spec: str) -> Point:
        head, *options = spec.split(",")
        strategy, _, nproc = head.partition("@")
        kwargs = dict(option.split("=", 1) for option in options)
        types = {f.name: f.type for f in fields(cls)}
        kwargs = {k: int(v) if types[k] == "int" else v for k, v in kwargs.items()}
        return cls(strategy, int(nproc or 1), **kwargs)

    @property
    def spec(self) -> str:
        defaults = Point(self.strategy, self.nproc)
        extra = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(defaults, k)]
        return ",".join([f"{self.strategy}@{self.nproc}", *extra])


# ---------------------------------------------------------------- counting collectives


class CollectiveBytes(TorchDispatchMode):
    """Bytes of the collectives dispatched while active, by op (`c10d.*`, `_c10d_functional.*`).

    Eager collectives (DDP's hooks, FSDP2) reach the dispatcher as `c10d` ops, DTensor's (tensor
    parallel) as `_c10d_functional` ops. An op on DTensors is let through first (NotImplemented),
    so it comes back here as the collectives it turns into, as in `CommDebugMode`.
    """

    NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier_",
                       "check_for_nan")  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        collective = func.namespace.startswith(("c10d", "_c10d_functional"))
        if collective and func._opname not in self.NOT_COLLECTIVES:
            self.by_op[f"{func.namespace}.{func._opname}"] += _payload(func, args, kwargs, out)
        return out


def _payload(func, args, kwargs, out) -> int:
    """The larger of what a collective reads and what it writes.

    c10d's schemas don't mark their outputs as written, but name them `output*` (or `out`);
    functional collectives return theirs.
    """
    read = written = 0
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.name.startswith("output") or arg.name == "out":
            written += _tensor_bytes(value)
        else:
            read += _tensor_bytes(value)
    return max(read, written or _tensor_bytes(out))


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def analytic_comm_bytes(
    strategy: str, hook: str, model, param_bytes: int, reshard: bool
) -> int | None:
    """Collective bytes per step that DDP and FSDP should show, from the parameter count.

    DDP all-reduces every gradient (bf16 hook: at half the bytes). FSDP all-gathers every
    parameter in the forward, again in the backward if `reshard` (lmscale reshards the root
    too), and reduce-scatters all gradients in fp32, none of it on a shard group of one; HSDP
    adds an all-reduce of the shard across the replicas. Parameters travel in `param_bytes`.
    """
    params = _unique(model.parameters())
    total = sum(p.numel() for p in params)  # DTensor.numel() is global
    if strategy == "ddp":
        return {"none": 4 * total, "bf16": 2 * total}.get(hook)
    if strategy not in ("fsdp", "hsdp"):
        return None
    mesh = params[0].device_mesh
    shard = mesh["dp_shard"].size()
    fsdp = param_bytes * total * (2 if reshard else 1) + 4 * total if shard > 1 else 0
    if strategy == "hsdp" and mesh["dp_replicate"].size() > 1:
        fsdp += 4 * total // shard
    return fsdp


# ---------------------------------------------------------------- memory and time


def _unique(params):
    return list({id(p): p for p in params}.values())


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(params, optimizer) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds."""
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "param_bytes": sum(_local_bytes(p) for p in _unique(params)),
        "optim_bytes": sum(_local_bytes(v) for v in states),
    }


def grad_bytes(optimizer) -> int:
    """Bytes of the gradients held right now (call before `zero_grad`)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return sum(_local_bytes(p.grad) for p in _unique(params) if p.grad is not None)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # Linux: KiB


def timed(step, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


COMM_EVENT = re.compile(
    r"c10d|gloo|nccl|all_?reduce|all_?gather|reduce_scatter|post_backward_reduce|wait", re.I
)


def profile_comm(step, n_steps: int) -> dict[str, float]:
    """Per-step ms of the step, of the training threads inside communication, and of gloo's.

    Only outermost matching events count, so `c10d::allreduce_` and what runs inside it are not
    added twice. FSDP's `all_gather` and `post_backward_reduce` scopes hold the wait for their
    collective, and also their copies in and out. gloo runs each collective on a thread of its
    own (`gloo:*` events): `backend_ms` is their time, waiting for the peers included.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            with record_function("bench_step"):
                step()
    events = prof.events()
    steps = [e for e in events if e.name == "bench_step"]
    comm = [e for e in events if COMM_EVENT.search(e.name) and not _inside_match(e)]
    backend = [e for e in comm if e.name.startswith("gloo:")]
    waits = [e for e in comm if not e.name.startswith("gloo:")]  # main (and autograd) thread
    per_step = lambda evs: sum(e.time_range.elapsed_us() for e in evs) / n_steps / 1e3  # noqa: E731
    step_ms, comm_ms = per_step(steps), per_step(waits)
    names = Counter()
    for e in comm:
        names[e.name.split(" (")[0]] += e.time_range.elapsed_us() / n_steps / 1e3
    return {
        "step_ms": step_ms,
        "comm_ms": comm_ms,
        "compute_ms": step_ms - comm_ms,
        "backend_ms": per_step(backend),
        "comm_events_ms": dict(names.most_common(10)),
    }


def _inside_match(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if COMM_EVENT.search(parent.name):
            return True
        parent = parent.cpu_parent
    return False


# ---------------------------------------------------------------- the worker (one rank)


def measure(step, args, device, optimizer, params, comm=None) -> dict:
    """Warm up, time, count collectives over one step, then profile; this rank's results."""
    for _ in range(args.warmup):
        step()
    if comm:
        comm.take()
    times, ddp_bytes = [], []
    for _ in range(args.steps):
        times.append(timed(step, device))
        if comm:
            ddp_bytes.append(comm.take())
    grads: list[int] = []
    hook = optimizer.register_step_pre_hook(lambda opt, *_: grads.append(grad_bytes(opt)))
    with CollectiveBytes() as counted:
        step()
    hook.remove()
    if comm:
        comm.take()
    out = {"step_s": times, "step_s_median": statistics.median(times)}
    out |= {"comm_by_op": dict(counted.by_op), "comm_bytes": sum(counted.by_op.values())}
    out |= {"ddp_counter_bytes": statistics.median(ddp_bytes) if ddp_bytes else None}
    out |= state_bytes(params, optimizer) | {"grad_bytes": grads[0]}
    out["peak_mem_mib"] = peak_memory_mib(device)
    out["profile"] = profile_comm(step, args.profile_steps) if args.profile_steps else None
    return out


def lmscale_worker(point: Point, args) -> dict:
    from lmscale.train.config import load_run_config
    from lmscale.train.loop import _tokens_per_step, setup, train_step
    from lmscale.train.precision import DTYPES

    config = load_run_config(args.config, run_overrides(point, args))
    before = peak_rss_bytes()
    run = setup(config, Path(args.result_dir) / "run", resume=False)
    setup_growth = peak_rss_bytes() - before
    out = measure(lambda: train_step(run), args, run.device, run.optimizer,
                  run.model.parameters(), run.parallel.comm)  # fmt: skip
    param_bytes = (
        DTYPES[config.train.dtype].itemsize if run.parallel.strategy in ("fsdp", "hsdp") else 4
    )
    analytic = analytic_comm_bytes(
        run.parallel.strategy, point.hook, run.model, param_bytes,
        config.parallel.reshard_after_forward,
    )  # fmt: skip
    # PowerSGD: no formula here; its hook counts what it hands to the all-reduces.
    out["analytic_comm_bytes"] = analytic if analytic is not None else out["ddp_counter_bytes"]
    out["tokens_per_step"] = _tokens_per_step(run)
    out["model_params"] = config.model.num_params()
    out["setup_peak_growth_mib"] = setup_growth / MiB
    pipeline = run.parallel.pipeline
    if pipeline is not None:  # the planner's bubble and sends for this pipeline, to compare
        from lmscale.plan import (
            pipeline_bubble_fraction,
            pipeline_message_bytes,
            pipeline_p2p_bytes,
        )

        stages_per_rank = len(pipeline.stages)
        rows = config.train.batch_size // pipeline.n_microbatches
        message = pipeline_message_bytes(
            rows, run.context, config.model.dim, 4, run.parallel.tp_size,
            config.parallel.sequence_parallel and run.parallel.tp_size > 1,
        )  # fmt: skip
        pp = run.parallel.pp_size
        out["pipeline"] = {
            "pp": pp, "microbatches": pipeline.n_microbatches, "virtual_stages": stages_per_rank,
            "bubble_formula": pipeline_bubble_fraction(
                pp, pipeline.n_microbatches, config.parallel.pp_schedule, stages_per_rank
            ),
            "p2p_bytes_formula": pipeline_p2p_bytes(
                pp, pipeline.n_microbatches, message, stages_per_rank
            ),
        }  # fmt: skip
    _finish(run.parallel.distributed)
    return out


def run_overrides(point: Point, args) -> list[str]:
    """`--section.field value` overrides for the run config of `point`."""
    o = {"data.path": args.data, "train.batch_size": args.batch, "train.dtype": args.dtype,
         "train.device": args.device, "train.eval_interval": 0, "train.checkpoint_interval": 0,
         "train.max_steps": 10_000, "train.grad_accum_steps": 1, "train.compile": "false",
         "parallel.strategy": point.strategy, "parallel.tp": point.tp,
         "parallel.dp_shard": point.dp_shard, "parallel.ddp_comm_hook": point.hook,
         "parallel.powersgd_start_step": 2, "parallel.timeout_s": 300,
         "parallel.pp": point.pp, "parallel.pp_schedule": point.schedule,
         "parallel.pp_microbatches": point.mb, "parallel.pp_virtual_stages": point.v,
         "train.meta_init": "true" if point.meta else "false"}  # fmt: skip
    if args.context:
        o["train.context"] = args.context
    if args.preset:
        o["model.preset"] = args.preset
    return [s for key, value in o.items() for s in (f"--{key}", str(value))]


def hf_worker(point: Point, args) -> dict:
    """transformers' LlamaForCausalLM / GPT2LMHeadModel twin under torch DDP, the same batch."""
    from torch.nn.parallel import DistributedDataParallel
    from train_throughput import hf_model  # bench/ is this script's folder: sys.path[0]

    from lmscale.data import Loader, TokenDataset
    from lmscale.model import Transformer
    from lmscale.parallel import device_for, init_process_group, ranks_from_env
    from lmscale.train.config import load_run_config
    from lmscale.train.optim import build_optimizer
    from lmscale.train.precision import resolve_device

    config = load_run_config(args.config, run_overrides(Point("ddp", point.nproc), args))
    cfg, ranks = config.train, ranks_from_env()
    device = device_for(ranks, resolve_device(cfg.device))
    init_process_group(ranks, device)
    data = TokenDataset(args.data, "train")
    model_cfg = config.model.replace(vocab_size=data.manifest.vocab_size)
    torch.manual_seed(cfg.seed)
    model = hf_model(model_cfg, Transformer(model_cfg)).to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = build_optimizer(model, "adamw", cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    context = cfg.context or model_cfg.max_seq_len
    loader = Loader(data, cfg.batch_size, context, config.data.seed, ranks.rank, ranks.world_size)
    dtype = cfg.dtype

    def step() -> None:
        inputs, _ = loader.next_batch()
        inputs = inputs.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = ddp(input_ids=inputs, labels=inputs).loss  # the HF way: it shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = measure(step, args, device, optimizer, model.parameters())
    out["analytic_comm_bytes"] = 4 * sum(p.numel() for p in _unique(model.parameters()))
    out["tokens_per_step"] = cfg.batch_size * context * ranks.world_size
    out["model_params"] = sum(p.numel() for p in _unique(model.parameters()))
    _finish(True)
    return out


def _finish(distributed: bool) -> None:
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def worker(args) -> None:
    point = Point.parse(args.worker)
    if point.threads:
        torch.set_num_threads(point.threads)
    base_rss = peak_memory_mib(torch.device("cpu"))
    threads = torch.get_num_threads()
    result = (hf_worker if point.strategy == "hf-ddp" else lmscale_worker)(point, args)
    result |= {"threads": threads, "base_rss_mib": base_rss, "rank": int(os.environ["RANK"])}
    path = Path(args.result_dir) / f"rank{result['rank']}.json"
    path.write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent


def launch(point: Point, args, work: Path) -> dict:
    """Run `point` under torchrun (again after a failure, up to `--retries` times)."""
    failures = []
    for attempt in range(1 + args.retries):
        row = launch_once(point, args, work / f"{len(failures)}-{point.spec}")
        if "error" not in row:
            return row | {"failed_attempts": failures}
        failures.append(row["error"])
        print(f"{point.spec} failed (attempt {attempt + 1}):\n{row['error']}", file=sys.stderr)
    return row | {"failed_attempts": failures}


def launch_once(point: Point, args, result_dir: Path) -> dict:
    """Run `point` under torchrun once; its ranks' results, or the error."""
    result_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={point.nproc}", __file__, "--worker", point.spec,
           "--result-dir", str(result_dir), *worker_args(args)]  # fmt: skip
    with OtherLoad() as other:
        returncode, output = run_group(cmd, args.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    if returncode or len(ranks) != point.nproc:
        lines = output.strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln or "what()" in ln]
        return {"point": point.spec, "error": "\n".join(errors[:4] or lines[-15:])}
    return summarize(point, sorted(ranks, key=lambda r: r["rank"])) | other.result


def run_group(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run `cmd` in a process group of its own; on timeout, kill that group (torchrun's workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)  # fmt: skip
    try:
        output = proc.communicate(timeout=timeout)[0]
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return -9, f"Error: timed out after {timeout:g} s\n" + proc.communicate()[0]


class OtherLoad:
    """Cores kept busy by processes other than this one's children, while the block ran.

    The machine's busy time (/proc/stat) minus the CPU time of the children it waited for.
    """

    def __enter__(self) -> OtherLoad:
        self.start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        (wall, busy, ours), (wall0, busy0, ours0) = self._sample(), self.start
        other = max(0.0, (busy - busy0) - (ours - ours0)) / (wall - wall0)
        self.result = {"wall_s": wall - wall0, "other_load": other}

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime


def worker_args(args) -> list[str]:
    out = ["--data", args.data, "--config", str(args.config), "--dtype", args.dtype,
           "--device", args.device, "--batch", str(args.batch), "--context", str(args.context or 0),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--profile-steps", str(args.profile_steps)]  # fmt: skip
    return out + (["--preset", args.preset] if args.preset else [])


def summarize(point: Point, ranks: list[dict]) -> dict:
    """One row: rank 0's timings, the largest per-rank memory figures, all ranks in `ranks`."""
    head = ranks[0]
    row = {"point": point.spec, "strategy": point.strategy, "nproc": point.nproc}
    row |= {"threads": head["threads"], "tokens_per_step": head["tokens_per_step"]}
    row["tok_s"] = head["tokens_per_step"] / head["step_s_median"]
    row["step_ms"] = 1e3 * head["step_s_median"]
    for key in ("peak_mem_mib", "param_bytes", "grad_bytes", "optim_bytes"):
        row[key] = max(r[key] for r in ranks)
    for key in ("comm_bytes", "analytic_comm_bytes", "ddp_counter_bytes", "comm_by_op", "profile"):
        row[key] = head[key]
    row |= {"model_params": head["model_params"], "ranks": ranks}
    row["setup_peak_growth_mib"] = max(r.get("setup_peak_growth_mib", 0.0) for r in ranks)
    row["pipeline"] = head.get("pipeline")
    if row["pipeline"]:  # what the busiest rank sent point to point in one step
        row["pipeline"]["p2p_bytes_counted"] = max(
            sum(n for op, n in r["comm_by_op"].items() if "send" in op) for r in ranks
        )
    return row


def prepare_data(args, work: Path) -> str:
    from lmscale.data import prepare
    from lmscale.model import PRESETS
    from lmscale.train.config import load_run_config

    config = load_run_config(args.config, ["--model.preset", args.preset] if args.preset else [])
    vocab = args.vocab_size or config.model.vocab_size or PRESETS["shakespeare-10m"]["vocab_size"]
    out = work / "data"
    print(f"preparing shakespeare (vocab {vocab}) in {out} ...", file=sys.stderr)
    prepare("shakespeare", out, vocab_size=vocab)
    return str(out)


def choose_points(args) -> list[Point]:
    grid = args.points or (GPU_GRID if args.device == "cuda" else CPU_GRID)
    try:
        points = [Point.parse(spec) for spec in grid]
    except (KeyError, TypeError, ValueError) as error:
        sys.exit(f"bad --points ({error}): write STRATEGY@NPROC[,KEY=VALUE...] (see --help)")
    if args.strategies:
        points = [p for p in points if p.strategy in args.strategies]
    if args.nproc_list:
        points = [p for p in points if p.nproc in args.nproc_list]
    if args.device == "cuda" and not args.points:
        points = [p for p in points if p.nproc <= torch.cuda.device_count()]
    return points


def print_table(rows: list[dict], baselines: dict[str, float]) -> None:
    head = ("point", "procs x threads", "tok/s", "step ms", "vs 1p (all thr)", "vs 1p (1 thr)",
            "peak RSS MiB", "params / grads / optim MiB", "comm MB/step", "expected MB",
            "compute ms", "comm wait ms", "gloo ms", "other load")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for row in rows:
        if "error" in row:
            print(f"| {row['point']} | failed (below) |")
            continue
        print("| " + " | ".join(table_cells(row, baselines)) + " |")


def table_cells(row: dict, baselines: dict[str, float]) -> list[str]:
    ratios = [f"{row['tok_s'] / b:.2f}x" if b else "-" for b in baselines.values()]
    state = (row["param_bytes"], row["grad_bytes"], row["optim_bytes"])
    counted, expected = row["comm_bytes"], row["analytic_comm_bytes"]
    # DDP's buffer broadcast is not in the expected figure; the rest should all be there.
    checked = sum(n for op, n in row["comm_by_op"].items() if "broadcast" not in op)
    missed = expected is not None and checked < 0.95 * expected
    prof = row["profile"] or {}
    failed = len(row["failed_attempts"])
    retried = f" ({failed} failed run(s) first, below)" if failed else ""
    return [
        row["point"] + retried, f"{row['nproc']} x {row['threads']}", f"{row['tok_s']:,.0f}",
        f"{row['step_ms']:,.0f}", *ratios,
        f"{row['peak_mem_mib']:,.0f}", " / ".join(f"{b / MiB:.1f}" for b in state),
        f"{counted / 1e6:.2f}" + (" (missed)" if missed else ""),
        "-" if expected is None else f"{expected / 1e6:.2f}",
        *(f"{prof[k]:,.0f}" if k in prof else "-" for k in ("compute_ms", "comm_ms", "backend_ms")),
        f"{row['other_load']:.2f}",
    ]  # fmt: skip


def print_pipeline_table(rows: list[dict], baselines: dict[str, float]) -> None:
    """Pipeline points: the bubble measured (against N ideal 1-thread processes) and planned."""
    pipes = [r for r in rows if "error" not in r and r.get("pipeline")]
    if not pipes:
        return
    print("\n| point | micro-batches x stages/rank | tok/s | bubble measured | bubble formula |"
          " p2p sends MB/step counted | planned |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    one = baselines["one_thread"]
    for row in pipes:
        pipe = row["pipeline"]
        # NOTE: measured = 1 - throughput / (nproc x one 1-thread process): it holds the sends
        # and the stages' imbalance too, which the formula leaves out.
        measured = f"{1 - row['tok_s'] / (row['nproc'] * one):.2f}" if one else "-"
        print(
            f"| {row['point']} | {pipe['microbatches']} x {pipe['virtual_stages']} | "
            f"{row['tok_s']:,.0f} | {measured} | {pipe['bubble_formula']:.2f} | "
            f"{pipe['p2p_bytes_counted'] / 1e6:.2f} | {pipe['p2p_bytes_formula'] / 1e6:.2f} |"
        )


def print_setup_table(rows: list[dict]) -> None:
    """Per-rank peak memory growth while setting up (building, sharding, initialising)."""
    print("\n| point | setup peak growth MiB (per rank, max) | model fp32 MiB |")
    print("|---|---:|---:|")
    for row in rows:
        if "error" not in row:
            print(
                f"| {row['point']} | {row['setup_peak_growth_mib']:,.1f} | "
                f"{4 * row['model_params'] / MiB:,.1f} |"
            )


def find_baselines(rows: list[dict]) -> dict[str, float]:
    """tok/s of the 1-process plain run at its default threads and at 1 thread (0 if not run)."""
    plain = [r for r in rows if "error" not in r and r["strategy"] == "none" and r["nproc"] == 1]
    default = next((r["tok_s"] for r in plain if not Point.parse(r["point"]).threads), 0.0)
    one = next((r["tok_s"] for r in plain if r["threads"] == 1), 0.0)
    return {"default_threads": default, "one_thread": one}


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    points = choose_points(args)
    with tempfile.TemporaryDirectory(prefix="lmscale-scaling-") as tmp:
        work = Path(tmp)
        args.data = args.data or prepare_data(args, work)
        rows = []
        for point in points:
            print(f"running {point.spec} ...", file=sys.stderr, flush=True)
            rows.append(launch(point, args, work))
    report(rows, args)


def report(rows: list[dict], args) -> None:
    baselines = find_baselines(rows)
    ok = {r["point"]: r for r in rows if "error" not in r}
    ratio = None
    if {"ddp@2", "hf-ddp@2"} <= set(ok):
        ratio = ok["ddp@2"]["tok_s"] / ok["hf-ddp@2"]["tok_s"]
    summary = {"machine": machine(args), "args": vars(args), "baselines_tok_s": baselines}
    summary |= {"lmscale_over_transformers_ddp2": ratio, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary))
    if args.json:
        print(json.dumps(summary))
        return
    first = next(iter(ok.values()), None)
    print(f"machine: {summary['machine']}")
    if first:
        base = first["ranks"][0]["base_rss_mib"]
        print(f"{Path(args.config).name} {args.preset or ''} ({first['model_params'] / 1e6:.1f}M "
              f"params), {args.dtype}, batch {args.batch} x {args.context or 'max_seq_len'} tokens "
              f"per data-parallel rank; {args.steps} timed steps after {args.warmup}; RSS of a "
              f"process after importing torch: {base:.0f} MiB")  # fmt: skip
    print_table(rows, baselines)
    print_pipeline_table(rows, baselines)
    print_setup_table(rows)
    if ratio:
        print(f"lmscale ddp@2 / transformers ddp@2 tok/s: {ratio:.2f}x")
    print(NOTES)
    for row in rows:
        for error in row["failed_attempts"]:
            print(f"\n{row['point']} failed:\n{error}")


NOTES = """\
vs 1p: tok/s over the 1-process plain run (none@1) with all its threads / with 1 thread.
params / grads / optim: held by the worst rank (local shards); grads as the optimizer sees them.
comm MB/step: the collectives of one step, counted by a dispatch mode (the full buffer each one
  gathers or reduces); "(missed)": short of the expected figure, so some escaped the count.
expected: DDP/FSDP/HSDP from the parameter count; PowerSGD: its hook's own count.
compute / comm wait: main-thread ms per step outside / inside communication events
  (torch.profiler); gloo ms: gloo's own threads inside collectives, waiting for peers included.
other load: cores that other processes kept busy meanwhile (this machine is shared)."""


def machine(args) -> str:
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?"
        )
    return f"{name} | {os.cpu_count()} cores | torch {torch.__version__}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"default grid: {' '.join(CPU_GRID)} (cuda: {' '.join(GPU_GRID)})",
    )  # fmt: skip
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-10m.toml"))
    ap.add_argument("--preset", help="model preset instead of the config's (e.g. gpt2-124m)")
    ap.add_argument("--data", help="a prepared data folder (default: prepare one in a tmp dir)")
    ap.add_argument("--vocab-size", type=int, default=0, help="if preparing (default: the model's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--batch", type=int, default=0, help="per data-parallel rank (default 4; cuda 8)"
    )
    ap.add_argument("--context", type=int, default=None, help="default 128 (cuda: the model's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: none)")
    ap.add_argument("--points", nargs="+", help="grid points, e.g. ddp@2,hook=bf16")
    ap.add_argument("--strategies", nargs="+", help="keep only these strategies of the grid")
    ap.add_argument("--nproc-list", type=int, nargs="+", help="keep only these process counts")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per grid point")
    ap.add_argument("--retries", type=int, default=1, help="runs again of a point that failed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--json-out", help="also write that JSON object to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = args.batch or (8 if args.device == "cuda" else 4)
    if args.context is None:
        args.context = 0 if args.device == "cuda" else 128
    return args


if __name__ == "__main__":
    main()
