"""The ``fastdpo`` command line: parsing, errors, and what ``bench`` and ``profile`` write, at tiny sizes."""

import csv
import dataclasses
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
    assert run.check_out_dir(None, "bench") != made[0]


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
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    # Each long phase says what runs, one line each, as it starts.
    progress = captured.err.splitlines()
    assert progress[0].startswith("fastdpo profile: building the policy and its frozen reference (1 layers")
    assert any(line.endswith("naive head, 1 pair(s) x 16 tokens: warm-up step (AdamW creates its state)")
               for line in progress)
    assert sum(line.endswith(": measured step") for line in progress) >= 2
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
    # Every measured step stays under the estimate of its size.
    cfg = profiling.ProfileConfig(**data["config"])
    for s in data["steps"]:
        assert s["total_peak"] <= profiling.estimate_memory(cfg, s["pairs"])["peak"], s


def test_profile_budget_nothing_fits(capsys, tmp_path, monkeypatch):
    # Refused from the estimate, before any model is built or any folder made.
    monkeypatch.setattr(profiling, "run_profile", _must_not_run)
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--budget", "0.0001",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "p")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--budget 0.0001 GiB: nothing fits" in err and "AdamW state alone need about" in err
    assert not (tmp_path / "p").exists()


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


# --- the command line never destroys, never hangs, never overstates -------------------------------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("the run started although it should have been refused")


def test_non_empty_out_folder_is_refused_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    (out / "notes.txt").write_text("mine")
    err = _error(capsys, TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out)])
    assert "--out" in err and "not empty" in err and "--overwrite" in err
    assert (out / "results.csv").read_text() == "precious"
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out), "--overwrite"]) == 0
    assert (out / "results.csv").read_text().startswith("key,")
    assert (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(empty)]) == 0
    assert (empty / "results.json").exists()


def test_impossible_bench_size_is_refused_before_anything(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "never"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastdpo", "bench", "--device", "cpu", "--hidden", "100000",
                           "--vocab", "2000000000", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "needs about" in proc.stderr and "TiB" in proc.stderr and "available" in proc.stderr
    assert not out.exists()
    assert time.perf_counter() - start < 60


def test_bench_refuses_what_the_machine_cannot_hold(capsys, tmp_path, monkeypatch):
    from fastdpo.bench import memory

    small = memory.DeviceMemory(available=3 << 20, total=4 << 20, name="a 4 MiB test machine")
    monkeypatch.setattr(memory, "device_memory", lambda device: small)
    monkeypatch.setattr(run, "run_bench", _must_not_run)
    out = tmp_path / "never"
    assert cli.main(["bench", "--device", "cpu", "--hidden", "64", "--vocab", "5000", "--pairs", "2",
                     "--seq-len", "64", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a 4 MiB test machine has 3.0 MiB available of 4.0 MiB" in err and "needs about" in err
    assert not out.exists()


def test_bench_memory_estimate_covers_the_inputs_and_scales():
    cfg = run.resolve_config(device="cpu", hidden=24, vocab=301, pairs=3, seq_len=17, impls=("fastdpo", "naive"))
    (needed, parts), = run.estimate_memory(cfg).values()
    inp = make_inputs(3, 17, 24, 301, dtype=torch.float32, with_ref=True)
    assert parts["inputs"] == inp.input_bytes()
    step, = (v for k, v in parts.items() if k.endswith(" step"))
    assert step >= 6 * 2 * 3 * 17 * 301 * 4  # at least the naive head's logits
    assert needed >= parts["inputs"] + step
    bigger = run.resolve_config(device="cpu", hidden=24, vocab=3010, pairs=3, seq_len=17, impls=("fastdpo", "naive"))
    assert run.estimate_memory(bigger)["cpu"][0] > needed
    from fastdpo.bench.memory import USABLE_FRACTION

    roomy = memory_for(int(needed / USABLE_FRACTION) + 1)
    run.check_memory(cfg, memory={"cpu": roomy})
    # Just enough by the estimate is refused: the host keeps headroom for the estimate's margin and other processes.
    with pytest.raises(ValueError, match="needs about .* headroom"):
        run.check_memory(cfg, memory={"cpu": memory_for(needed + 1)})


def memory_for(available):
    from fastdpo.bench.memory import DeviceMemory

    return DeviceMemory(available=available, total=available, name="test machine")


def test_device_memory_reads_this_machine():
    from fastdpo.bench.memory import device_memory

    mem = device_memory("cpu")
    if mem.total is None:
        pytest.skip("this platform does not say how much memory it has")
    assert 0 < mem.available <= mem.total


def test_failed_run_leaves_no_folder(capsys, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the run broke")

    out = tmp_path / "a" / "b"
    monkeypatch.setattr(run, "run_bench", boom)
    with pytest.raises(RuntimeError, match="the run broke"):
        cli.main(TINY_BENCH + ["--out", str(out)])
    assert not (tmp_path / "a").exists()

    def over_budget(*args, **kwargs):
        raise profiling.BudgetError("--budget 1 GiB: nothing fits")

    monkeypatch.setattr(profiling, "run_profile", over_budget)
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "nothing fits" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_failed_write_removes_the_folder_it_made(capsys, tmp_path, monkeypatch):
    def disk_full(report, folder):
        with open(os.path.join(folder, "results.csv"), "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_outputs", disk_full)
    out = tmp_path / "new" / "bench"
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot write the results" in err and "No space left on device" in err
    assert not (tmp_path / "new").exists()


def test_profile_config_json_honours_layers(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
                                "num_hidden_layers": 6, "layer_types": ["full_attention"] * 6}))
    cfg = profiling.resolve_config(str(path), device="cpu", search=False)
    assert cfg.layers == profiling.DEFAULT_LAYERS == 2
    assert cfg.model_config["num_hidden_layers"] == 2 and len(cfg.model_config["layer_types"]) == 2
    one = profiling.resolve_config(str(path), layers=1, device="cpu", search=False)
    assert one.layers == 1 and one.model_config["layer_types"] == ["full_attention"]
    # transformers accepts the cut config, and the estimate counts the layers asked for.
    p1, p2 = (profiling.estimate_memory(c)["params"] for c in (one, cfg))
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 2 * 16 + 32 + 3 * 32 * 64 + 2 * 32  # q,o k,v biases(q,k,v) mlp norms
    assert p2 - p1 == per_layer
    nested = {"model_type": "llava", "text_config": {"model_type": "llama", "num_hidden_layers": 40,
                                                      "layer_types": ["full_attention"] * 40}}
    nested_path = tmp_path / "nested.json"
    nested_path.write_text(json.dumps(nested))
    built = profiling.build_model_config(str(nested_path), layers=3)
    assert built["text_config"]["num_hidden_layers"] == 3 and len(built["text_config"]["layer_types"]) == 3


def test_profile_refuses_a_model_too_big_before_building_it(capsys, tmp_path, monkeypatch):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248,
                                "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 10_000_000,
                                "num_hidden_layers": 126}))
    monkeypatch.setattr(profiling, "run_profile", _must_not_run)
    out = tmp_path / "never"
    assert cli.main(["profile", "--model", str(path), "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "TiB" in err and "available" in err and "--layers" in err
    assert not out.exists()


def test_profile_budget_above_the_machine_is_refused_on_cpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "run_profile", _must_not_run)
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--device", "cpu",
            "--budget", "1000000", "--no-progress", "--out", str(tmp_path / "p")]
    assert cli.main(argv) == 2
    assert "--budget 1e+06 GiB is more than" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("ours, theirs, expected", [
    (0, int(2.5 * 2 ** 20), "2.5 MiB saved"),
    (40 << 10, 100 << 10, "no measurable difference at this size"),
    (100 << 20, 250 << 20, "150.0 MiB saved (2.5x less)"),
    (300 << 20, 200 << 20, "100.0 MiB more (1.5x)"),
    (200 << 20, 204 << 20, "no measurable difference at this size"),
    (None, 1 << 20, "unmeasured"),
])
def test_memory_comparison_says_what_was_measured(ours, theirs, expected):
    from fastdpo.bench.memory import compare_peaks

    assert compare_peaks(ours, theirs) == expected


def test_memory_comparison_never_overstates():
    import re

    from fastdpo.bench.memory import RESOLUTION_BYTES, compare_peaks

    sizes = [0, 1, 4096, 60_000, 1 << 20, (1 << 20) + 1, 3 << 20, 50 << 20, 1 << 30, 5 << 30]
    for ours in sizes:
        for theirs in sizes:
            text = compare_peaks(ours, theirs)
            assert not re.search(r"(^|\D)0\.0 \w+ (saved|more)", text), (ours, theirs, text)
            if "saved" in text:
                assert theirs > ours
            if "more" in text:
                assert ours > theirs
            if "x" in text:
                assert min(ours, theirs) >= RESOLUTION_BYTES, (ours, theirs, text)


def test_bench_summary_of_tiny_peaks(capsys):
    report = run.BenchReport(config=run.resolve_config(device="cpu", impls=("fastdpo", "naive")), rows=[
        run.BenchRow("fastdpo", "fastdpo", "0", "ok", ms_median=1.0, peak_bytes=0),
        run.BenchRow("naive", "naive", "0", "ok", ms_median=2.0, peak_bytes=30_000)],
        machine="m", truth="t", memory_method="m", timer="t", date="d", input_bytes=0, valid_tokens=1)
    text = run.summary(report)
    assert "fastdpo peaks 0 B above the inputs, the naive reference 29.3 KiB: no measurable difference" in text
    assert "less" not in text
    assert "time: fastdpo 1.0 ms, naive 2.0 ms (0.50x naive's time)" in text  # the ratio is ours over naive's


def test_every_option_has_help():
    import argparse

    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, f"{where} {name}"
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for command, sub in action.choices.items():
                    assert helps.get(command), f"{where} {command}"
                    walk(sub, f"{where} {command}")

    walk(cli.build_parser(), "fastdpo")


def _listing(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _earlier_run(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("results.csv", "results.json", "bench.png", "notes.txt"):
        (out / name).write_bytes(f"earlier {name}".encode())
    return out, _listing(out)


def _disk_full_after(written=None):
    """A writer ``(report, path)`` that first writes part of a file (``written`` in the folder ``path``, or the
    file ``path``), then finds the disk full."""
    import errno

    def writer(report, path):
        with open(path if written is None else os.path.join(path, written), "w") as f:
            f.write("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return writer


def test_overwrite_on_a_full_disk_leaves_the_earlier_results_whole(capsys, tmp_path, monkeypatch):
    out, before = _earlier_run(tmp_path)
    monkeypatch.setattr(run, "write_chart", _disk_full_after())
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the results" in err and os.strerror(28) in err
    assert _listing(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no temporary folder left beside it


def test_overwrite_replaces_the_earlier_results_as_a_whole(capsys, tmp_path, monkeypatch):
    out, before = _earlier_run(tmp_path)
    mode = 0o750
    out.chmod(mode)
    monkeypatch.setattr(run, "write_chart", lambda report, path: False)  # this run makes no chart
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out), "--overwrite"]) == 0
    after = _listing(out)
    # The earlier run's chart is not left beside results it does not show; the user's own file stays.
    assert set(after) == {"results.csv", "results.json", "notes.txt"}
    assert after["notes.txt"] == before["notes.txt"] and after["results.csv"].startswith(b"key,")
    assert out.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    assert f"results: {out / 'results.csv'}" in capsys.readouterr().out


def test_out_folder_holding_the_working_directory_is_refused(capsys, tmp_path, monkeypatch):
    out, before = _earlier_run(tmp_path)
    monkeypatch.chdir(out)
    monkeypatch.setattr(run, "run_bench", _must_not_run)
    err = _error(capsys, TINY_BENCH + ["--out", ".", "--overwrite"])
    assert "--out" in err and "working directory" in err
    assert _listing(out) == before


@pytest.mark.parametrize("where", ["run", "write"])
def test_ctrl_c_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out, before = _earlier_run(tmp_path)
    monkeypatch.setattr(run, "run_bench" if where == "run" else "write_chart", interrupt)
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == ["fastdpo bench: interrupted; nothing was written"]
    assert _listing(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    # A new folder (and the parents made for it) does not appear either.
    fresh = tmp_path / "a" / "b"
    monkeypatch.setattr(profiling, "run_profile", interrupt)
    assert cli.main(["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--device",
                     "cpu", "--no-progress", "--no-search", "--out", str(fresh)]) == 130
    assert capsys.readouterr().err.strip() == "fastdpo profile: interrupted; nothing was written"
    assert not (tmp_path / "a").exists()


def test_profile_full_disk_leaves_the_earlier_results_whole(capsys, tmp_path, monkeypatch):
    out = tmp_path / "prof"
    out.mkdir()
    for name in ("profile.json", "timeline.png"):
        (out / name).write_text(f"earlier {name}")
    before = _listing(out)
    monkeypatch.setattr(profiling, "write_outputs", _disk_full_after("profile.json"))
    argv = ["profile", "--model", _tiny_config(tmp_path), "--layers", "1", "--seq-len", "8", "--device", "cpu",
            "--no-progress", "--no-search", "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 1
    assert "cannot write the results" in capsys.readouterr().err
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "prof"]


@pytest.mark.parametrize("key, value", [("vocab_size", 0), ("hidden_size", -32), ("intermediate_size", 2.5),
                                        ("num_attention_heads", "two"), ("vocab_size", True),
                                        ("text_config.vocab_size", 0)])
def test_config_sizes_must_be_positive_integers(capsys, tmp_path, monkeypatch, key, value):
    cfg = json.loads(open(_tiny_config(tmp_path)).read())
    if key.startswith("text_config."):
        cfg = {"model_type": "llava", "text_config": dict(cfg)}
    target = cfg["text_config"] if key.startswith("text_config.") else cfg
    target[key.rpartition(".")[2]] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(profiling, "run_profile", _must_not_run)
    err = _error(capsys, ["profile", "--model", str(path), "--device", "cpu", "--no-progress",
                          "--out", str(tmp_path / "never")])
    assert f'"{key}"' in err and "positive integer" in err and repr(value) in err
    assert not (tmp_path / "never").exists()


def test_model_that_cannot_pack_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "mamba.json"
    path.write_text(json.dumps({"model_type": "mamba", "hidden_size": 16, "state_size": 4, "vocab_size": 50,
                                "num_hidden_layers": 1}))
    out = tmp_path / "never"
    assert cli.main(["profile", "--model", str(path), "--padding-free", "--pairs", "1", "--seq-len", "8",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastdpo profile: error: padding_free=True")
    assert not out.exists()


def test_profile_absurd_depth_is_refused_without_building_it(capsys, tmp_path, monkeypatch):
    built = []
    real = profiling._causal_lm

    def counting(hf_config, *args, **kwargs):
        built.append(profiling.text_config(hf_config).num_hidden_layers)
        return real(hf_config, *args, **kwargs)

    monkeypatch.setattr(profiling, "_causal_lm", counting)
    monkeypatch.setattr(profiling, "run_profile", _must_not_run)
    out = tmp_path / "never"
    assert cli.main(["profile", "--model", _tiny_config(tmp_path), "--layers", "100000", "--device", "cpu",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "--layers" in err and not out.exists()
    assert built and max(built) <= 64  # counted on a few layers, not instantiated 100000 deep


def test_estimate_extrapolates_deep_models_exactly(tmp_path):
    cfg = profiling.resolve_config(_tiny_config(tmp_path), layers=150, device="cpu", search=False)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(profiling._hf_config(cfg.model_config))
    assert profiling.estimate_memory(cfg)["params"] == sum(p.numel() for p in model.parameters())


def test_profile_leaves_headroom_and_says_so(tmp_path):
    from fastdpo.bench.memory import TooBigError

    cfg = profiling.resolve_config(_tiny_config(tmp_path), layers=2, device="cpu", seq_len=32, search=False)
    peak = profiling.estimate_memory(cfg)["peak"]
    enough = int(peak / profiling.USABLE_FRACTION) + 1
    profiling.check_memory(cfg, memory=memory_for(enough))
    with pytest.raises(TooBigError) as err:
        profiling.check_memory(cfg, memory=memory_for(int(0.99 * enough)))
    text = str(err.value)
    from fastdpo.bench.memory import format_bytes

    assert f"needs about {format_bytes(peak)}, give or take {profiling.ESTIMATE_MARGIN:.0%}, (" in text
    assert f"has {format_bytes(int(0.99 * enough))} available" in text
    assert f"{profiling.USABLE_FRACTION:.0%} of it" in text and "headroom" in text


def test_estimate_counts_what_each_phase_of_the_step_holds(tmp_path):
    cfg = profiling.resolve_config(_tiny_config(tmp_path), layers=2, device="cpu", seq_len=32, search=False)
    est = profiling.estimate_memory(cfg)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(profiling._hf_config(cfg.model_config))
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    assert est["params"] == n and est["weights"] == 2 * 4 * n and est["adam"] == 2 * 4 * n and est["grads"] == 4 * n
    # AdamW's per-parameter update on CPU: sqrt of the second moment and its quotient, the largest parameter's size.
    assert est["optimizer_temp"] == 2 * 4 * max(p.numel() for p in params)
    assert est["peak"] == max(est["phases"].values())
    assert est["phases"]["optimizer"] >= est["weights"] + est["adam"] + est["grads"] + est["optimizer_temp"]
    gpu = profiling.estimate_memory(dataclasses.replace(cfg, device="cuda"))
    assert gpu["optimizer_temp"] == 4 * n  # the foreach update: one more copy of every parameter
    two = profiling.estimate_memory(cfg, pairs=2)
    assert two["loss"] == 2 * est["loss"] and two["activations"] == 2 * est["activations"]


def test_overwrite_through_a_link_replaces_the_folder_it_points_to(capsys, tmp_path):
    real, before = _earlier_run(tmp_path)
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and (real / "results.csv").read_bytes().startswith(b"key,")
    assert (real / "notes.txt").read_bytes() == before["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "results"]


def test_failure_before_the_staging_folder_removes_the_parents_made(tmp_path, monkeypatch):
    import errno
    import tempfile

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkdtemp", disk_full)
    with pytest.raises(OSError):
        run.write_out_dir(str(tmp_path / "a" / "b" / "out"), _must_not_run)
    assert list(tmp_path.iterdir()) == []


def test_output_closed_early_is_no_traceback(tmp_path, monkeypatch):
    import sys

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())  # `fastdpo bench | head -1`, the reader gone
    out = tmp_path / "out"
    assert cli.main(TINY_BENCH + ["--impl", "fastdpo", "--no-ref", "--out", str(out)]) == 141
    assert (out / "results.csv").exists()
