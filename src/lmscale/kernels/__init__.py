"""Native CPU kernels: int4 and int8 matrix-vector products for decoding (`lowbit_matvec.cpp`).

The C++ source ships with the package and is compiled on first use, once per machine and torch
version, into the user's cache folder (`~/.cache/lmscale/kernels`, or under `XDG_CACHE_HOME`),
by `torch.utils.cpp_extension` with the system's C++ compiler (the one inductor uses too). It
registers `torch.ops.lmscale.int4_matvec` and `int8_matvec` (see the source for the layouts),
with shape functions here so that `torch.compile` graphs call them too, and their `*_cat` forms:
several weights that read the same activations in one call, outputs side by side (the compiled
decode step's q/k/v and gate/up, see `lmscale.kernels.fusion`).

If the build fails (no compiler) or `LMSCALE_NATIVE_KERNELS=0` is set, `load()` returns False
and the quantized layers keep their PyTorch kernels; the reason is logged once.

Paths (`isa()`): 0 "vnni" (AVX-512 VNNI: the activations quantized to int8 per 32 columns, as
llama.cpp does), 1 "avx512", 2 "avx2", 3 "plain" (float32 activations, no rounding of them).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

MAX_ROWS = 8
"""The most activation rows one call takes (beyond that a matmul kernel is the better tool)."""
ISAS = ("vnni", "avx512", "avx2", "plain")

_SOURCE = Path(__file__).with_name("lowbit_matvec.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried, "reason": why not

log = logging.getLogger(__name__)


def build_folder() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    version = torch.__version__.replace("+", "_")
    return cache / "lmscale" / "kernels" / f"torch-{version}"


def load() -> bool:
    """Build (first time on this machine) and load the kernels; True if they can be used.

    Thread-safe; the build itself is guarded across processes by `cpp_extension`'s lock file.
    """
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _try_load()
    return bool(_state["ok"])


def loaded() -> bool:
    """True once `load()` has succeeded (no side effects: safe inside a compiled graph)."""
    return bool(_state.get("ok"))


def reason() -> str | None:
    """Why the kernels are not in use, if they are not."""
    return _state.get("reason")  # type: ignore[return-value]


def _try_load() -> bool:
    if os.environ.get("LMSCALE_NATIVE_KERNELS", "1") == "0":
        _state["reason"] = "LMSCALE_NATIVE_KERNELS=0"
        return False
    folder = build_folder()
    try:
        from torch.utils import cpp_extension

        folder.mkdir(parents=True, exist_ok=True)
        fresh = not any(folder.glob("*.so"))
        if fresh:
            print("lmscale: compiling its CPU kernels (once per machine)...", file=sys.stderr)
        cpp_extension.load(
            name="lmscale_lowbit",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure keeps the PyTorch kernels
        _state["reason"] = f"building {_SOURCE.name} failed: {str(error).splitlines()[0]}"
        log.warning("lmscale: native CPU kernels unavailable (%s)", _state["reason"])
        return False
    _register_shapes()
    return True


def _register_shapes() -> None:
    """Shape functions, so that compiled graphs can call the ops (as extern kernels)."""

    @torch.library.register_fake("lmscale::int4_matvec")
    def _(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, group: int) -> Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("lmscale::int8_matvec")
    def _(x: Tensor, qweight: Tensor, scales: Tensor, group: int) -> Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("lmscale::int4_matvec_cat")
    def _(x: Tensor, qweights: list[Tensor], scales: list[Tensor], mins: list[Tensor],
          group: int) -> Tensor:  # fmt: skip
        return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweights))

    @torch.library.register_fake("lmscale::int8_matvec_cat")
    def _(x: Tensor, qweights: list[Tensor], scales: list[Tensor], group: int) -> Tensor:
        return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweights))


def isa() -> str:
    """The path in use: "vnni", "avx512", "avx2" or "plain" (loads the kernels)."""
    if not load():
        raise RuntimeError(f"lmscale's native kernels are not loaded: {reason()}")
    return ISAS[torch.ops.lmscale.matvec_isa()]


def use_isa(name: str) -> str:
    """Use a path no faster than the best this CPU has (tests compare them); returns the one
    in use (the best, if `name` is faster than this CPU allows)."""
    isa()  # loaded
    return ISAS[torch.ops.lmscale.set_matvec_isa(ISAS.index(name))]
