"""The benchmarks run: every pytest-benchmark case at tiny size, and gpu_compare.py's flow on CPU at toy sizes."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fastdpo.bench.competitors import IMPLEMENTATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_covers_every_implementation_and_phase():
    suite = _load("bench_dpo")
    covered = {c.split("[")[0] for c in suite.CASES}
    assert covered == set(IMPLEMENTATIONS)
    assert {"fastdpo[torch]", "fastdpo[triton]"} <= set(suite.CASES)
    assert suite.PHASES == ("forward", "backward", "step")


def test_every_benchmark_runs_on_tiny_inputs():
    env = dict(os.environ, FASTDPO_BENCH_SIZE="tiny", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                           "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_gpu_compare_arguments():
    gc = _load("gpu_compare")
    args = gc.parse_args([])
    assert args.shapes == ["llama3-8b", "gemma2-2b", "qwen2.5-7b"] and args.cases == ["ref", "noref"]
    assert args.impl == IMPLEMENTATIONS and args.dtype == "bf16" and args.device == "cuda"
    for bad, name in ((["--shapes", "llama3-8b,gpt9"], "--shapes"), (["--cases", "both"], "--cases"),
                      (["--impl", "fastdpo,nope"], "--impl")):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_gpu_compare_flow_on_cpu_writes_markdown(tmp_path, monkeypatch, capsys):
    gc = _load("gpu_compare")
    monkeypatch.setenv("OUT", str(tmp_path))
    rc = gc.main(["--tiny", "--device", "cpu", "--shapes", "llama3-8b", "--impl", "fastdpo,naive,cce",
                  "--repeats", "1", "--warmup", "0", "--dtype", "fp32"])
    assert rc == 0
    text = (tmp_path / "gpu_compare.md").read_text()
    assert text in capsys.readouterr().out
    assert "## llama3-8b: H=32 V=96, 2 pairs x 16, policy fwd+bwd + reference fwd" in text
    assert "## llama3-8b: H=32 V=96, 2 pairs x 16, policy fwd+bwd, no reference" in text
    assert "| fastdpo | " in text and "| naive (logits materialized) | " in text
    assert "skipped: CCE's kernels run on CUDA only" in text
    assert "llama3-8b ref: loss err" in text and "PASS" in text and "time vs TRL: not measured" in text
    assert (tmp_path / "gpu_compare.json").exists()
    assert "## Correctness checks (benchmarks/gpu_checks.py)" in text and "FAIL" not in text


def test_gpu_compare_needs_cuda_unless_told_otherwise(capsys):
    gc = _load("gpu_compare")
    if gc.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gc.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_checks_pass_at_tiny_size_through_the_interpreter():
    checks = _load("gpu_checks")
    ok, lines = checks.run_checks("cpu", tiny=True)
    assert ok, "\n".join(lines)
    assert sum(line.startswith("- **") for line in lines) == len(checks.CHECKS)


def test_gpu_checks_catch_a_wrong_kernel(monkeypatch):
    """A kernel that drops part of the gradient must fail the checks, not pass them."""
    checks = _load("gpu_checks")
    from fastdpo import _triton_path

    real = _triton_path.backward

    def broken(*args, **kwargs):
        gh, gw, gb = real(*args, **kwargs)
        return gh, (gw * 0.999 if gw is not None else None), gb

    monkeypatch.setattr(_triton_path, "backward", broken)
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
