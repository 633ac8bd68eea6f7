"""Turn what a GPU run (``benchmarks/device_run.sh``) left in ``$OUT`` into the repository's record of GPU runs.

Reads the row lists ``compare-*.json`` / ``gpu_compare*.json`` (written by ``gpu_compare.py``), ``cublas.json``,
``gpu_checks.md``, ``profile.json`` and ``steps.tsv`` from ``--from`` (that run's ``$OUT``, or a copy of it
on another machine), and writes:

- ``--out DIR``: ``results.json`` (every row, one list) and ``RESULTS-run.md`` (the section below); ``device_run.sh``
  runs this as its last step;
- ``--record``: ``benchmarks/results/<card>-<date>.json`` (the list of rows) and the section appended to
  ``benchmarks/RESULTS.md``: the card, the cuBLAS bf16 rate, the checks' verdict, one table per shape (ms and
  peak with their ratio to TRL's asked for the same statistics, errors against fp32) and the targets
  (``docs/benchmarks.md#targets``).

    python3 benchmarks/record_results.py --from <the run's $OUT folder> --record
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED = ("device", "shape", "case", "impl", "ms", "peak_gib", "loss_err", "grad_h_rel_err")
IMPL_ORDER = ("fastdpo", "fastdpo-fast", "fastdpo-fused", "fastdpo-fused-fast", "fastdpo-chunked",
              "fastdpo-chunked-fast", "trl", "liger", "cce", "naive")


def load_rows(folder: str) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "compare-*.json")) +
                       glob.glob(os.path.join(folder, "gpu_compare*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of rows, got {type(data).__name__}")
        for row in data:
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"{path}: a row lacks {missing}")
            rows.append(row)
    return rows


def card_slug(device: str) -> str:
    """``NVIDIA H100 80GB HBM3 (torch 2.11.0)`` -> ``nvidia-h100-80gb-hbm3``."""
    name = device.split(" (")[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _load_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _targets(rows: list) -> list:
    """The exactness, time and memory targets per shape and case, from the rows (log-probs only, like with like)."""
    sys.path.insert(0, HERE)
    import gpu_compare as gc

    out = []
    for (shape, case) in dict.fromkeys((r["shape"], r["case"]) for r in rows):
        pick = {r["impl"]: r for r in rows if r["shape"] == shape and r["case"] == case and not r.get("extras")
                and r.get("status", "ok") == "ok"}
        trl = pick.get("trl")
        for key in gc.OURS:
            fast = key in gc.FAST_ROWS
            max_t = gc.FAST_MAX_TIME_VS_TRL if fast else gc.LEAN_MAX_TIME_VS_TRL
            max_p = gc.FAST_MAX_PEAK_VS_TRL if fast else gc.LEAN_MAX_PEAK_VS_TRL
            ours = pick.get(key)
            if ours is None:
                continue
            exact = (ours["loss_err"] is not None and ours["loss_err"] <= gc.MAX_LOSS_ERR and
                     ours["grad_h_rel_err"] is not None and ours["grad_h_rel_err"] <= gc.MAX_GRAD_HIDDEN_REL_ERR)
            line = (f"- {shape} {case} {key}: exactness {'MET' if exact else 'MISSED'} (loss err "
                    f"{_fmt(ours['loss_err'], '.1e')}, grad-h {_fmt(ours['grad_h_rel_err'], '.1e')})")
            if trl and trl["ms"] and ours["ms"]:
                t = ours["ms"] / trl["ms"]
                line += f"; time {t:.2f}x TRL {'MET' if t <= max_t else 'MISSED'} (<= {max_t}x)"
            if trl and trl["peak_gib"] and ours["peak_gib"] is not None:
                p = ours["peak_gib"] / trl["peak_gib"]
                line += f"; peak {p:.2f}x TRL {'MET' if p <= max_p else 'MISSED'} (<= {max_p}x)"
            if not fast and shape == "llama3-8b" and case == "ref" and ours["peak_gib"] is not None:
                ok = ours["peak_gib"] <= gc.LEAN_MAX_PEAK_GIB_LLAMA
                line += (f"; peak {ours['peak_gib']:.3f} GiB {'MET' if ok else 'MISSED'} "
                         f"(<= {gc.LEAN_MAX_PEAK_GIB_LLAMA})")
            out.append(line)
    return out


def markdown(rows: list, folder: str) -> str:
    device = next((r["device"] for r in rows), "unknown device")
    date = min((r.get("date") or "") for r in rows)[:10] if rows else "?"
    out = [f"## GPU run: {device}, {date} (benchmarks/device_run.sh)", ""]
    cublas = _load_json(folder, "cublas.json")
    if cublas:
        prods = ", ".join(f"{p['product']} {p['tflops']:.0f}" for p in cublas["products"])
        out += [f"- cuBLAS {cublas['dtype']} rate of this card (TFLOP/s): {prods}"]
    checks = os.path.join(folder, "gpu_checks.md")
    if os.path.exists(checks):
        text = open(checks).read()
        verdicts = re.findall(r"^- \*\*(.+?)\*\* \(([\d.]+) s\): (PASS|FAIL)", text, flags=re.M)
        out += ["- correctness checks: " + (", ".join(f"{n} {v}" for n, _, v in verdicts) or "no verdict found")]
    steps = os.path.join(folder, "steps.tsv")
    if os.path.exists(steps):
        items = [line.split("\t") for line in open(steps).read().splitlines() if line.strip()]
        out += ["- steps (exit status, seconds): " + ", ".join(f"{n} {rc} {s}s" for n, rc, s in items)]
    out += ["- time: CUDA-event median; peak: max_memory_allocated above the inputs; errors against an fp32 run; "
            "`x TRL` compares with TRL asked for the same statistics (extras on or off)", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sample = next(r for r in rows if r["shape"] == shape)
        out += [f"### {shape}: H={sample.get('hidden')} V={sample.get('vocab')}, {sample.get('pairs')} pairs x "
                f"{sample.get('seq_len')}", "",
                "| case | extras | impl | ms | x TRL | peak GiB | x TRL peak | loss err | grad-h rel err | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for case in ("ref", "noref"):
            for extras in (False, True):
                group = [r for r in rows
                         if r["shape"] == shape and r["case"] == case and bool(r.get("extras")) == extras]
                trl = next((r for r in group if r["impl"] == "trl" and r.get("status", "ok") == "ok"), None)
                group.sort(key=lambda r: IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else 99)
                for r in group:
                    ok = r.get("status", "ok") == "ok"
                    t = r["ms"] / trl["ms"] if ok and trl and r["ms"] and trl["ms"] else None
                    p = (r["peak_gib"] / trl["peak_gib"] if ok and trl and r["peak_gib"] is not None and trl["peak_gib"]
                         else None)
                    note = "" if ok else f"{r.get('status')}: {r.get('note', '')}".replace("|", "/")[:120]
                    out.append(f"| {case} | {'yes' if extras else 'no'} | {r['impl']} | {_fmt(r['ms'], '.2f')} | "
                               f"{_fmt(t, '.2f')} | {_fmt(r['peak_gib'], '.3f')} | {_fmt(p, '.2f')} | "
                               f"{_fmt(r['loss_err'], '.1e')} | {_fmt(r['grad_h_rel_err'], '.1e')} | {note} |")
        out.append("")
    out += ["### Targets", ""] + _targets(rows) + [""]
    sys.path.insert(0, HERE)
    import gpu_compare as gc

    out += ["### Autotuning chosen (fused kernels)", ""] + gc.tuning_lines(os.path.join(folder, "tuning")) + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="the $OUT folder of a benchmarks/device_run.sh run")
    p.add_argument("--out", help="write results.json and RESULTS-run.md here")
    p.add_argument("--record", action="store_true", help="write benchmarks/results/<card>-<date>.json and append "
                                                         "the section to benchmarks/RESULTS.md")
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"))
    args = p.parse_args(argv)
    rows = load_rows(args.src)
    if not rows:
        print(f"record_results.py: no rows in {args.src}", file=sys.stderr)
        return 1
    text = markdown(rows, args.src)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=2)
        with open(os.path.join(args.out, "RESULTS-run.md"), "w") as f:
            f.write(text)
    if args.record:
        date = min((r.get("date") or "") for r in rows)[:10] or "undated"
        os.makedirs(args.results_dir, exist_ok=True)
        path = os.path.join(args.results_dir, f"{card_slug(rows[0]['device'])}-{date}.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
        with open(args.results_md, "a") as f:
            f.write("\n" + text)
        print(f"wrote {path} and appended to {args.results_md}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
