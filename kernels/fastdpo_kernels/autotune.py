"""Autotuning of the fused kernels on the GPU they run on, cached on disk.

On by default for CUDA tensors (``FASTDPO_AUTOTUNE=0`` turns it off: then the one default of :mod:`.config` is
used); never under the Triton interpreter or inside ``use_config``. The first call at a new key times the
candidates of :func:`.config.tuning_space` (coordinate descent from the default, family by family) on that call's
own tensors, within ``FASTDPO_AUTOTUNE_BUDGET_S`` seconds (default 60; past it the best so far is kept), announces
itself once per process, and stores the winner in a JSON file per device and versions (torch, triton, fastdpo)
under ``FASTDPO_CACHE_DIR`` (default ``~/.cache/fastdpo``). A later call, in this process or another, reads it:
the choice is fixed from then on, so runs stay deterministic. A cache that cannot be read is ignored (and
rewritten). ``fastdpo tune`` fills the cache ahead of training.

The key holds only what the host knows without a sync: the device, the dtype, the token count rounded up to a
power of two, ``H``, ``V`` and the flags that select kernel specialisations (bias, softcap, extras) or constrain
the space (a memory budget that keeps part of the vocabulary).

Tuning never changes a result: each timed trial runs a whole launcher, whose outputs and fp32 hidden-gradient
accumulator (read and written by the middle vocabulary chunks) are allocated per call, or whose kept tiles the
real launch overwrites in full afterwards; so no buffer a trial touches needs restoring (what Triton's
``restore_value`` is for when one kernel launch is timed in place).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, replace

from .config import KernelConfig, tuning_space

ENV_AUTOTUNE = "FASTDPO_AUTOTUNE"
ENV_BUDGET = "FASTDPO_AUTOTUNE_BUDGET_S"
ENV_CACHE_DIR = "FASTDPO_CACHE_DIR"
DEFAULT_BUDGET_S = 60.0
# The smallest token bucket: below it, launch overheads dominate and one config serves every size.
MIN_BUCKET = 256
CACHE_SCHEMA = 1

_lock = threading.Lock()
_memory: dict[tuple, KernelConfig | None] = {}  # (device, key text) -> choice, None: none on disk
_announced = False


def enabled() -> bool:
    """Whether tuning is on (the environment's choice; CUDA, interpreter and overrides are the caller's)."""
    value = os.environ.get(ENV_AUTOTUNE, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes", ""):
        return True
    raise ValueError(f"{ENV_AUTOTUNE} must be 0 or 1, got {value!r}")


def budget_s() -> float:
    text = os.environ.get(ENV_BUDGET)
    if text is None:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{ENV_BUDGET} must be a positive number of seconds, got {text!r}")
    return value


def token_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least ``MIN_BUCKET``)."""
    return max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class TuneKey:
    """What a tuned config is chosen for (host-known values only)."""

    device: str
    dtype: str
    tokens: int  # the bucket, see token_bucket()
    hidden: int
    vocab: int
    bias: bool = False
    softcap: bool = False
    extras: bool = False
    partial_keep: bool = False  # a memory budget keeps some chunks: vocab_chunk is not tuned

    def text(self) -> str:
        flags = "".join(f"+{f}" for f in ("bias", "softcap", "extras", "partial_keep") if getattr(self, f))
        return f"{self.dtype}/N{self.tokens}/H{self.hidden}/V{self.vocab}{flags}"


def cache_dir() -> str:
    return os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastdpo")


def _versions() -> str:
    import torch
    import triton

    try:
        from importlib.metadata import version

        ours = version("fastdpo")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        ours = "src"
    return f"torch{torch.__version__}-triton{triton.__version__}-fastdpo{ours}"


def cache_path(device: str) -> str:
    """The cache file of ``device`` (its name) with the installed versions."""
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{device}-{_versions()}".lower()).strip("-")
    return os.path.join(cache_dir(), f"autotune-{slug}.json")


def _read(path: str) -> dict:
    """The cache's ``{key text: config fields}``; {} when it is missing or cannot be read (it is then rewritten)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("configs"), dict):
            raise ValueError("unknown layout")
        return data["configs"]
    except FileNotFoundError:
        return {}
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file is ignored, never fatal
        print(f"fastdpo: ignoring the autotuning cache {path} ({type(err).__name__}: {err})", file=sys.stderr)
        return {}


def _config_from(fields) -> KernelConfig | None:
    try:
        return KernelConfig(**fields["config"])
    except Exception:  # noqa: BLE001 - an entry of another version's fields, or hand-edited: tune again
        return None


def lookup(key: TuneKey) -> KernelConfig | None:
    """The tuned config of ``key`` from this process or the disk cache, or None. The disk is read once per key
    and process (a miss is remembered too), so a call costs a dictionary look-up."""
    mem = (key.device, key.text())
    with _lock:
        if mem in _memory:
            return _memory[mem]
    entry = _read(cache_path(key.device)).get(key.text())
    config = _config_from(entry) if isinstance(entry, dict) else None
    with _lock:
        _memory[mem] = config
    return config


def store(key: TuneKey, config: KernelConfig, record: dict) -> str:
    """Save ``config`` for ``key`` (merged into the device's cache file, replaced atomically); returns the path."""
    path = cache_path(key.device)
    with _lock:
        _memory[(key.device, key.text())] = config
        configs = _read(path)
        configs[key.text()] = {"config": dataclasses.asdict(config), **record}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"schema": CACHE_SCHEMA, "device": key.device, "versions": _versions(),
                           "configs": configs}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as err:  # a read-only home: keep the choice for this process
            print(f"fastdpo: could not write the autotuning cache {path}: {err}", file=sys.stderr)
    return path


def forget() -> None:
    """Drop the choices held in this process (the disk cache stays)."""
    with _lock:
        _memory.clear()


def _announce(key: TuneKey, budget: float) -> None:
    global _announced
    with _lock:
        if _announced:
            return
        _announced = True
    print(f"fastdpo: tuning the fused kernels for {key.device} at {key.text()} (once per shape bucket, at most "
          f"{budget:.0f} s each; cached in {cache_dir()}; {ENV_AUTOTUNE}=0 turns it off, `fastdpo tune` tunes "
          f"ahead)", file=sys.stderr, flush=True)


# The families whose trials time the forward; the others time the backward.
FORWARD_FAMILIES = ("fwd", "min_programs")


def search(base: KernelConfig, space, measure, budget: float, clock=time.perf_counter):
    """Coordinate descent over ``space`` (see :func:`.config.tuning_space`) from ``base``.

    ``measure(phase, config) -> ms`` with ``phase`` "forward" or "backward"; a candidate that raises (does not
    compile, or does not fit the GPU) is recorded as failed. Past ``budget`` seconds the remaining candidates are
    skipped. Returns ``(best, rows)``, rows ``[family, overrides, ms or None, note]``; ties keep the earlier
    candidate (the base first).
    """
    t0 = clock()
    best = base
    rows = []
    for family, candidates in space:
        phase = "forward" if family in FORWARD_FAMILIES else "backward"
        scored = []
        for cand in candidates:
            if clock() - t0 > budget:
                rows.append([family, cand, None, "skipped: tuning budget spent"])
                continue
            cfg = replace(best, **cand)
            try:
                ms = float(measure(phase, cfg))
                note = ""
            except Exception as err:  # noqa: BLE001 - one failing candidate is a row, not a crash
                ms, note = math.inf, f"{type(err).__name__}: {str(err)[:120]}"
            rows.append([family, cand, None if math.isinf(ms) else ms, note])
            scored.append((ms, len(scored), cfg))
        if scored:
            ms, _, cfg = min(scored)
            if not math.isinf(ms):
                best = cfg
    return best, rows


def tuned_config(key: TuneKey, base: KernelConfig, measure, sm_count=None, budget: float | None = None,
                 force: bool = False, shared_limit=None, itemsize: int = 2) -> KernelConfig:
    """The config for ``key``: cached, else tuned now with ``measure`` (see :func:`search`) and cached.

    Tuning off (``FASTDPO_AUTOTUNE=0``): ``base``, whatever is cached. ``measure`` None (no tensors to time, e.g.
    while tracing) and nothing cached: ``base``. ``force`` tunes even when a choice is cached (``fastdpo tune
    --force``).
    """
    if not enabled():
        return base
    if not force:
        found = lookup(key)
        if found is not None:
            return found
    if measure is None:
        return base
    budget = budget_s() if budget is None else budget
    _announce(key, budget)
    start = time.perf_counter()
    space = tuning_space(base, sm_count, tune_chunk=not key.partial_keep, shared_limit=shared_limit, itemsize=itemsize)
    best, rows = search(base, space, measure, budget)
    store(key, best, {"seconds": round(time.perf_counter() - start, 3), "trials": rows,
                      "complete": all(r[3] != "skipped: tuning budget spent" for r in rows)})
    return best


TRIAL_REPEATS, TRIAL_WARMUP = 3, 1


def timer(device, repeats: int | None = None, warmup: int | None = None):
    """``time(fn) -> ms``: median of ``repeats`` after ``warmup`` runs (CUDA events on a GPU)."""
    import torch

    repeats = TRIAL_REPEATS if repeats is None else repeats
    warmup = TRIAL_WARMUP if warmup is None else warmup

    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    return run
