"""`lmscale plan` against what training really takes, and against the other estimators.

0. `lmscale plan --calibrate` on real `lmscale train` runs of the default model (bf16 autocast,
   fp32, recomputation, gradient accumulation, DDP on 2 processes): predicted against measured.
1. Measured: one training step of lmscale and of its Hugging Face transformers twin (same shape,
   AdamW, torch.autocast bf16 or fp32) on this CPU, each in its own process: the peak of
   allocated memory (malloc's bytes in use when the step starts, plus the peak of tensor storage
   the step creates, tracked op by op) above what was allocated before the model was built.
   Beside it: lmscale's prediction (precision `amp` or `fp32`; lmscale's chunked loss, or full
   logits for transformers), accelerate's `estimate-memory` training figure (its
   `estimate_training_usage` on the twin's size) and DeepSpeed's ZeRO-2 model-state estimate for
   one device. Error = (predicted - measured) / measured.
2. Large models: per-device memory of model states from lmscale, DeepSpeed's ZeRO-2 and ZeRO-3
   estimators and accelerate, with lmscale's peak including activations.
3. Latency: `lmscale plan` as a user runs it (a fresh process), and the ranking alone in process.

    python bench/plan.py                 # everything (about five minutes on 2 cores)
    python bench/plan.py --skip-measured # parts 2 and 3 only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB, GiB = 2**20, 2**30
SHAPES = {
    # The default model of `make run` (grouped-query attention) and an MHA GPT-2-style twin.
    "shakespeare-10m": dict(family="llama", vocab_size=4096, dim=384, n_layers=6, n_heads=6,
                            n_kv_heads=2, hidden_dim=1024, max_seq_len=256),
    "llama-mha-12m": dict(family="llama", vocab_size=4096, dim=384, n_layers=6, n_heads=6,
                          n_kv_heads=6, hidden_dim=1024, max_seq_len=256),
    "gpt2-17m": dict(family="gpt2", vocab_size=4096, dim=384, n_layers=6, n_heads=6,
                     hidden_dim=1536, max_seq_len=256),
}  # fmt: skip


def worker(tool: str, shape: str, dtype: str, batch: int) -> dict:
    """One measured training step (after two warm-up steps) of `tool`'s model; JSON out."""
    import torch

    from lmscale.model import ModelConfig, Transformer
    from lmscale.train.loss import lm_loss_sum
    from lmscale.train.memory import TensorPeak, malloc_in_use_bytes
    from lmscale.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape])
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    baseline = malloc_in_use_bytes()
    model = Transformer(cfg)
    if tool == "transformers":
        from train_throughput import hf_model  # bench/ is this script's folder: sys.path[0]

        model = hf_model(cfg, model)
        loss_fn = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
    else:
        loss_fn = lambda: lm_loss_sum(model, tokens[:, :-1], tokens[:, 1:]) / tokens.numel()  # noqa: E731
    optimizer = build_optimizer(model, "adamw", 1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    start = malloc_in_use_bytes()
    with TensorPeak() as tracker:
        step()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_bytes": start + tracker.peak - baseline, "param_bytes": total}


CALIBRATION_RUNS = {
    "bf16 autocast": [],
    "fp32": ["--train.dtype", "float32"],
    "bf16, recomputation": ["--train.activation_checkpointing", "true"],
    "bf16, 2 micro-batches": ["--train.grad_accum_steps", "2", "--train.batch_size", "8"],
    "bf16, DDP on 2 processes": ["--parallel.strategy", "ddp", "--nproc", "2"],
}


def print_calibration(data: Path, out: Path) -> None:
    from lmscale.plan.calibrate import calibrate

    print("\n0. lmscale plan --calibrate on lmscale train runs of shakespeare-10m "
          "(batch 16 x 256 unless stated, 4 steps)")  # fmt: skip
    print(f"{'run':<26} {'predicted MiB':>13} {'measured MiB':>12} {'error':>7} {'held MiB':>9}")
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    for name, extra in CALIBRATION_RUNS.items():
        run = out / name.replace(" ", "_").replace(",", "")
        command = [sys.executable, "-m", "lmscale", "train", "--config",
                   str(ROOT / "configs/shakespeare-10m.toml"), "--data.path", str(data), "--out",
                   str(run), "--train.max_steps", "4", "--train.log_interval", "1",
                   "--train.eval_interval", "0", "--train.checkpoint_interval", "0",
                   "--sample-tokens", "0", "--no-progress", *extra]  # fmt: skip
        subprocess.run(command, capture_output=True, check=True, env=env)
        c = calibrate(run)
        print(f"{name:<26} {c.memory.peak / MiB:>13.0f} {c.measured_peak / MiB:>12.0f} "
              f"{c.memory_error:>+7.1%} {c.measured_held / MiB:>9.0f}")  # fmt: skip


def measured_rows(dtypes: list[str], batch: int) -> list[dict]:
    from accelerate.commands.estimate import estimate_training_usage

    from lmscale.model import ModelConfig
    from lmscale.plan.memory import training_memory
    from lmscale.plan.strategy import Strategy
    from lmscale.plan.workload import Workload

    rows = []
    for shape in SHAPES:
        cfg = ModelConfig(**SHAPES[shape])
        for dtype in dtypes:
            for tool in ("lmscale", "transformers"):
                seq = cfg.max_seq_len - (1 if tool == "lmscale" else 0)
                out = _run_worker(tool, shape, dtype, batch)
                precision = "amp" if dtype == "bfloat16" else "fp32"
                workload = Workload(cfg, seq, seq * batch, precision=precision,
                                    fused_loss=tool == "lmscale")  # fmt: skip
                predicted = training_memory(workload, Strategy(micro_batch=batch)).peak
                accelerate = max(estimate_training_usage(out["param_bytes"], dtype).values())
                rows.append(dict(shape=shape, dtype=dtype, tool=tool, measured=out["peak_bytes"],
                                 lmscale=predicted, accelerate=accelerate,
                                 deepspeed=_deepspeed_zero2(cfg.num_params(), 1)))  # fmt: skip
    return rows


def _run_worker(tool: str, shape: str, dtype: str, batch: int) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    command = [sys.executable, __file__, "--worker", tool, shape, dtype, str(batch)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _deepspeed_zero2(params: float, gpus: int) -> float | None:
    """DeepSpeed's ZeRO-2 per-GPU model-state estimate (no offload), bytes; None if absent."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(
        int(params), num_gpus_per_node=gpus, cpu_offload=False
    )
    return gpu_bytes


def _deepspeed_zero3(params: float, largest: float, gpus: int) -> float | None:
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        int(params), int(largest), gpus, 1, cpu_offload=False, cpu_offload_params=False
    )
    return gpu_bytes


def print_measured(rows: list[dict]) -> None:
    print("\n1. one training step on this CPU: allocated peak (MiB), predictions and their error")
    print(f"{'shape':<16} {'dtype':<9} {'trained by':<13} {'measured':>9} {'lmscale plan':>13} "
          f"{'error':>7} {'accelerate':>11} {'error':>7} {'DeepSpeed':>10} {'error':>7}")  # fmt: skip
    for r in rows:
        cells = [f"{r['shape']:<16} {r['dtype']:<9} {r['tool']:<13} {r['measured'] / MiB:>9.0f}"]
        for key, width in (("lmscale", 13), ("accelerate", 11), ("deepspeed", 10)):
            value = r[key]
            if value is None:
                cells.append(f"{'n/a':>{width}} {'':>7}")
            else:
                cells.append(f"{value / MiB:>{width}.0f} {value / r['measured'] - 1:>+7.0%}")
        print(" ".join(cells))
    errors = [abs(r["lmscale"] / r["measured"] - 1) for r in rows]
    print(
        f"lmscale plan: median |error| {statistics.median(errors):.1%}, largest {max(errors):.1%}"
    )


def print_large() -> None:
    from lmscale.plan.memory import training_memory
    from lmscale.plan.models import named_model
    from lmscale.plan.strategy import Strategy
    from lmscale.plan.workload import Workload

    print("\n2. model states per device (GiB), mixed-precision AdamW; lmscale's peak adds "
          "activations (seq 4096, micro-batch 1, flash attention)")  # fmt: skip
    print(f"{'model':<11} {'devices':>7} {'strategy':<7} {'lmscale states':>14} {'DeepSpeed':>10} "
          f"{'lmscale peak':>12} {'accelerate (1 device)':>22}")  # fmt: skip
    from accelerate.commands.estimate import estimate_training_usage

    for name, gpus in (("llama2-7b", 8), ("llama2-13b", 8), ("llama2-70b", 64)):
        model = named_model(name)
        workload = Workload(model, 4096, 4096 * gpus * 8, precision="mixed")
        largest = model.vocab_size * model.dim
        accel = max(estimate_training_usage(model.num_params() * 4, "bfloat16").values())
        for zero, ds in ((2, _deepspeed_zero2(model.num_params(), gpus)),
                         (3, _deepspeed_zero3(model.num_params(), largest, gpus))):  # fmt: skip
            mem = training_memory(workload, Strategy(dp=gpus, zero=zero))
            ds_text = f"{ds / GiB:>10.1f}" if ds else f"{'n/a':>10}"
            print(f"{name:<11} {gpus:>7} {'zero' + str(zero):<7} {mem.model_states / GiB:>14.1f} "
                  f"{ds_text} {mem.peak / GiB:>12.1f} {accel / GiB:>22.1f}")  # fmt: skip


def print_latency(repeats: int) -> None:
    from lmscale.plan.hardware import accelerator
    from lmscale.plan.models import named_model
    from lmscale.plan.perf import Cluster
    from lmscale.plan.recommend import recommend
    from lmscale.plan.workload import Workload

    command = [sys.executable, "-m", "lmscale", "plan", "--params", "70e9", "--layers", "80",
               "--hidden", "8192", "--heads", "64", "--kv-heads", "8", "--gpu", "a100-80gb",
               "--gpus", "512"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=env)
        walls.append(time.perf_counter() - start)
    workload = Workload(named_model("llama2-70b"), 4096, 4e6)
    cluster = Cluster.of(accelerator("a100-80gb"), 512)
    inner = []
    for _ in range(repeats):
        start = time.perf_counter()
        rec = recommend(workload, cluster)
        inner.append(time.perf_counter() - start)
    print(f"\n3. latency: `lmscale plan` for 70B on 512 A100s, a fresh process: median "
          f"{statistics.median(walls) * 1e3:.0f} ms over {repeats}; the ranking alone "
          f"({len(rec.considered)} strategies): {statistics.median(inner) * 1e3:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-measured", action="store_true")
    parser.add_argument(
        "--data",
        default=str(ROOT / "data/shakespeare"),
        help="prepared data for part 0 (lmscale prepare --corpus shakespeare)",
    )
    args = parser.parse_args()
    if args.worker:
        tool, shape, dtype, batch = args.worker
        print(json.dumps(worker(tool, shape, dtype, int(batch))))
        return
    import torch

    from lmscale.train.run_info import describe_machine

    info = describe_machine(torch.device("cpu"))
    print(f"machine: {info['device_name']}, {info['cpu_count']} cores, torch {info['torch']}, "
          f"python {info['python']}")  # fmt: skip
    if not args.skip_measured:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print_calibration(Path(args.data), Path(tmp))
        print_measured(measured_rows(args.dtypes.split(","), args.batch))
    print_large()
    print_latency(args.repeats)


if __name__ == "__main__":
    main()
