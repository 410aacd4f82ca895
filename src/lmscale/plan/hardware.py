"""The hardware catalog: what one accelerator can hold, compute, move and burn.

Figures are the vendors' data-sheet numbers for dense math (no 2:4 sparsity): 16-bit tensor-core
FLOP/s, plain FP32 FLOP/s (what fp32 training gets: PyTorch leaves TF32 off for matmuls), memory
bandwidth and board power. Interconnect figures are per device and one direction: NVLink (or
PCIe) to the other devices of a node, and the network share of one device between nodes.
Prices are indicative on-demand cloud prices per device-hour (late 2025) and the utilisation a
default: every one of them is a starting point to override (`--price`, `--mfu`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.plan.units import GiB


@dataclass(frozen=True)
class Accelerator:
    """One training or inference device."""

    name: str
    description: str
    memory_gib: float
    """Device memory as marketed (80 GB on an H100 is 80 GiB of HBM)."""
    bf16_tflops: float
    """Dense 16-bit tensor-core peak, TFLOP/s (fp16 on the V100, which has no bf16)."""
    fp32_tflops: float
    """Plain FP32 peak, TFLOP/s."""
    bandwidth_gbs: float
    """Memory bandwidth, GB/s: what bounds decoding."""
    power_w: float
    """Board power (TDP), W."""
    intra_node_gbs: float
    """Bandwidth to the other devices of a node, GB/s per device and direction."""
    inter_node_gbs: float
    """Network bandwidth between nodes, GB/s per device and direction."""
    devices_per_node: int
    price_per_hour: float
    """USD per device-hour (indicative)."""
    mfu: float
    """Default model-FLOPs utilisation for training (the fraction of peak a tuned run sustains)."""
    reserve_gib: float = 1.0
    """Memory that tensors cannot use: CUDA context, cuBLAS workspace, NCCL buffers."""
    cores: int = 0
    """CPU entries: the cores the figures are for (`scaled_to_cores` rescales them)."""

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB

    @property
    def usable_bytes(self) -> float:
        """What tensors can occupy: the memory less the runtime's reserve."""
        return (self.memory_gib - self.reserve_gib) * GiB

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for math in `dtype` (fp32, or a 16-bit type)."""
        return (self.fp32_tflops if dtype == "fp32" else self.bf16_tflops) * 1e12

    def scaled_to_cores(self, cores: int) -> Accelerator:
        """A CPU entry for `cores` of the same cores: compute, bandwidth, power and price scale."""
        if not self.cores:
            raise LmscaleError(f"{self.name} is not a CPU entry")
        k = cores / self.cores
        return dataclasses.replace(
            self, name=f"{self.name}:{cores}", description=f"{cores} cores of: {self.description}",
            bf16_tflops=self.bf16_tflops * k, fp32_tflops=self.fp32_tflops * k,
            bandwidth_gbs=self.bandwidth_gbs * k, power_w=self.power_w * k,
            price_per_hour=self.price_per_hour * k, cores=cores,
        )  # fmt: skip


def _gpu(name, description, memory, bf16, fp32, bandwidth, power, intra, inter, price, mfu,
         per_node=8, reserve=1.0) -> Accelerator:  # fmt: skip
    return Accelerator(
        name, description, memory, bf16, fp32, bandwidth, power, intra, inter, per_node, price,
        mfu, reserve,
    )  # fmt: skip


# Data, not code. Default MFUs: A100 0.45 reproduces Llama 2's reported GPU-hours (tests/plan);
# Llama 3 405B reports 38-43% on H100; smaller and consumer parts sustain less.
CATALOG: dict[str, Accelerator] = {a.name: a for a in (
    _gpu("v100-32gb", "NVIDIA V100 SXM2 32 GB (NVLink 2)", 32, 125, 15.7, 900, 300, 150, 6.25,
         1.20, 0.35),
    _gpu("a100-40gb", "NVIDIA A100 SXM4 40 GB (NVLink 3, HDR InfiniBand)", 40, 312, 19.5, 1555,
         400, 300, 25, 1.50, 0.45),
    _gpu("a100-80gb", "NVIDIA A100 SXM4 80 GB (NVLink 3, HDR InfiniBand)", 80, 312, 19.5, 2039,
         400, 300, 25, 1.80, 0.45),
    _gpu("h100-80gb", "NVIDIA H100 SXM5 80 GB (NVLink 4, NDR InfiniBand)", 80, 989, 67, 3350,
         700, 450, 50, 2.50, 0.40),
    _gpu("h200", "NVIDIA H200 SXM 141 GB (NVLink 4, NDR InfiniBand)", 141, 989, 67, 4800, 700,
         450, 50, 3.50, 0.40),
    _gpu("l4", "NVIDIA L4 24 GB (PCIe 4.0, no NVLink)", 24, 121, 30.3, 300, 72, 25, 1.56,
         0.80, 0.35, reserve=1.5),
    _gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24 GB (PCIe 4.0, no peer-to-peer)", 24, 165,
         82.6, 1008, 450, 12, 3.1, 0.40, 0.35, reserve=1.5),
    Accelerator("cpu", "x86-64 socket, 32 cores with AVX-512 BF16 at 3 GHz, DDR5",
                memory_gib=256, bf16_tflops=12.3, fp32_tflops=6.1, bandwidth_gbs=300,
                power_w=280, intra_node_gbs=50, inter_node_gbs=12.5, devices_per_node=1,
                price_per_hour=1.50, mfu=0.30, reserve_gib=0.5, cores=32),
)}  # fmt: skip

ALIASES = {"h100": "h100-80gb", "a100": "a100-80gb", "v100": "v100-32gb", "4090": "rtx-4090",
           "h200-141gb": "h200"}  # fmt: skip


def accelerator(name: str) -> Accelerator:
    """The catalog entry `name` (case-insensitive; `cpu:N` is N cores of the CPU entry)."""
    key = name.lower()
    base, _, cores = key.partition(":")
    entry = CATALOG.get(ALIASES.get(base, base))
    if entry is None:
        raise LmscaleError(f"unknown --gpu '{name}' (known: {', '.join(CATALOG)})")
    if cores:
        if not cores.isdigit() or int(cores) < 1:
            raise LmscaleError(f"--gpu {name}: the core count after ':' must be a positive integer")
        return entry.scaled_to_cores(int(cores))
    return entry
