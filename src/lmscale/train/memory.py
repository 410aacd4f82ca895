"""How much memory a training step takes, two ways.

    held        what the device holds: CUDA's reserved bytes (tensors + the caching allocator's
                free blocks), or the CPU process's peak resident set (VmHWM)
    allocated   what tensors occupy at their peak: CUDA's allocated bytes; on the CPU, the bytes
                malloc had in use when the step began (glibc's mallinfo2) plus the peak of the
                tensor storage the step created and had not yet freed, tracked op by op

The planner predicts the allocated peak (`lmscale plan --calibrate` compares against it). On the
CPU, glibc keeps freed blocks of up to 32 MiB in its heaps, so the held peak is higher than the
allocated one by an amount that varies from run to run.

NOTE: the CPU tracking is a TorchDispatchMode, active only on steps that are logged and only for
plain and DDP models that are not compiled (a mode would get in the way of DTensor's own
dispatch, and of compiled graphs). It costs a few tens of microseconds per operator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def malloc_in_use_bytes() -> int | None:
    """Bytes the C allocator has handed out and not had back (heap chunks + mmapped blocks)."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class TensorPeak(TorchDispatchMode):
    """The peak bytes of tensor storage created inside this mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:  # views, in-place results, empty tensors
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # NOTE: torch keeps one Python object per live storage, so this fires when it is freed.
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class MemoryMeter:
    """Peak held and allocated memory of one training step on `device`."""

    def __init__(self, device: torch.device, track_tensors: bool = True):
        self.device = device
        self.track_tensors = track_tensors and device.type == "cpu" and _MALLINFO2 is not None
        """CPU: follow tensor storage op by op (see the module's NOTE)."""
        self._start_alloc = 0
        self._tracker: TensorPeak | None = None
        self._tracked_peak: int | None = None

    def held_now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_reserved(self.device)
        return _proc_status_bytes("VmRSS") or _max_rss_bytes()

    def baseline(self) -> dict[str, int]:
        """Memory before the model exists (the interpreter, libraries, data): not the training's."""
        out = {"baseline_mem_bytes": self.held_now()}
        if self.device.type == "cuda":
            return out | {"baseline_alloc_bytes": torch.cuda.memory_allocated(self.device)}
        allocated = malloc_in_use_bytes()
        return out | ({"baseline_alloc_bytes": allocated} if allocated is not None else {})

    def start_step(self, logged: bool) -> None:
        """A new peak window, so an evaluation or a checkpoint save does not hide in a step's peak.

        On Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current resident set.
        """
        self._tracked_peak = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # no /proc (or not allowed): the held peak stays the process's lifetime peak
        if logged and self.track_tensors:
            self._start_alloc = malloc_in_use_bytes() or 0
            self._tracker = TensorPeak()
            self._tracker.__enter__()

    def end_step(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracked_peak = self._start_alloc + self._tracker.peak
            self._tracker = None

    def peaks(self) -> dict[str, int]:
        """`peak_mem_bytes` (held) and, where measured, `peak_alloc_bytes` of the last step."""
        if self.device.type == "cuda":
            return {"peak_mem_bytes": torch.cuda.max_memory_reserved(self.device),
                    "peak_alloc_bytes": torch.cuda.max_memory_allocated(self.device)}  # fmt: skip
        held = {"peak_mem_bytes": _proc_status_bytes("VmHWM") or _max_rss_bytes()}
        tracked = self._tracked_peak
        return held | ({"peak_alloc_bytes": tracked} if tracked is not None else {})


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
