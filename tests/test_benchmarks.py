"""The benchmarks run: every pytest-benchmark case at tiny size, and gpu_compare.py's flow on CPU at toy sizes."""

import json
import os
import re
import subprocess
import sys

import pytest

from fastdpo.bench.competitors import IMPLEMENTATIONS
from fdtest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("device", "shape", "case", "impl", "extras", "ms", "peak_gib", "loss_err", "grad_h_rel_err")


def _load(name):
    return load_script(os.path.join(ROOT, "benchmarks", f"{name}.py"))


def test_suite_covers_every_implementation_and_phase():
    suite = _load("bench_dpo")
    covered = {c.split("[")[0] for c in suite.CASES}
    assert covered == set(IMPLEMENTATIONS)
    assert {"fastdpo[torch]", "fastdpo[triton]", "fastdpo-fast[torch]", "fastdpo-fast[triton]"} <= set(suite.CASES)
    assert suite.PHASES == ("forward", "backward", "step")


def test_every_benchmark_runs_on_tiny_inputs():
    env = dict(os.environ, FASTDPO_BENCH_SIZE="tiny", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                           "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_gpu_compare_arguments(capsys):
    gc = _load("gpu_compare")
    args = gc.parse_args([])
    assert args.shapes == ["llama3-8b", "gemma2-2b", "qwen2.5-7b"] and args.cases == ["ref", "noref"]
    assert set(args.impl) == set(IMPLEMENTATIONS) | set(gc.ENGINE_ROWS) and args.dtype == "bf16"
    assert args.device == "cuda" and set(gc.ENGINE_ROWS) == {"fastdpo-fused", "fastdpo-fused-fast", "fastdpo-chunked",
                                                             "fastdpo-chunked-fast"}
    assert args.impl[-1] == "liger" and args.extras == "both"  # torch.compile's warm-up last
    for bad, name in ((["--shapes", "llama3-8b,gpt9"], "--shapes"), (["--cases", "both"], "--cases"),
                      (["--impl", "fastdpo,nope"], "--impl")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
        assert f"argument {name}:" in capsys.readouterr().err


def test_gpu_compare_flow_on_cpu_writes_markdown(tmp_path, monkeypatch, capsys):
    gc = _load("gpu_compare")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))  # gpu_compare puts benchmarks/ on it for gpu_checks
    checks = _load("gpu_checks")
    # The checks themselves are tested below; here only that gpu_compare runs them first and reports them.
    monkeypatch.setattr(checks, "CHECKS", {"determinism, empty batch": checks.check_determinism_and_empty})
    monkeypatch.setitem(sys.modules, "gpu_checks", checks)
    rc = gc.main(["--tiny", "--device", "cpu", "--shapes", "llama3-8b", "--impl", "fastdpo,fastdpo-fast,naive,cce",
                  "--repeats", "1", "--warmup", "0", "--dtype", "fp32"])
    assert rc == 0
    text = (tmp_path / "gpu_compare.md").read_text()
    assert text in capsys.readouterr().out
    for case in ("policy fwd+bwd + reference fwd", "policy fwd+bwd, no reference"):
        for asked in ("log-probs only", "log-probs + TRL's logged extras (entropy, mean logit, top-1)"):
            assert f"## llama3-8b: H=32 V=96, 2 pairs x 16, {case}; {asked}" in text
    assert "| fastdpo | " in text and "| fastdpo-fast | " in text and "| naive (logits materialized) | " in text
    assert "skipped: CCE's kernels run on CUDA only" in text
    assert "llama3-8b ref fastdpo-fast: loss err" in text and "PASS" in text and "vs TRL: not measured" in text
    assert "## Correctness checks (benchmarks/gpu_checks.py)" in text and "FAIL" not in text
    rows = json.loads((tmp_path / "gpu_compare.json").read_text())
    # Like with like: the extras pass holds only the implementations that compute them.
    assert {(r["case"], r["impl"], r["extras"]) for r in rows} == {
        (c, i, e) for c in ("ref", "noref") for i, e in
        [("fastdpo", False), ("fastdpo-fast", False), ("naive", False), ("cce", False), ("fastdpo", True),
         ("fastdpo-fast", True)]}
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["shape"] == "llama3-8b"
        if r["impl"] != "cce":
            assert r["status"] == "ok" and r["ms"] > 0 and r["loss_err"] < 1e-5 and r["grad_h_rel_err"] < 1e-5


def test_gpu_compare_needs_cuda_unless_told_otherwise(capsys):
    gc = _load("gpu_compare")
    if gc.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gc.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_checks_pass_at_tiny_size_through_the_interpreter(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_checks.py"), "--device", "cpu",
                           "--tiny"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text = (tmp_path / "gpu_checks.md").read_text()
    assert text in proc.stdout and "FAIL" not in text
    assert text.count("- **") == len(_load("gpu_checks").CHECKS)
    # Every head and dtype in lean mode, fast mode and a budget that keeps part of the vocabulary.
    for head in ("plain", "softcap+bias+scale"):
        for dtype in ("float32", "float16", "bfloat16"):
            assert f"{head} {dtype} lean: " in text and f"{head} {dtype} fast: " in text
            assert re.search(rf"{re.escape(head)} {dtype} [\d.e-]+ MiB budget: ", text)


def test_gpu_checks_catch_a_wrong_kernel(monkeypatch):
    """A kernel that drops part of the gradient must fail the checks, not pass them."""
    checks = _load("gpu_checks")
    from fastdpo import _triton_backend

    real = _triton_backend.backward

    def broken(*args, **kwargs):
        gh, gw, gb = real(*args, **kwargs)
        return gh, (gw * 0.999 if gw is not None else None), gb

    monkeypatch.setattr(_triton_backend, "backward", broken)
    ok, lines = checks.run_checks("cpu", tiny=True)
    assert not ok


def test_tune_flow_runs_through_the_interpreter(tmp_path, monkeypatch, capsys):
    tune = _load("tune")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert tune.main(["--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    for family in tune.FAMILIES:
        assert f"## {family} " in text
    assert "KernelConfig(" in text and (tmp_path / "tune.json").exists()


def test_cpu_engine_flow_at_a_tiny_shape(tmp_path, monkeypatch, capsys):
    bench = _load("cpu_engine")
    monkeypatch.setitem(bench.SHAPES, "tiny", (24, 301, 1, 16))
    out = tmp_path / "cpu_engine.json"
    assert bench.main(["--shapes", "tiny", "--rounds", "1", "--no-loaded", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["shapes"]["tiny"]
    assert set(res["time"]) == {"naive", "lean", "fast", "skipped"}
    assert len(set(round(v, 5) for v in res["loss"].values())) == 1, res["loss"]
    ratios = res["ratios"]
    lean, skipped = res["time"]["lean"]["median_s"], res["time"]["skipped"]["median_s"]
    assert ratios["fast_vs_lean_ideal"] == pytest.approx((lean - skipped) / lean)
    assert "the recompute fast mode skips" in capsys.readouterr().out


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """benchmarks/device_run.sh's whole flow on CPU at toy sizes (interpreter), without the install step."""
    out = tmp_path_factory.mktemp("device-out")
    # The checks step runs gpu_checks.py, tested on its own below: skipped here to keep CI quick.
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, FASTDPO_DEVICE_TINY="1",
               FASTDPO_DEVICE_SKIP_INSTALL="1", FASTDPO_DEVICE_SHAPES="", FASTDPO_DEVICE_SKIP_STEPS="checks",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_run.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    return out, proc


def test_device_run_flow_writes_every_result(device_run):
    out, proc = device_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[:2] for s in steps] == [["cublas", "0"], ["checks", "skipped"], ["compare-llama3-8b", "0"],
                                      ["profile", "0"], ["record", "0"]]
    cublas = json.loads((out / "cublas.json").read_text())
    assert len(cublas["products"]) == 5 and all(p["ms"] > 0 for p in cublas["products"])
    profile = json.loads((out / "profile.json").read_text())
    assert [r["impl"] for r in profile["results"]] == ["fastdpo", "fastdpo-fast", "trl"]
    assert all(r["kernels"] and r["total_us"] > 0 for r in profile["results"])
    rows = json.loads((out / "results.json").read_text())
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    ok = {(r["case"], r["impl"], r["extras"]) for r in rows if r["status"] == "ok"}
    # At toy size with a reference only (the interpreter is slow): every engine in lean and fast mode beside auto's
    # rows and the competitors, each of ours checked against the reference.
    assert {r["case"] for r in rows} == {"ref"}
    for impl in ("fastdpo", "fastdpo-fast", "fastdpo-fused", "fastdpo-fused-fast", "fastdpo-chunked",
                 "fastdpo-chunked-fast", "trl"):
        assert ("ref", impl, False) in ok and ("ref", impl, True) in ok
    assert ("ref", "naive", False) in ok and ("ref", "naive", True) not in ok
    assert all(r["loss_err"] < 1e-5 and r["grad_h_rel_err"] < 1e-5 for r in rows
               if r["impl"].startswith("fastdpo") and r["status"] == "ok")
    md = (out / "RESULTS-run.md").read_text()
    assert "| ref | yes | fastdpo-fast |" in md and "\n### Targets\n" in md
    assert "| ref | no | fastdpo-chunked-fast |" in md and "ref fastdpo-fused-fast: exactness MET" in md
    # On CPU nothing is tuned: the report says the default config ran.
    assert "### Autotuning chosen (fused kernels)" in md and "the default config" in md


def test_record_results_names_the_card(device_run, tmp_path):
    out, _ = device_run
    rec = _load("record_results")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    assert rec.main(["--from", str(out), "--record", "--results-dir", str(tmp_path / "results"),
                     "--results-md", str(md)]) == 0
    (path,) = (tmp_path / "results").iterdir()
    rows = json.loads(path.read_text())
    assert path.name == f"{rec.card_slug(rows[0]['device'])}-{rows[0]['date'][:10]}.json"
    assert rec.card_slug("NVIDIA H100 80GB HBM3 (torch 2.11.0)") == "nvidia-h100-80gb-hbm3"
    text = md.read_text()
    assert text.startswith("# Results\n") and "## GPU run: " in text and "| ref | no | fastdpo |" in text


def test_device_run_out_of_budget_still_records(tmp_path):
    """A run whose budget is spent skips the remaining steps, and says so, instead of overrunning."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, FASTDPO_DEVICE_TINY="1",
               FASTDPO_DEVICE_SKIP_INSTALL="1", FASTDPO_DEVICE_BUDGET_S="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_run.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines())
    assert steps["cublas"] == "skipped" and steps["compare-llama3-8b"] == "skipped" and "record" in steps


def test_install_wheels_shim_imports_the_checkout(tmp_path):
    """Without an editable install, the shim laid out as an install imports fastdpo.kernels from this checkout."""
    iw = _load("install_wheels")
    shim = iw.make_shim(tmp_path / "shim")
    where = iw.fastdpo_location(dict(os.environ, PYTHONPATH=str(shim)))
    assert where is not None and where.splitlines()[1].startswith(str(shim))


def test_install_wheels_picks_one_fitting_wheel_per_project(tmp_path):
    """In a subprocess: pip's tag code imports the stdlib distutils, which would upset a later torch.compile here."""
    for name in ("trl-1.16.0-py3-none-any.whl", "trl-1.15.0-py3-none-any.whl",
                 "cut_cross_entropy-25.1.1-py3-none-any.whl", "liger_kernel-0.8.5-cp99-cp99-win_amd64.whl"):
        (tmp_path / name).write_bytes(b"")
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import install_wheels as iw; "
            "print(sorted(p.name for p in iw.pick(pathlib.Path(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benchmarks"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    picked = eval(out.stdout.strip())  # noqa: S307 - the list this test's own subprocess printed
    assert len(picked) == 2 and "cut_cross_entropy-25.1.1-py3-none-any.whl" in picked
    assert any(p.startswith("trl-") for p in picked)
