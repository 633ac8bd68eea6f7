"""The GPU comparison of fastdpo against naive, TRL 1.16, Liger 0.8.5 and CCE 25.1.1.

fastdpo's rows: each engine in lean and fast mode, ``fastdpo-fused`` / ``fastdpo-fused-fast`` (the fused Triton
kernels, ``backend="triton"``) and ``fastdpo-chunked`` / ``fastdpo-chunked-fast`` (``backend="torch"``), and what
``backend="auto"`` picks, ``fastdpo`` (lean) and ``fastdpo-fast``. The fused kernels tune themselves on the first
call at a shape (during the warm-up); the choices are listed in the report (from the autotuning cache).

For each shape (llama3-8b, gemma2-2b, qwen2.5-7b by default), with a reference head (policy forward+backward plus
reference forward) and without one, and like with like: first every implementation asked for the log-probs only,
then those that can (fastdpo, fastdpo-fast, TRL) asked also for the per-token extras TRL's DPOTrainer logs
(entropy, mean logit, top-1). Time (CUDA events, warm-up, median of repeats), peak memory above the inputs
(``torch.cuda.max_memory_allocated``), loss / hidden-gradient errors against an fp32 run of the naive reference on
the same inputs (logits with a std of about 4, the first 25% of every row ignored). Then the targets
(``docs/benchmarks.md#targets``).

Rows go to ``$OUT/<name>.json`` after every implementation (a run cut off still leaves what it measured): a list
of ``{device, shape, case, impl, extras, ms, peak_gib, loss_err, grad_h_rel_err, ...}``; the markdown report to
stdout and ``$OUT/<name>.md``. The correctness checks of ``gpu_checks.py`` run first unless ``--skip-checks``.
Exit status 1 when fastdpo fails or is out of tolerance.

    python3 benchmarks/gpu_compare.py [--shapes llama3-8b] [--extras both|off|on] [--name gpu_compare]

``--tiny --device cpu`` runs the same flow at toy sizes (the tests use it); nothing here touches CUDA before
``main`` runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch

from fastdpo.bench.competitors import FastDPO, get_implementations, make_inputs
from fastdpo.bench.memory import PeakMeter
from fastdpo.bench.run import (
    GPU_SHAPES,
    SHAPES,
    BenchConfig,
    BenchReport,
    BenchRow,
    exact_reference,
    format_table,
    machine_name,
    measure,
)

# The targets (docs/benchmarks.md#targets): exactness in both memory modes; lean and fast time and peak against TRL.
MAX_LOSS_ERR = 1e-4
MAX_GRAD_HIDDEN_REL_ERR = 5e-3
LEAN_MAX_TIME_VS_TRL = 1.0
LEAN_MAX_PEAK_VS_TRL = 0.4
LEAN_MAX_PEAK_GIB_LLAMA = 1.25
FAST_MAX_TIME_VS_TRL = 0.80
FAST_MAX_PEAK_VS_TRL = 1.0
TINY = dict(hidden=32, vocab=96, pairs=2, seq_len=16)
# Liger compiles with torch.compile on its first call (tens of seconds): it runs after both extras passes of a
# case, so a run cut off there keeps every other row.
# Each engine's rows: (backend, memory).
ENGINE_ROWS = {"fastdpo-fused": ("triton", "lean"), "fastdpo-fused-fast": ("triton", "fast"),
               "fastdpo-chunked": ("torch", "lean"), "fastdpo-chunked-fast": ("torch", "fast")}
DEFAULT_ORDER = ("fastdpo", "fastdpo-fast", *ENGINE_ROWS, "trl", "naive", "cce", "liger")
RUN_LAST = ("liger",)
OURS = ("fastdpo", "fastdpo-fast", *ENGINE_ROWS)
FAST_ROWS = {"fastdpo-fast", "fastdpo-fused-fast", "fastdpo-chunked-fast"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def implementations(keys, extras: bool = False) -> list:
    """Adapters for ``keys``: the engine rows of :data:`ENGINE_ROWS`, else what
    :func:`fastdpo.bench.competitors.get_implementations` knows."""
    out = []
    for key in keys:
        if key in ENGINE_ROWS:
            backend, memory = ENGINE_ROWS[key]
            impl = FastDPO(backend, memory=memory, extras=extras)
            impl.key = impl.label = key
            out.append(impl)
        else:
            out += get_implementations((key,), extras=extras)
    return out


def tuning_lines(cache_dir=None) -> list:
    """What the fused kernels' autotuner chose in this environment (its cache files), as markdown lines."""
    from fastdpo.kernels import autotune

    folder = cache_dir or autotune.cache_dir()
    files = sorted(f for f in os.listdir(folder) if f.startswith("autotune-")) if os.path.isdir(folder) else []
    lines = []
    for name in files:
        try:
            with open(os.path.join(folder, name)) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            lines.append(f"- {name}: unreadable ({err})")
            continue
        for key, entry in sorted(data.get("configs", {}).items()):
            trials = entry.get("trials", [])
            lines.append(f"- {data.get('device')} {key}: `{entry.get('config')}` ({len(trials)} trials, "
                         f"{entry.get('seconds')} s{'' if entry.get('complete') else ', budget spent'})")
    return lines or [f"- none in {folder} (the default config: no CUDA, or {autotune.ENV_AUTOTUNE}=0)"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(GPU_SHAPES),
                   help=f"comma-separated shapes (default {','.join(GPU_SHAPES)}; known: {', '.join(SHAPES)})")
    p.add_argument("--cases", default="ref,noref", help="ref (policy+reference), noref (reference-free), or both")
    p.add_argument("--impl", default=",".join(DEFAULT_ORDER), help="implementations to compare, in this order")
    p.add_argument("--extras", choices=["both", "off", "on"], default="both",
                   help="compare without TRL's logged extras, with them (fastdpo, fastdpo-fast, trl), or both")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (for a CPU smoke test of this script)")
    p.add_argument("--name", default="gpu_compare", help="basename of the files written to $OUT")
    p.add_argument("--skip-checks", action="store_true",
                   help="skip the correctness checks of gpu_checks.py that run before the timings")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"argument --shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.cases:
        if c not in ("ref", "noref"):
            p.error(f"argument --cases: unknown case {c!r}; choose from ref, noref")
    args.impl = tuple(k.strip() for k in args.impl.split(",") if k.strip())
    try:
        implementations(args.impl)
    except ValueError as err:
        p.error(f"argument --impl: {err}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("argument --repeats must be >= 1 and --warmup >= 0")
    if not args.name or os.sep in args.name:
        p.error("argument --name: a plain file name is expected")
    return args


def flat_row(row: BenchRow, report: BenchReport, extras: bool) -> dict:
    """One row of the results JSON (the schema of benchmarks/results/*.json)."""
    c = report.config
    gib = None if row.peak_bytes is None else row.peak_bytes / (1 << 30)
    return {"device": report.machine, "shape": c.shape, "case": "ref" if c.with_ref else "noref", "impl": row.key,
            "extras": extras, "ms": row.ms_median, "peak_gib": gib, "loss_err": row.loss_abs_err,
            "grad_h_rel_err": row.grad_hidden_rel_err, "grad_w_rel_err": row.grad_weight_rel_err,
            "ms_min": row.ms_min, "ms_max": row.ms_max, "tflops": row.tflops, "status": row.status, "note": row.note,
            "version": row.version, "label": row.label, "dtype": c.dtype, "hidden": c.hidden, "vocab": c.vocab,
            "pairs": c.pairs, "seq_len": c.seq_len, "valid_tokens": report.valid_tokens, "date": report.date}


def run_case(shape_name, with_ref, args, dtype, sink=None) -> list:
    """One shape and reference mode, every implementation on the same inputs, without the extras then with them.

    Returns ``[(extras, BenchReport), ...]``; ``sink(flat_row)`` is called after every implementation.
    """
    s = SHAPES[shape_name]
    size = TINY if args.tiny else dict(hidden=s.hidden, vocab=s.vocab, pairs=s.pairs, seq_len=s.seq_len)
    device = torch.device(args.device)
    inp = make_inputs(size["pairs"], size["seq_len"], size["hidden"], size["vocab"], dtype=dtype, device=device,
                      with_ref=with_ref)
    truth = exact_reference(inp, torch.float32 if device.type == "cuda" else torch.float64)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    passes = {"both": (False, True), "off": (False,), "on": (True,)}[args.extras]
    config = BenchConfig(shape=shape_name, dtype=args.dtype, device=args.device, with_ref=with_ref,
                         repeats=args.repeats, warmup=args.warmup, impls=args.impl, **size)
    out = []
    deferred = []
    for extras in passes:
        report = BenchReport(config=config, rows=[], machine=machine_name(args.device),
                             truth="naive reference in fp32 (fp64 on CPU), same inputs",
                             memory_method=PeakMeter(device).method,
                             timer="CUDA events" if device.type == "cuda" else "time.perf_counter",
                             date=_dt.datetime.now().isoformat(timespec="seconds"), input_bytes=inp.input_bytes(),
                             valid_tokens=inp.valid_tokens)
        out.append((extras, report))
        for impl in implementations(args.impl, extras=extras):
            if extras and not impl.supports_extras:
                continue
            if impl.key in RUN_LAST:
                deferred.append((impl, extras, report))
                continue
            _measure_into(impl, extras, report, inp, truth, args, device, dtype, sink)
    for impl, extras, report in deferred:
        _measure_into(impl, extras, report, inp, truth, args, device, dtype, sink)
    for _, report in out:
        order = {k: i for i, k in enumerate(args.impl)}
        report.rows.sort(key=lambda r: order.get(r.key, len(order)))
    del inp, truth
    return out


def _measure_into(impl, extras, report, inp, truth, args, device, dtype, sink):
    reason = impl.unavailable_reason(device, dtype)
    if reason is not None:
        row = BenchRow(impl.key, impl.label, impl.version, "skipped", note=reason)
    else:
        c = report.config
        print(f"  {c.shape} {'ref' if c.with_ref else 'noref'}{' +extras' if extras else ''}: {impl.label} ...",
              file=sys.stderr, flush=True)
        row = measure(impl, inp, truth=truth, repeats=args.repeats, warmup=args.warmup)
    report.rows.append(row)
    if sink is not None:
        sink(flat_row(row, report, extras))


def _find(rows, key):
    return next((r for r in rows if r.key == key and r.status == "ok"), None)


def check_targets(results: list) -> tuple[list, bool]:
    """The targets as ``(lines, correct)``; ``correct`` is False when fastdpo failed or is out of tolerance.

    Time and memory targets are reported (MET/MISSED with the figure), not enforced; exactness is a check.
    """
    lines, correct = [], True
    for extras, rep in results:
        c = rep.config
        case = f"{c.shape} {'ref' if c.with_ref else 'noref'}{' +extras' if extras else ''}"
        trl = _find(rep.rows, "trl")
        for key in OURS:
            if key not in rep.config.impls:
                continue
            ours = _find(rep.rows, key)
            if ours is None:
                failed = next((r for r in rep.rows if r.key == key), None)
                lines.append(f"- {case} {key}: FAIL did not run ({failed.note if failed else 'not selected'})")
                correct = False
                continue
            ok_loss = ours.loss_abs_err is not None and ours.loss_abs_err <= MAX_LOSS_ERR
            ok_grad = ours.grad_hidden_rel_err is not None and ours.grad_hidden_rel_err <= MAX_GRAD_HIDDEN_REL_ERR
            correct = correct and ok_loss and ok_grad
            lines.append(f"- {case} {key}: loss err {ours.loss_abs_err:.1e} {'PASS' if ok_loss else 'FAIL'} "
                         f"(<= {MAX_LOSS_ERR:g}); grad-hidden rel err {ours.grad_hidden_rel_err:.1e} "
                         f"{'PASS' if ok_grad else 'FAIL'} (<= {MAX_GRAD_HIDDEN_REL_ERR:g})")
            fast = key in FAST_ROWS
            max_time = FAST_MAX_TIME_VS_TRL if fast else LEAN_MAX_TIME_VS_TRL
            max_peak = FAST_MAX_PEAK_VS_TRL if fast else LEAN_MAX_PEAK_VS_TRL
            if trl is None:
                lines.append("  vs TRL: not measured (TRL not run)")
            else:
                ratio = ours.ms_median / trl.ms_median
                lines.append(f"  time {ours.ms_median:.2f} ms = {ratio:.2f}x TRL's {trl.ms_median:.2f} ms: "
                             f"{'MET' if ratio <= max_time else 'MISSED'} (target <= {max_time}x)")
                if ours.peak_bytes is not None and trl.peak_bytes:
                    pr = ours.peak_bytes / trl.peak_bytes
                    lines.append(f"  peak {ours.peak_bytes / (1 << 30):.3f} GiB = {pr:.2f}x TRL's "
                                 f"{trl.peak_bytes / (1 << 30):.3f} GiB: {'MET' if pr <= max_peak else 'MISSED'} "
                                 f"(target <= {max_peak}x)")
            if not fast and c.shape == "llama3-8b" and c.with_ref and ours.peak_bytes is not None:
                gib = ours.peak_bytes / (1 << 30)
                met = "MET" if gib <= LEAN_MAX_PEAK_GIB_LLAMA else "MISSED"
                lines.append(f"  peak {gib:.3f} GiB above inputs: {met} "
                             f"(target <= {LEAN_MAX_PEAK_GIB_LLAMA} GiB)")
    return lines, correct


def markdown(results: list, target_lines: list, args, check_lines=()) -> str:
    """The whole report: set-up, one table per case and extras setting, the targets."""
    first = results[0][1]
    out = [f"# fastdpo GPU comparison ({first.date})", "",
           f"- device: {first.machine}",
           f"- dtype {args.dtype}; time: {first.timer}, median of {args.repeats} after {max(1, args.warmup)} "
           f"warm-up; memory: {first.memory_method}, above the inputs",
           f"- inputs: random, logits std ~4, first 25% of each row ignored; error vs {first.truth}",
           "- versions: " + ", ".join(sorted({f"{r.label.split()[0]} {r.version}" for _, rep in results
                                               for r in rep.rows if r.version})), ""]
    if check_lines:
        out += ["## Correctness checks (benchmarks/gpu_checks.py)", ""] + list(check_lines) + [""]
    for extras, rep in results:
        c = rep.config
        what = "policy fwd+bwd + reference fwd" if c.with_ref else "policy fwd+bwd, no reference"
        asked = ("log-probs + TRL's logged extras (entropy, mean logit, top-1)" if extras else "log-probs only")
        out += [f"## {c.shape}: H={c.hidden} V={c.vocab}, {c.pairs} pairs x {c.seq_len}, {what}; {asked}", "",
                format_table(rep, markdown=True), ""]
    out += ["## Targets", ""] + target_lines
    out += ["", "## Autotuning chosen (fused kernels)", ""] + tuning_lines()
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_compare.py: no CUDA device visible to torch; run it on a GPU machine (or --tiny --device cpu)",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    out = os.environ.get("OUT")
    flat = []

    def sink(row):
        flat.append(row)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"{args.name}.json"), "w") as f:
                json.dump(flat, f, indent=2)

    checks_ok, check_lines = True, []
    if not args.skip_checks:
        # gpu_checks.py sits beside this script, which also runs without being on sys.path.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_checks import run_checks

        checks_ok, check_lines = run_checks(args.device, tiny=args.tiny)
        print("\n".join(check_lines), file=sys.stderr, flush=True)
    results = []
    for shape in args.shapes:
        for case in args.cases:
            results += run_case(shape, case == "ref", args, dtype, sink)
            lines, _ = check_targets(results)
            text = markdown(results, lines, args, check_lines)
            if out:
                with open(os.path.join(out, f"{args.name}.md"), "w") as f:
                    f.write(text)
    lines, correct = check_targets(results)
    correct = correct and checks_ok
    print(markdown(results, lines, args, check_lines))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
