"""The ``fastdpo`` command line: parsing, errors, and what ``bench`` and ``profile`` write, at tiny sizes."""

import csv
import json
import os

import pytest
import torch

from fastdpo.bench import cli, profiling, run
from fastdpo.bench.competitors import make_inputs
from fastdpo.bench.memory import PeakMeter
from fastdpo.reference import reference_dpo_loss

TINY_BENCH = ["bench", "--hidden", "16", "--vocab", "40", "--pairs", "1", "--seq-len", "8", "--repeats", "1",
              "--warmup", "0", "--no-progress", "--device", "cpu"]


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_parser_reads_bench_options():
    args = cli.build_parser().parse_args(["bench", "--shape", "gemma2-2b", "--pairs", "2", "--seq-len", "64",
                                          "--dtype", "bf16", "--no-ref", "--impl", "fastdpo,trl", "--out", "x"])
    assert (args.shape, args.pairs, args.seq_len, args.dtype, args.no_ref, args.impl, args.out) == \
        ("gemma2-2b", 2, 64, "bf16", True, ("fastdpo", "trl"), "x")


def test_cpu_named_shape_keeps_head_and_shrinks_batch():
    cfg = run.resolve_config("llama3-8b", device="cpu")
    assert (cfg.hidden, cfg.vocab, cfg.pairs, cfg.seq_len) == (4096, 128256, run.CPU_NAMED_PAIRS,
                                                                run.CPU_NAMED_SEQ)
    assert "on CPU" in cfg.note
    cfg = run.resolve_config(device="cpu", hidden=64, pairs=3)
    assert (cfg.shape, cfg.hidden, cfg.pairs, cfg.dtype) == ("cpu-small (custom)", 64, 3, "fp32")


@pytest.mark.parametrize("argv, names", [
    (["bench", "--shape", "llama9"], "--shape"),
    (["bench", "--hidden", "0"], "--hidden"),
    (["bench", "--pairs", "two"], "--pairs"),
    (["bench", "--dtype", "fp8"], "--dtype"),
    (["bench", "--impl", "fastdpo,megakernel"], "--impl"),
    (["profile", "--budget", "-1"], "--budget"),
    (["profile", "--layers", "0"], "--layers"),
])
def test_bad_arguments_name_the_argument(capsys, argv, names):
    assert names in _error(capsys, argv)


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    assert "unknown model 'gpt5'" in _error(capsys, ["profile", "--model", "gpt5"])
    assert "cannot read" in _error(capsys, ["profile", "--model", str(tmp_path / "missing.json")])
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert "model_type" in _error(capsys, ["profile", "--model", str(bad)])


def test_unwritable_out_dir_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _error(capsys, TINY_BENCH + ["--out", str(blocker / "sub")])
    assert "--out" in err and "cannot write" in err
    err = _error(capsys, TINY_BENCH + ["--out", str(blocker)])
    assert "not a folder" in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bench_writes_table_csv_json_and_chart(capsys, tmp_path):
    out = tmp_path / "bench"
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo,naive,trl,cce", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("fastdpo", "naive (logits materialized)", "TRL ChunkedLogProbFunction"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "skipped: CCE's kernels run on CUDA only" in text
    assert "memory: fastdpo peaks" in text and f"chart: {out / 'bench.png'}" in text
    assert (out / "bench.png").stat().st_size > 0
    with open(out / "results.csv") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert [rows[k]["status"] for k in ("fastdpo", "naive", "trl", "cce")] == ["ok", "ok", "ok", "skipped"]
    # fp32 against the fp64 truth: the figures are real errors, and small.
    assert float(rows["fastdpo"]["loss_abs_err"]) < 1e-5
    assert float(rows["fastdpo"]["grad_hidden_rel_err"]) < 1e-4
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["with_ref"] is True and report["valid_tokens"] == 2 * (8 - 2)
    assert all(r["ms_median"] > 0 for r in report["rows"] if r["status"] == "ok")


def test_bench_default_out_dir_is_fresh_and_named(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref"]) == 0
    made = [p for p in os.listdir(tmp_path) if p.startswith("fastdpo-out-bench-")]
    assert len(made) == 1 and os.path.exists(tmp_path / made[0] / "results.csv")
    assert made[0] in capsys.readouterr().out
    assert run.prepare_out_dir(None, "bench") != made[0]


def test_peak_meter_sees_a_cpu_tensor():
    with PeakMeter("cpu") as meter:
        x = torch.ones(64 << 20, dtype=torch.uint8)
        del x
    if meter.peak_bytes is None:
        pytest.skip(meter.method)
    assert 60 << 20 <= meter.peak_bytes < 100 << 20, meter.method


def test_exact_reference_matches_the_whole_batch_reference():
    inp = make_inputs(2, 7, 12, 30, dtype=torch.float64, with_ref=True)
    truth = run.exact_reference(inp, torch.float64)
    out = reference_dpo_loss(inp.hidden, inp.weight, inp.labels, ref_hidden=inp.ref_hidden,
                             ref_weight=inp.ref_weight, beta=inp.beta)
    out.loss.backward()
    assert truth["loss"] == pytest.approx(float(out.loss.detach()), rel=1e-12)
    torch.testing.assert_close(truth["grad_hidden"], inp.hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(truth["grad_weight"], inp.weight.grad, rtol=1e-10, atol=1e-12)


def _tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 3000,
                                "num_hidden_layers": 3}))
    return str(path)


def test_profile_writes_report_timeline_and_search(capsys, tmp_path):
    out = tmp_path / "prof"
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "16", "--budget", "4",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "attention: sdpa" in text and "1 layers" in text
    for line in ("weights + optimizer", "activations (peak)", "loss step (peak)", "total peak"):
        assert line in text
    assert "largest batch within 4 GiB" in text and f"chart: {out / 'timeline.png'}" in text
    data = json.loads((out / "profile.json").read_text())
    heads = {s["head"] for s in data["steps"]}
    assert heads == {"naive", "fastdpo"}
    assert all(s["total_peak"] >= s["weights_optimizer"] for s in data["steps"])
    assert data["largest"]["fastdpo"]["pairs"] >= 1
    assert (out / "timeline.png").stat().st_size > 0


def test_profile_budget_nothing_fits(capsys, tmp_path):
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--budget", "0.0001",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "p")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--budget 0.0001 GiB: nothing fits" in err


def test_named_models_build_their_family():
    for name, family in (("llama3", "llama"), ("qwen2.5", "qwen2"), ("gemma2", "gemma2")):
        cfg = profiling.build_model_config(name, layers=3, cpu=True)
        assert cfg["model_type"] == family and cfg["num_hidden_layers"] == 3
        assert cfg["vocab_size"] == profiling.MODELS[name]["vocab_size"] and cfg["hidden_size"] == 256
    assert profiling.build_model_config("gemma2")["final_logit_softcapping"] == 30.0


def test_cuda_timeline_from_a_snapshot_trace():
    snap = {"device_traces": [[
        {"action": "alloc", "size": 100, "time_us": 1_000_000},
        {"action": "segment_alloc", "size": 4096, "time_us": 1_000_001},
        {"action": "alloc", "size": 50, "time_us": 1_500_000},
        {"action": "free_requested", "size": 100, "time_us": 1_600_000},
        {"action": "free_completed", "size": 100, "time_us": 2_000_000},
    ]]}
    tl = profiling.cuda_timeline(snap, baseline=10)
    assert tl["bytes"] == [110, 160, 60]
    assert tl["t"] == [0.0, 0.5, 1.0]
