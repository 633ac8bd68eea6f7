"""Peak-memory meters for the benchmarks and the profiler: GPU allocator statistics, or the process's RSS on CPU.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated just
before the measured region (the inputs).

CPU: Python's ``tracemalloc`` does not see torch's allocations, and torch has no CPU allocator statistics, so
the meter reads what the operating system charges the process. On Linux it resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``, value 5) before the region and reads ``VmHWM`` after it: an exact high-water mark,
not a sample. For the RSS to follow the live tensors, glibc must hand freed blocks back to the system, so
during a measurement the meter pins glibc's mmap threshold low with ``mallopt`` (otherwise a freed 16 MiB block
stays resident in the heap and the next allocation reuses it unseen) and first hands free heap pages back
(``malloc_trim``). Where that is not possible the meter
falls back to sampling the RSS from a thread every millisecond, which can miss short peaks; ``method`` says
which one ran.

Tensor meters (:class:`LiveBytes`, :class:`LargestTensor`): a ``TorchDispatchMode`` sees every op's outputs, also
inside fastdpo's custom ops, and counts the bytes of the tensors created: exact, independent of the allocator.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PeakMeter", "RssSampler", "current_rss", "cpu_peak_method", "DeviceMemory", "device_memory",
           "TooBigError", "USABLE_FRACTION", "check_fits", "format_bytes", "compare_peaks", "LiveBytes",
           "LargestTensor"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# During a measurement every allocation of 64 KiB or more is its own mapping, returned on free.
_MEASURE_MMAP = 64 << 10
# Outside measurements: glibc's own ceiling for its dynamic threshold (32 MiB on 64-bit), i.e. the steady
# state of a long-running process, so that timing runs are not slowed by page faults a trainer would not see.
_STEADY_MMAP = 32 << 20

_libc = None


def _glibc():
    """glibc through ctypes, or None (musl, macOS, Windows)."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.mallopt  # noqa: B018 - raises AttributeError when absent
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _mallopt(mmap_threshold: int) -> bool:
    lib = _glibc()
    if lib is None:
        return False
    # Setting either value also switches off glibc's dynamic threshold adjustment.
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(lib.mallopt(_M_TRIM_THRESHOLD,
                                                                                    2 * mmap_threshold))


def _trim():
    """Give free heap pages back to the system: a freed block still resident would be reused unseen."""
    lib = _glibc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def current_rss() -> int | None:
    """Resident set size of this process in bytes, or None where it cannot be read."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib << 10
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def cpu_peak_method() -> str:
    """How :class:`PeakMeter` measures CPU memory on this machine (one line, for reports)."""
    if sys.platform.startswith("linux") and _reset_hwm() and _glibc() is not None:
        return ("peak RSS (Linux VmHWM, reset via /proc/self/clear_refs) above the RSS before the step, "
                "glibc mmap threshold pinned at 64 KiB so freed tensors leave the RSS")
    if current_rss() is not None:
        return "RSS sampled every 1 ms from a thread, above the RSS before the step (can miss short peaks)"
    return "unmeasured (no way to read this process's RSS here)"


class RssSampler:
    """Samples the process's RSS from a background thread: ``samples`` is a list of ``(seconds, bytes)``.

    Used for the CPU memory timeline of ``fastdpo profile`` and as the fallback peak meter. ``mark(label)``
    records a named instant (phase boundaries for the chart).
    """

    def __init__(self, interval_s: float = 1e-3):
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = None
        self._t0 = 0.0

    def _run(self):
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None:
                self.samples.append((time.perf_counter() - self._t0, rss))
            self._stop.wait(self.interval_s)

    def mark(self, label: str):
        self.marks.append((time.perf_counter() - self._t0, label))

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        rss = current_rss()
        if rss is not None:
            self.samples.append((time.perf_counter() - self._t0, rss))
        return False

    @property
    def peak(self) -> int | None:
        return max((b for _, b in self.samples), default=None)


class PeakMeter:
    """Context manager: ``peak_bytes`` is the peak memory above what was held when the region began.

    ``device`` picks the method: CUDA allocator statistics for a CUDA device, the process's RSS otherwise
    (see the module docstring). ``baseline_bytes`` is what was held at the start (allocated tensors on GPU,
    the RSS on CPU). ``peak_bytes`` is None when nothing could measure it.
    """

    def __init__(self, device: torch.device | str = "cpu", restore: bool = True):
        self.device = torch.device(device)
        self.restore = restore  # put glibc back in its steady (timing) state afterwards
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self.method = "cuda max_memory_allocated" if self.device.type == "cuda" else cpu_peak_method()
        self._sampler = None
        self._hwm = False

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._hwm = self.method.startswith("peak RSS") and _mallopt(_MEASURE_MMAP)
        _trim()
        self.baseline_bytes = current_rss()
        if self._hwm and _reset_hwm():
            return self
        self._hwm = False
        if self.baseline_bytes is not None:
            self._sampler = RssSampler().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
            return False
        if self._hwm:
            hwm = _status_kib("VmHWM")
            self.peak_bytes = max(0, (hwm << 10) - self.baseline_bytes) if hwm is not None else None
            if self.restore:
                _mallopt(_STEADY_MMAP)
        elif self._sampler is not None:
            self._sampler.__exit__(*exc)
            peak = self._sampler.peak
            self.peak_bytes = max(0, peak - self.baseline_bytes) if peak is not None else None
        return False


def steady_allocator():
    """Put glibc's allocator in the steady state used for timing runs on CPU (no-op elsewhere)."""
    if os.name == "posix":
        _mallopt(_STEADY_MMAP)


def resolve_device(device) -> str:
    """``"cpu"`` or ``"cuda"`` from a ``--device`` value (None or ``"auto"``: CUDA when torch sees one)."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here; use --device cpu")
    return device


def format_bytes(n: int | float | None) -> str:
    """``n`` bytes in the largest binary unit that keeps it at 1 or more (``"-"`` for None): ``"3.2 MiB"``."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{int(n)} B"


@dataclass(frozen=True)
class DeviceMemory:
    """What a device can hold now: ``available`` and ``total`` bytes (None where unknown), ``name`` in words."""

    available: int | None
    total: int | None
    name: str


# cgroup limits at or above this mean "no limit" (v1 writes the largest page-aligned int64).
_UNLIMITED = 1 << 60


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory() -> tuple[int | None, int | None]:
    """The memory limit of this process's cgroup and what the cgroup uses (v2, then v1), or Nones."""
    paths = {"": "/"}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    paths[c] = path
    except (OSError, ValueError):
        pass
    candidates = []
    for rel in dict.fromkeys((paths.get(""), "/")):
        if rel:
            base = "/sys/fs/cgroup" + rel.rstrip("/")
            candidates.append((base + "/memory.max", base + "/memory.current"))
    for rel in dict.fromkeys((paths.get("memory"), "/")):
        if rel:
            base = "/sys/fs/cgroup/memory" + rel.rstrip("/")
            candidates.append((base + "/memory.limit_in_bytes", base + "/memory.usage_in_bytes"))
    for limit_path, usage_path in candidates:
        limit = _read_int(limit_path)
        if limit is not None and limit < _UNLIMITED:
            return limit, _read_int(usage_path)
    return None, None


def _host_memory() -> DeviceMemory:
    avail = total = None
    kib = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemTotal"):
                    kib[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in kib:
        total, avail = kib["MemTotal"] << 10, kib.get("MemAvailable", kib["MemTotal"]) << 10
    else:
        try:
            import psutil

            vm = psutil.virtual_memory()
            total, avail = vm.total, vm.available
        except ImportError:
            try:
                page = os.sysconf("SC_PAGE_SIZE")
                total = os.sysconf("SC_PHYS_PAGES") * page
                avail = os.sysconf("SC_AVPHYS_PAGES") * page
            except (ValueError, OSError, AttributeError):
                pass
    name = "this machine"
    limit, usage = _cgroup_memory()
    if limit is not None:
        name = "this machine (its memory cgroup)"
        total = limit if total is None else min(total, limit)
        room = limit - (usage or 0)
        avail = room if avail is None else min(avail, room)
    return DeviceMemory(available=avail, total=total, name=name)


def device_memory(device: torch.device | str) -> DeviceMemory:
    """Free and total memory of ``device``: the GPU's (``torch.cuda.mem_get_info``), or the host's RAM, bounded
    by the process's cgroup limit where it has one (a container's limit is what its OOM killer enforces)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(available=free, total=total, name=f"GPU {torch.cuda.get_device_name(device)}")
    return _host_memory()


# The share of the memory available that a run may plan on: its estimate has a margin, and on a shared machine
# other processes grow while it runs (past the limit the operating system's out-of-memory killer ends the run
# without a word).
USABLE_FRACTION = 0.8


class TooBigError(ValueError):
    """A run would need more memory than the device has: raised before anything is allocated or written."""


def check_fits(needed: int, parts: dict, device: torch.device | str, hint: str, memory: DeviceMemory | None = None,
               usable: float = 1.0, margin: float | None = None):
    """Raise :class:`TooBigError` when ``needed`` bytes exceed ``usable`` (a fraction) of what ``device`` has
    available.

    ``parts`` names what the estimate is made of (``{what: bytes}``), ``hint`` says which options shrink it,
    ``margin`` is how far the estimate is known to hold (a fraction, said in the message). A device whose free
    memory cannot be read is not checked.
    """
    memory = memory or device_memory(device)
    if memory.available is None or needed <= usable * memory.available:
        return
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
    total = f" of {format_bytes(memory.total)}" if memory.total is not None else ""
    held = f", give or take {margin:.0%}," if margin else ""
    room = (f"; a run may plan on {usable:.0%} of it ({format_bytes(usable * memory.available)}), the rest is "
            f"headroom for the estimate's margin and for other processes" if usable < 1 else "")
    raise TooBigError(f"this run needs about {format_bytes(needed)}{held} ({detail}) but {memory.name} has "
                      f"{format_bytes(memory.available)} available{total}{room}; {hint}")


# Differences below this (or below 5% of the larger peak) are within what the meters resolve: the RSS moves by
# pages and allocator arenas, and neither meter is meant for sub-MiB comparisons.
RESOLUTION_BYTES = 1 << 20


def compare_peaks(ours: int | None, theirs: int | None) -> str:
    """How much less (or more) ``ours`` peaks than ``theirs``, in words that never overstate it.

    A ratio is given only when both peaks are at least :data:`RESOLUTION_BYTES`; a difference within the
    resolution (or 5% of the larger peak) is "no measurable difference"; a negative saving says "more".
    """
    if ours is None or theirs is None:
        return "unmeasured"
    diff = theirs - ours
    if abs(diff) <= max(RESOLUTION_BYTES, 0.05 * max(ours, theirs)):
        return "no measurable difference at this size"
    if diff < 0:
        text = f"{format_bytes(-diff)} more"
        return text + (f" ({ours / theirs:.1f}x)" if theirs >= RESOLUTION_BYTES else "")
    text = f"{format_bytes(diff)} saved"
    return text + (f" ({theirs / ours:.1f}x less)" if ours >= RESOLUTION_BYTES else "")


def _run_op(mode, func, args, kwargs):
    """Run ``func``; fastdpo's custom ops run their Python body with ``mode`` active, so that it sees inside them."""
    if func.namespace == "fastdpo":
        with mode:
            return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
    return func(*args, **kwargs)


def _new_outputs(args, kwargs, out):
    """The tensors among ``out`` whose storage is none of the inputs' (in-place ops and the Triton interpreter's
    copies back into its arguments allocate nothing)."""
    owned = {t.untyped_storage().data_ptr() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)}
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned]


class LiveBytes(TorchDispatchMode):
    """Context manager: ``peak`` is the peak of the bytes held by host tensors created inside it (``live``: those
    held now). Every new storage counts from the op that makes it until it is freed (a finalizer on the storage)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _run_op(self, func, args, kwargs)
        for t in _new_outputs(args, kwargs, out):
            if t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen and storage.nbytes():
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


class LargestTensor(TorchDispatchMode):
    """Context manager: ``nbytes`` is the size in bytes of the largest tensor any op inside it allocates."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _run_op(self, func, args, kwargs)
        for t in _new_outputs(args, kwargs, out):
            self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out
