"""``fastdpo bench``: the DPO loss step, fastdpo against the naive reference and the competitors that can run.

For each implementation (see :mod:`fastdpo.bench.competitors`) on the same inputs: time of the loss step (policy
forward + backward, reference forward) as median, min and max over repeats after warm-up; peak memory above
what the inputs hold (:class:`fastdpo.bench.memory.PeakMeter`); the loss and gradient errors against an exact run of
the naive reference in fp32 (GPU) or fp64 (CPU). Every figure comes from the run that prints it.

The same functions drive ``benchmarks/gpu_compare.py``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fnmatch
import gc
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from .competitors import IMPLEMENTATIONS, DPOInputs, dpo_sigmoid, get_implementations, make_inputs
from .memory import (
    USABLE_FRACTION,
    PeakMeter,
    check_fits,
    compare_peaks,
    format_bytes,
    resolve_device,
    steady_allocator,
)

__all__ = ["Shape", "SHAPES", "BenchConfig", "BenchRow", "BenchReport", "resolve_config", "exact_reference",
           "run_bench", "format_table", "write_outputs", "check_out_dir", "write_out_dir", "OutputDirError",
           "OUTPUT_PATTERNS", "machine_name",
           "estimate_memory", "check_memory"]


@dataclass(frozen=True)
class Shape:
    """A model's lm-head and a batch: ``hidden`` H, ``vocab`` V, ``pairs`` B, ``seq_len`` T."""

    name: str
    hidden: int
    vocab: int
    pairs: int
    seq_len: int
    note: str = ""


# The three shapes of the reference figures (docs/benchmarks.md) first, at the batch sizes measured there.
SHAPES = {
    "llama3-8b": Shape("llama3-8b", 4096, 128256, 4, 1024, "Llama-3-8B head, 4 pairs x 1024"),
    "gemma2-2b": Shape("gemma2-2b", 2304, 256000, 4, 1024, "Gemma-2-2B head (its softcap not applied), 4 pairs x 1024"),
    "qwen2.5-7b": Shape("qwen2.5-7b", 3584, 152064, 8, 512, "Qwen2.5-7B head, 8 pairs x 512"),
    # A small batch: one pair at llama3-8b, where launches and the grid's fill matter most.
    "llama3-8b-1x512": Shape("llama3-8b-1x512", 4096, 128256, 1, 512, "Llama-3-8B head, 1 pair x 512"),
    "llama3.2-1b": Shape("llama3.2-1b", 2048, 128256, 4, 1024, "Llama-3.2-1B head, 4 pairs x 1024"),
    "mistral-7b": Shape("mistral-7b", 4096, 32768, 4, 1024, "Mistral-7B-v0.3 head, 4 pairs x 1024"),
    # The CPU default: a 32k vocabulary and 1024 tokens (what the memory at stake scales with), and a narrow H
    # so that a 2-core machine runs every row in seconds.
    "cpu-small": Shape("cpu-small", 128, 32000, 2, 256, "small head for a 2-core CPU"),
}
GPU_SHAPES = ("llama3-8b", "gemma2-2b", "qwen2.5-7b")
# On CPU a named model shape keeps its H and V (the head is what matters) but runs this small batch unless
# --pairs/--seq-len say otherwise: a full llama3-8b batch is minutes of 2-core compute per row.
CPU_NAMED_PAIRS, CPU_NAMED_SEQ = 1, 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    """What one ``fastdpo bench`` run measures."""

    shape: str
    hidden: int
    vocab: int
    pairs: int
    seq_len: int
    dtype: str
    device: str
    with_ref: bool = True
    repeats: int = 3
    warmup: int = 1
    impls: tuple = IMPLEMENTATIONS
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq_len


def _positive(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_config(shape=None, *, hidden=None, vocab=None, pairs=None, seq_len=None, dtype=None, device=None,
                   with_ref=True, repeats=None, warmup=None, impls=None) -> BenchConfig:
    """Fill the defaults of a bench run: the device's default shape and dtype, CPU-sized batches on CPU.

    Raises ValueError naming the argument for an unknown shape, device, dtype or implementation, or a
    non-positive size.
    """
    device = resolve_device(device)
    on_gpu = device == "cuda"
    if shape is None:
        shape = "llama3-8b" if on_gpu else "cpu-small"
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)} (or give --hidden/--vocab)")
    base = SHAPES[shape]
    for name, v in (("hidden", hidden), ("vocab", vocab), ("pairs", pairs), ("seq_len", seq_len),
                    ("repeats", repeats)):
        _positive(name, v)
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    note = base.note
    d_pairs, d_seq = base.pairs, base.seq_len
    if not on_gpu and shape != "cpu-small":
        d_pairs, d_seq = CPU_NAMED_PAIRS, CPU_NAMED_SEQ
        if pairs is None or seq_len is None:
            note += f"; on CPU the batch defaults to {d_pairs} pair(s) x {d_seq} tokens"
    dtype = dtype or ("bf16" if on_gpu else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if impls is None:
        impls = IMPLEMENTATIONS
    get_implementations(impls)  # validates the names
    custom = hidden is not None or vocab is not None
    return BenchConfig(shape=shape + (" (custom)" if custom else ""), hidden=hidden or base.hidden,
                       vocab=vocab or base.vocab, pairs=pairs or d_pairs, seq_len=seq_len or d_seq, dtype=dtype,
                       device=device, with_ref=with_ref, repeats=repeats or (10 if on_gpu else 3),
                       warmup=(3 if on_gpu else 1) if warmup is None else warmup, impls=tuple(impls), note=note)


def estimate_memory(config: BenchConfig) -> dict:
    """About how much memory a bench run of ``config`` needs at its peak, before anything is allocated.

    Returns ``{device: (bytes, {part: bytes})}`` for the run's device and, where the inputs are first made in
    fp32 on the host (a GPU run, or a 16-bit CPU run), for the host as well. The parts: the inputs; the exact
    reference (its upcast copies of the inputs, its gradients, one sequence's logits at a time); and the largest
    loss step. On CPU every implementation that runs must fit (the operating system's out-of-memory killer ends
    the process); on GPU an implementation that runs out of memory becomes a failed row, so only fastdpo's step
    is required to fit.
    """
    n, t, h, v, r = config.tokens, config.seq_len, config.hidden, config.vocab, 1 + int(config.with_ref)
    item = torch.empty((), dtype=config.torch_dtype).element_size()
    on_gpu = config.device == "cuda"
    truth_item = 4 if on_gpu else 8
    inputs = (n * h + v * h) * item * r + n * 8
    copies = (n * h + v * h) * truth_item
    # The weight, its gradient and one sequence's weight gradient before it is accumulated; 6 logits-sized
    # tensors of a sequence (measured on a 2-core CPU: 0.93x of this at H=1024, V=50000).
    truth_peak = 3 * copies + 6 * t * v * truth_item
    impls = get_implementations(config.impls)
    device = torch.device(config.device)
    steps = {impl.label: impl.step_bytes(n, h, v, item, config.with_ref) for impl in impls
             if (impl.key == "fastdpo" or not on_gpu) and impl.unavailable_reason(device, config.torch_dtype) is None}
    largest = max(steps, key=steps.get, default=None)
    step = steps.get(largest, 0)
    needed = inputs + max(truth_peak, copies + step)
    parts = {"inputs": inputs, f"exact {'fp32' if on_gpu else 'fp64'} reference": max(truth_peak, copies)}
    if largest is not None:
        parts[f"{largest} step"] = step
    # make_inputs draws everything in fp32 on the host; the reference's perturbation adds a temporary the size
    # of the policy's inputs.
    staging = (n * h + v * h) * 4 * (r + r - 1) + n * 8
    if on_gpu:
        return {"cuda": (needed, parts), "cpu": (staging, {"inputs made in fp32 on the host": staging})}
    if item != 4:
        parts["fp32 inputs before the cast"] = staging
        return {"cpu": (max(needed, staging + inputs), parts)}
    return {"cpu": (max(needed, staging), parts)}


def check_memory(config: BenchConfig, memory=None):
    """Raise :class:`~fastdpo.bench.memory.TooBigError` naming the estimate and the memory available when the
    run cannot fit (see :func:`estimate_memory`): on the host, when it needs more than
    :data:`~fastdpo.bench.memory.USABLE_FRACTION` of what is available (an out-of-memory kill there ends the run
    without a word); on GPU, more than is free (a step that runs out becomes a failed row). ``memory`` maps a
    device to a :class:`~fastdpo.bench.memory.DeviceMemory` to use instead of the machine's."""
    hint = "choose a smaller --pairs, --seq-len, --hidden or --vocab (or a named --shape)"
    for device, (needed, parts) in estimate_memory(config).items():
        check_fits(needed, parts, device, hint, memory=(memory or {}).get(device),
                   usable=USABLE_FRACTION if device == "cpu" else 1.0)


@dataclass
class BenchRow:
    """One implementation's measurements (times in ms, memory in bytes); ``status`` ok, skipped or failed."""

    key: str
    label: str
    version: str | None
    status: str
    note: str = ""
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    ms_all: list = field(default_factory=list)
    peak_bytes: int | None = None
    loss: float | None = None
    loss_abs_err: float | None = None
    grad_hidden_rel_err: float | None = None
    grad_weight_rel_err: float | None = None
    tflops: float | None = None
    gbps: float | None = None


@dataclass
class BenchReport:
    config: BenchConfig
    rows: list
    machine: str
    truth: str
    memory_method: str
    timer: str
    date: str
    input_bytes: int
    valid_tokens: int

    def row(self, key):
        return next((r for r in self.rows if r.key == key and r.status == "ok"), None)

    def to_dict(self):
        d = asdict(self)
        d["config"]["impls"] = list(self.config.impls)
        return d


def machine_name(device: str) -> str:
    """The device in words, for reports: the GPU's name, or the CPU model and its core count."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Timer:
    """Milliseconds of a region: CUDA events on GPU, ``perf_counter`` on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.ms = None

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t) * 1e3
        return False


class _ExactMatmul:
    """No TF32 inside: the truth must be a real fp32 (or fp64) computation."""

    def __enter__(self):
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._saved[0]
        torch.set_float32_matmul_precision(self._saved[1])
        return False


def exact_reference(inp: DPOInputs, dtype: torch.dtype | None = None) -> dict:
    """The loss and gradients of the naive reference, upcast to ``dtype`` (fp64 on CPU, fp32 on GPU by default).

    Computed one sequence at a time so that a full-size GPU shape fits: first every sequence's log-probs
    without gradient, then the loss and its coefficient ``c_s = ∂loss/∂π_s`` per sequence, then each sequence
    again with gradient, back-propagating ``c_s``. The result equals ``reference_dpo_loss`` on the whole batch.
    Returns a dict of ``loss`` (a float), ``grad_hidden`` and ``grad_weight`` (tensors in ``dtype``).
    """
    from ..reference import reference_sequence_logprobs

    if dtype is None:
        dtype = torch.float32 if inp.hidden.device.type == "cuda" else torch.float64
    h = inp.hidden.detach().to(dtype)
    w = inp.weight.detach().to(dtype)
    rows = h.shape[0]
    kw = dict(ignore_index=inp.ignore_index)
    with _ExactMatmul():
        with torch.no_grad():
            pol = torch.cat([reference_sequence_logprobs(h[i:i + 1], w, inp.labels[i:i + 1], **kw)
                             for i in range(rows)])
            ref = None
            if inp.has_ref:
                rh = inp.ref_hidden.detach().to(dtype)
                rw = inp.ref_weight.detach().to(dtype)
                ref = torch.cat([reference_sequence_logprobs(rh[i:i + 1], rw, inp.labels[i:i + 1], **kw)
                                 for i in range(rows)])
                del rh, rw
        pol = pol.requires_grad_()
        loss = dpo_sigmoid(pol, ref, inp.beta)
        (coef,) = torch.autograd.grad(loss, pol)
        w = w.requires_grad_()
        grad_h = torch.zeros_like(h)
        for i in range(rows):
            hi = h[i:i + 1].clone().requires_grad_()
            lp = reference_sequence_logprobs(hi, w, inp.labels[i:i + 1], **kw)
            (lp * coef[i]).sum().backward()
            grad_h[i] = hi.grad[0]
    return {"loss": float(loss.detach()), "grad_hidden": grad_h, "grad_weight": w.grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|`` in fp64 (NaN anywhere gives NaN)."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(a).any():
        return math.nan
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _release(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(impl, inp: DPOInputs, *, truth=None, repeats=3, warmup=1, progress=None) -> BenchRow:
    """Warm-up (the first run also gives the errors against ``truth``), one memory run, ``repeats`` timed runs.

    An exception (an out-of-memory error, an API a competitor changed) turns into a ``failed`` row.
    ``progress`` is called once per run.
    """
    device = inp.hidden.device
    row = BenchRow(impl.key, impl.label, impl.version, "ok")
    tick = progress or (lambda: None)
    try:
        for i in range(max(1, warmup)):
            inp.zero_grad()
            loss = impl.step(inp)
            _sync(device)
            if i == 0:
                row.loss = float(loss)
                if truth is not None:
                    row.loss_abs_err = abs(row.loss - truth["loss"])
                    row.grad_hidden_rel_err = rel_err(inp.hidden.grad, truth["grad_hidden"])
                    row.grad_weight_rel_err = rel_err(inp.weight.grad, truth["grad_weight"])
            tick()
        del loss
        inp.zero_grad()
        meter = PeakMeter(device)
        with meter:
            impl.step(inp)
        row.peak_bytes = meter.peak_bytes
        tick()
        for _ in range(repeats):
            inp.zero_grad()
            with _Timer(device) as t:
                impl.step(inp)
            row.ms_all.append(t.ms)
            tick()
        if hasattr(impl, "choice"):
            row.note = impl.choice(inp)
    except Exception as err:  # noqa: BLE001 - a failing competitor must not end the comparison
        row.status = "failed"
        row.note = f"{type(err).__name__}: {err}".splitlines()[0][:240]
    finally:
        inp.zero_grad()
        _release(device)
    if row.ms_all:
        row.ms_median = statistics.median(row.ms_all)
        row.ms_min, row.ms_max = min(row.ms_all), max(row.ms_all)
        row.tflops = inp.work_flops() / (row.ms_median * 1e-3) / 1e12
        row.gbps = inp.min_bytes() / (row.ms_median * 1e-3) / 1e9
    return row


def run_bench(config: BenchConfig, *, progress: bool = True, inputs: DPOInputs | None = None) -> BenchReport:
    """Measure every implementation of ``config.impls`` that can run here; skipped ones say why."""
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    if device.type == "cpu":
        steady_allocator()
    inp = inputs or make_inputs(config.pairs, config.seq_len, config.hidden, config.vocab,
                                dtype=config.torch_dtype, device=device, with_ref=config.with_ref)
    impls = get_implementations(config.impls)
    reasons = {impl.key + impl.label: impl.unavailable_reason(device, config.torch_dtype) for impl in impls}
    runnable = [impl for impl in impls if reasons[impl.key + impl.label] is None]
    per_impl = max(1, config.warmup) + 1 + config.repeats
    truth_dtype = torch.float32 if device.type == "cuda" else torch.float64
    with tqdm(total=1 + per_impl * len(runnable), desc="fastdpo bench", unit="run", disable=not progress,
              leave=False) as bar:
        bar.set_postfix_str(f"exact {str(truth_dtype).replace('torch.', '')} reference")
        truth = exact_reference(inp, truth_dtype)
        _release(device)
        bar.update()
        rows = []
        for impl in impls:
            reason = reasons[impl.key + impl.label]
            if reason is not None:
                rows.append(BenchRow(impl.key, impl.label, impl.version, "skipped", note=reason))
                continue
            bar.set_postfix_str(impl.label)
            rows.append(measure(impl, inp, truth=truth, repeats=config.repeats, warmup=config.warmup,
                                progress=bar.update))
    return BenchReport(config=config, rows=rows, machine=machine_name(config.device),
                       truth=f"naive reference in {str(truth_dtype).replace('torch.', '')}, same inputs",
                       memory_method=PeakMeter(device).method,
                       timer="CUDA events" if device.type == "cuda" else "time.perf_counter",
                       date=_dt.datetime.now().isoformat(timespec="seconds"), input_bytes=inp.input_bytes(),
                       valid_tokens=inp.valid_tokens)


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _mem_unit(report):
    peaks = [r.peak_bytes for r in report.rows if r.peak_bytes]
    return ("GiB", 1 << 30) if peaks and max(peaks) >= (1 << 30) else ("MiB", 1 << 20)


def table_rows(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (shared by the text and the markdown forms)."""
    unit, div = _mem_unit(report)
    header = ["implementation", "version", "ms median", "ms min-max", "TFLOP/s", f"peak extra {unit}",
              "loss abs err", "grad-h rel err", "grad-W rel err", "note"]
    cells = []
    for r in report.rows:
        if r.status != "ok":
            cells.append([r.label, r.version or "-", "-", "-", "-", "-", "-", "-", "-", f"{r.status}: {r.note}"])
            continue
        spread = f"{_fmt(r.ms_min, '.1f')}-{_fmt(r.ms_max, '.1f')}"
        peak = None if r.peak_bytes is None else r.peak_bytes / div
        cells.append([r.label, r.version or "-", _fmt(r.ms_median, ".1f"), spread, _fmt(r.tflops, ".2f"),
                      _fmt(peak, ".3f" if unit == "GiB" else ".1f"), _fmt(r.loss_abs_err, ".1e"),
                      _fmt(r.grad_hidden_rel_err, ".1e"), _fmt(r.grad_weight_rel_err, ".1e"), r.note])
    return header, cells


def format_table(report: BenchReport, markdown: bool = False) -> str:
    """The results as an aligned text table, or a markdown table."""
    header, cells = table_rows(report)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in cells])


def describe(report: BenchReport) -> str:
    """The lines printed above the table: what was run, where, and how it was measured."""
    c = report.config
    ref = "policy fwd+bwd + reference fwd" if c.with_ref else "policy fwd+bwd, no reference"
    return "\n".join([
        f"shape {c.shape}: H={c.hidden} V={c.vocab}, {c.pairs} pairs x {c.seq_len} tokens "
        f"({report.valid_tokens} of {c.tokens} labelled), {c.dtype}, {ref}" + (f" [{c.note}]" if c.note else ""),
        f"device: {report.machine}",
        f"time: {report.timer}, median of {c.repeats} after {max(1, c.warmup)} warm-up; memory: {report.memory_method}",
        f"error against: {report.truth}",
    ])


def summary(report: BenchReport, out_dir: str | None = None) -> str:
    """The closing lines: memory saved (and time) against the naive reference and TRL, and where files went."""
    ours, naive, trl = report.row("fastdpo"), report.row("naive"), report.row("trl")
    lines = []
    if ours and naive:
        lines.append(f"memory: fastdpo peaks {format_bytes(ours.peak_bytes)} above the inputs, the naive reference "
                     f"{format_bytes(naive.peak_bytes)}: {compare_peaks(ours.peak_bytes, naive.peak_bytes)}")
        lines.append(f"time: fastdpo {ours.ms_median:.1f} ms, naive {naive.ms_median:.1f} ms "
                     f"({ours.ms_median / naive.ms_median:.2f}x naive's time)")
    if ours and trl:
        lines.append(f"vs TRL: {ours.ms_median / trl.ms_median:.2f}x its time; TRL peaks "
                     f"{format_bytes(trl.peak_bytes)}: {compare_peaks(ours.peak_bytes, trl.peak_bytes)}")
    fast = report.row("fastdpo-fast")
    if fast and trl:
        lines.append(f"fastdpo-fast (memory='fast') vs TRL: {fast.ms_median / trl.ms_median:.2f}x its time; "
                     f"{compare_peaks(fast.peak_bytes, trl.peak_bytes)}")
    if out_dir:
        lines.append(f"results: {os.path.join(out_dir, 'results.csv')}, {os.path.join(out_dir, 'results.json')}")
        chart = os.path.join(out_dir, "bench.png")
        lines.append(f"chart: {chart}" if os.path.exists(chart) else "chart: not written (matplotlib not installed)")
    return "\n".join(lines)


class OutputDirError(ValueError):
    """The output folder cannot be used: not a folder, not writable, or not empty without ``overwrite``."""


# The files a run writes; with ``overwrite`` these are replaced as one set (a stale chart of an earlier run is not
# kept beside new results), every other entry of the folder is carried over as it is.
OUTPUT_PATTERNS = ("results.csv", "results.json", "bench.png", "profile.json", "timeline.png",
                   "memory_snapshot_*.pickle", "padding_free.json")


def _is_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in OUTPUT_PATTERNS)


def _holds_cwd(path: str) -> bool:
    try:
        cwd, target = os.path.realpath(os.getcwd()), os.path.realpath(path)
    except OSError:
        return False
    return cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep)


def check_out_dir(out: str | None, prefix: str, overwrite: bool = False) -> str:
    """The output folder a run will write to, checked before the run and created only after it.

    ``None`` names a fresh ``fastdpo-out-<prefix>-<time>`` folder in the working directory. An existing
    folder that is not empty is refused unless ``overwrite`` (then the run's files replace those of an earlier
    run and other files are left alone). Nothing is created here, so a run that fails or is refused leaves no
    folder. Raises :class:`OutputDirError` saying why the folder cannot be used.
    """
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f"fastdpo-out-{prefix}-{stamp}"
        n = 1
        while os.path.lexists(out):
            n += 1
            out = f"fastdpo-out-{prefix}-{stamp}-{n}"
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputDirError(f"{out!r} exists and is not a folder")
    if os.path.isdir(out):
        try:
            entries = os.listdir(out)
        except OSError as err:
            raise OutputDirError(f"cannot read {out!r}: {err.strerror or err}") from err
        if entries and not overwrite:
            count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
            raise OutputDirError(f"{out!r} is not empty ({count}); "
                                 f"pass --overwrite to replace an earlier run's results in it (other files are kept) "
                                 f"or choose another --out")
        if _holds_cwd(out):
            # The run is written beside the folder and renamed into its place; the working directory cannot move.
            raise OutputDirError(f"{out!r} is the working directory or holds it; choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputDirError(f"cannot write to {out!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to {out!r}: no permission to create a folder in {parent!r}")
    if os.path.isdir(out) and not os.access(out, os.R_OK | os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to {out!r}: permission denied")
    return out


def _remap(value, src: str, dst: str):
    """``value`` (a path, or a dict or list of paths) with the folder ``src`` replaced by ``dst``."""
    if isinstance(value, dict):
        return {k: _remap(v, src, dst) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_remap(v, src, dst) for v in value)
    if isinstance(value, str) and (value == src or value.startswith(src + os.sep)):
        return dst + value[len(src):]
    return value


def write_out_dir(out: str, write):
    """Call ``write(folder)`` on a fresh folder beside ``out`` and move it into place only once ``write`` has
    returned; returns what ``write`` returned, its paths pointing into ``out``.

    A write that fails (a full disk, Ctrl-C) leaves ``out`` as it was and no temporary folder, and removes the
    parent folders this call created. An existing ``out`` is moved aside, its entries that are not a run's
    outputs (:data:`OUTPUT_PATTERNS`) are carried into the new folder, the new folder is renamed in and the old
    one removed; should a rename fail, the old folder is put back.
    """
    # A link to a folder stays a link: the run replaces the folder it points to.
    target = os.path.realpath(out) if os.path.islink(out) else os.path.abspath(out)
    parent, name = os.path.split(target)
    created = None
    path = parent
    while not os.path.lexists(path):
        created, path = path, os.path.dirname(path)
    tmp = aside = None
    carried = []
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
        # mkdtemp makes a private folder; give the result the mode of the folder it replaces, or a new one's.
        if os.path.isdir(target):
            mode = os.stat(target).st_mode & 0o7777
        else:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o777 & ~mask
        os.chmod(tmp, mode)
        result = write(tmp)
        if os.path.isdir(target):
            aside = tmp + ".old"
            os.rename(target, aside)
            for entry in sorted(os.listdir(aside)):
                if not _is_output(entry) and not os.path.lexists(os.path.join(tmp, entry)):
                    os.rename(os.path.join(aside, entry), os.path.join(tmp, entry))
                    carried.append(entry)
        os.rename(tmp, target)
    except BaseException:
        if tmp is None or os.path.isdir(tmp):  # the new folder is not in place: put the old one back
            if aside is not None:
                for entry in carried:
                    os.rename(os.path.join(tmp, entry), os.path.join(aside, entry))
                if not os.path.lexists(target):
                    os.rename(aside, target)
                aside = None
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return _remap(result, tmp, out.rstrip(os.sep) or out)


def write_chart(report: BenchReport, path: str) -> bool:
    """Bar charts of time (with min-max whiskers) and peak memory; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report.rows if r.status == "ok"]
    unit, div = _mem_unit(report)
    labels = [r.key + (f"\n{r.version}" if r.version and r.key not in ("fastdpo", "naive") else "") for r in rows]
    colors = ["tab:green" if r.key == "fastdpo" else "tab:gray" if r.key == "naive" else "tab:blue" for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    med = [r.ms_median for r in rows]
    err = [[r.ms_median - r.ms_min for r in rows], [r.ms_max - r.ms_median for r in rows]]
    ax_t.bar(labels, med, yerr=err, color=colors, capsize=4)
    ax_t.set_ylabel("ms per loss step (median, min-max)")
    ax_m.bar(labels, [(r.peak_bytes or 0) / div for r in rows], color=colors)
    ax_m.set_ylabel(f"peak memory above inputs ({unit})")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=8)
    c = report.config
    fig.suptitle(f"DPO loss step, {c.shape}: H={c.hidden} V={c.vocab} {c.pairs}x{c.seq_len} {c.dtype} "
                 f"{'with' if c.with_ref else 'no'} reference\n{report.machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(report: BenchReport, out_dir: str) -> dict:
    """``results.csv``, ``results.json`` and ``bench.png`` into ``out_dir``; returns the paths written."""
    paths = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json")}
    fields = [f for f in BenchRow.__dataclass_fields__ if f != "ms_all"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in report.rows:
            w.writerow({k: getattr(r, k) for k in fields})
    with open(paths["json"], "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    chart = os.path.join(out_dir, "bench.png")
    if write_chart(report, chart):
        paths["png"] = chart
    return paths
