"""``backend="auto"``: on CUDA the engine (and, under a budget, memory mode) measured fastest at the shape, on the
user's own card, once.

The first call at a shape bucket (device name, dtype, ``H``, ``V``, the token count rounded up to a power of two,
memory mode, extras, softcap) times every candidate, forward and backward, for a few iterations on synthetic data
of that shape, bounded by :data:`TIME_BUDGET_S` seconds (Triton's first compilation included), and stores the choice
in a JSON file (``$FASTDPO_CACHE_DIR`` or ``~/.cache/fastdpo/``, ``engines.json``), keyed also by the torch,
triton and fastdpo versions. Later calls, and later runs, read the choice back: it never changes, so runs are
deterministic. ``FASTDPO_BACKEND`` pins an engine instead. On CPU, auto is the chunked engine.

Not measured (the fused engine where it runs, else the chunked one): a vocabulary-parallel head, whose ranks must
run one engine alike, and a token count that ``torch.compile`` traces as symbolic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import threading
import time
import warnings

import torch

from .._options import IGNORE_INDEX, HeadOptions
from .engines import AUTO, ENGINES, Saved, check_backend, dispatch

ENV_BACKEND = "FASTDPO_BACKEND"
ENV_CACHE_DIR = "FASTDPO_CACHE_DIR"
CACHE_FILE = "engines.json"
# Seconds one measurement (every candidate of one bucket) may take, Triton's first compilation included.
TIME_BUDGET_S = 20.0
# Timed iterations per candidate, after one warm-up.
ITERATIONS = 3
# The order of preference when nothing is measured, and of candidates in a measurement.
PREFERENCE = ("triton", "torch")
# Devices on which auto measures (elsewhere it is the chunked engine).
MEASURED_DEVICES = ("cuda",)

log = logging.getLogger("fastdpo")
_lock = threading.Lock()
_choices: dict | None = None  # the cache file's choices, read once per process
_memo: dict = {}  # this process's answers, by the arguments of _measured
_announced = False


def cache_path() -> pathlib.Path:
    """The JSON file that holds the measured choices."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "fastdpo")
    return pathlib.Path(root) / CACHE_FILE


def pinned() -> str | None:
    """The backend ``FASTDPO_BACKEND`` pins (checked), or None when unset, empty or ``auto``."""
    name = os.environ.get(ENV_BACKEND, "")
    if name == "":
        return None
    check_backend(name, ENV_BACKEND)
    return None if name == AUTO else name


def _runs(backend, device, dtype) -> bool:
    try:
        dispatch(backend, 0.0).check(device, dtype)
    except (ValueError, TypeError):
        return False
    return True


def default(device: torch.device, dtype: torch.dtype) -> str:
    """The choice without a measurement: the first of :data:`PREFERENCE` that runs these tensors (chunked on
    CPU)."""
    if device.type != "cuda":
        return "torch"
    return next(b for b in PREFERENCE if _runs(b, device, dtype))


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (shapes in one bucket share a choice)."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def memory_mode(memory: float) -> str:
    return "lean" if memory == 0 else "fast" if math.isinf(memory) else f"{memory!r}GiB"


def _versions() -> str:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"torch={torch.__version__},triton={triton_version},fastdpo={__version__}"


def cache_key(device_name: str, dtype: torch.dtype, hidden_size: int, vocab: int, tokens: int, memory: float,
              extras: bool, softcap: bool) -> str:
    """The key of a shape bucket in the cache file."""
    return (f"{device_name}|{str(dtype).removeprefix('torch.')}|H={hidden_size}|V={vocab}|"
            f"N<={token_bucket(tokens)}|memory={memory_mode(memory)}|extras={bool(extras)}|"
            f"softcap={bool(softcap)}|{_versions()}")


def _load() -> dict:
    global _choices
    if _choices is None:
        path = cache_path()
        choices = {}
        if path.exists():
            try:
                choices = json.loads(path.read_text())["choices"]
                if not isinstance(choices, dict):
                    raise ValueError("'choices' is not an object")
            except (OSError, ValueError, KeyError, TypeError) as err:
                warnings.warn(f"fastdpo: ignoring the unreadable engine cache {path} ({err}); the engines will be "
                              f"measured again", RuntimeWarning, stacklevel=3)
                choices = {}
        _choices = choices
    return _choices


def _store(key: str, entry: dict) -> None:
    choices = _load()
    choices[key] = entry
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"choices": choices}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"fastdpo: could not write the engine cache {path} ({err}); the choice holds for this "
                      f"process only", RuntimeWarning, stacklevel=3)


def forget() -> None:
    """Drop the choices read from the cache file and this process's answers (the next call reads the file
    again)."""
    global _choices
    _choices = None
    _memo.clear()


def _time(engine, opts, run, deadline: float, device: torch.device) -> float:
    """Seconds per iteration of ``run`` (forward and backward of ``engine`` with ``opts``): the median of up to
    :data:`ITERATIONS` after a warm-up, fewer once ``deadline`` (``time.monotonic()``) has passed."""
    cuda = device.type == "cuda"
    run()
    times = []
    for _ in range(ITERATIONS):
        if times and time.monotonic() > deadline:
            break
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _synthetic(device, dtype, tokens, hidden_size, vocab):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=g)
    # Logits of a trained head's spread (a flat softmax would flatter the engines alike).
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=g).mul_(hidden_size ** -0.5 * 4)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    targets[: tokens // 4] = IGNORE_INDEX  # prompt tokens
    return hidden, weight, targets


def measure(candidates, device, dtype, tokens, hidden_size, vocab, opts) -> dict:
    """Seconds per forward+backward of each ``(backend, memory)`` candidate at this shape, ``inf`` for one that
    failed (out of memory, say)."""
    hidden, weight, targets = _synthetic(device, dtype, tokens, hidden_size, vocab)
    deadline = time.monotonic() + TIME_BUDGET_S
    seconds = {}
    for backend, memory in candidates:
        engine = dispatch(backend, memory)
        o = dataclasses.replace(opts, backend=backend, memory=memory, ignore_index=IGNORE_INDEX)

        def run(engine=engine, o=o):
            out, kept, order = engine.forward(hidden, weight, None, targets, o)
            saved = Saved(out["lse"], out["logp"], *kept, order)
            engine.backward(hidden, weight, None, targets, saved, torch.ones_like(out["logp"]), o, (True, True, False))

        try:
            # As inside the head's ops: the synthetic inputs carry the compute dtype, autocast stays out.
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                seconds[(backend, memory)] = float(_time(engine, o, run, deadline, device))
        except torch.OutOfMemoryError:
            seconds[(backend, memory)] = math.inf
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return seconds


def choose(device: torch.device, dtype: torch.dtype, tokens, hidden_size: int, vocab: int, opts) -> tuple:
    """``(backend, memory)`` for ``backend="auto"`` (``opts`` carries the memory budget, extras and transform)."""
    pin = pinned()
    if pin is not None:
        return pin, opts.memory
    if device.type not in MEASURED_DEVICES:
        return "torch", opts.memory
    if opts.group is not None or isinstance(tokens, torch.SymInt):
        return default(device, dtype), opts.memory
    return _measured(str(device), str(dtype).removeprefix("torch."), int(tokens), int(hidden_size), int(vocab),
                     float(opts.memory), bool(opts.extras), opts.softcap is not None)


# Called with constants only, so that under torch.compile it runs once, eagerly, while the step is traced, and its
# answer enters the graph as a constant.
@torch.compiler.assume_constant_result
def _measured(device_str: str, dtype_str: str, tokens: int, hidden_size: int, vocab: int, memory: float,
              extras: bool, softcap: bool) -> tuple:
    args = (device_str, dtype_str, tokens, hidden_size, vocab, memory, extras, softcap)
    if args not in _memo:
        _memo[args] = _choose_measured(*args)
    return _memo[args]


def _choose_measured(device_str, dtype_str, tokens, hidden_size, vocab, memory, extras, softcap) -> tuple:
    global _announced
    device, dtype = torch.device(device_str), getattr(torch, dtype_str)
    candidates = [(b, m) for b in PREFERENCE if _runs(b, device, dtype)
                  for m in ((memory, 0.0) if 0 < memory < math.inf else (memory,))]
    if len(candidates) == 1:
        return candidates[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = cache_key(name, dtype, hidden_size, vocab, tokens, memory, extras, softcap)
    with _lock:
        entry = _load().get(key)
        if isinstance(entry, dict) and entry.get("backend") in ENGINES and isinstance(entry.get("memory"), float):
            return entry["backend"], entry["memory"]
        if not _announced:
            _announced = True
            log.warning("fastdpo: backend='auto' times its engines once per shape bucket (now %s, for at most "
                        "%.0f s); the choice is cached in %s. Set %s to pin an engine.", key, TIME_BUDGET_S,
                        cache_path(), ENV_BACKEND)
        opts = HeadOptions(extras=extras, softcap=1.0 if softcap else None)
        seconds = measure(candidates, device, dtype, token_bucket(tokens), hidden_size, vocab, opts)
        best = min(candidates, key=lambda c: seconds[c])
        if math.isinf(seconds[best]):
            return default(device, dtype), memory  # nothing ran through: not cached
        _store(key, {"backend": best[0], "memory": best[1],
                     "seconds": {f"{dispatch(*c).label}@{memory_mode(c[1])}": seconds[c] for c in candidates}})
        return best
