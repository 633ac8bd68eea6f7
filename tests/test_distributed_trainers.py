"""FastDPOTrainer and patch_trl() launched by ``accelerate launch`` on 2 CPU processes (DDP and FSDP2) log the same
losses and metrics as one process on the same global batch.

``tests/workers/dist_trainer.py`` trains a tiny Llama for 3 steps with each trainer; its dataset is exactly one
global batch (4 pairs), so every step sees the same pairs whatever the split. Each rank's loss is the mean over its
2 pairs; the wrappers average the gradients and the trainer averages the logged losses over ranks: the one-process
mean.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")

SCRIPT = Path(__file__).parent / "workers" / "dist_trainer.py"
GLOBAL_BATCH = 4

# The accelerate config of the FSDP2 run: the lines the README gives.
FSDP2_CONFIG = """\
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, launcher_args, batch, mode=()):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, *launcher_args, str(SCRIPT), str(out), str(batch), *mode]
    # The launcher alone sets up accelerate: an ACCELERATE_* variable left in this process (transformers'
    # TrainingArguments(fsdp=...) before 5.0 exports ACCELERATE_USE_FSDP=true) would turn a plain run into FSDP.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("one"), "one", [], GLOBAL_BATCH)


def accelerate(*args):
    return ["-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]


def assert_same_logs(distributed, single):
    for trainer in ("fast", "patched"):
        runs, ref = distributed[trainer], single[trainer]
        assert len(runs) == len(ref) == 3
        for step, (a, b) in enumerate(zip(runs, ref)):
            for name in b:  # fp32 on both sides; the ranks pad their halves of the batch to different lengths
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), f"{trainer}, step {step}: {name}"
        assert ref[-1]["loss"] < 0.8 * ref[0]["loss"], "training should move the loss"


def test_ddp_find_unused_parameters(one_process, tmp_path):
    """DDP with find_unused_parameters=True trains without "Expected to mark a variable ready only once"."""
    logs = launch(tmp_path, "ddp", accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                              "--mixed_precision", "no", "--dynamo_backend", "no"),
                  GLOBAL_BATCH // 2, ["ddp_find_unused"])
    assert logs["num_processes"] == 2 and logs["wrapper"] == "DistributedDataParallel"
    assert logs["find_unused_parameters"] is True
    assert_same_logs(logs, one_process)


def test_fsdp2(one_process, tmp_path):
    """FSDP2 as accelerate wraps it (per-layer units, tail unit [norm, lm-head], root); the head is sharded."""
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    logs = launch(tmp_path, "fsdp2", accelerate("--config_file", str(config)), GLOBAL_BATCH // 2, ["fsdp_on_cpu"])
    assert logs["num_processes"] == 2 and logs["wrapper"].startswith("FSDP")
    assert logs["head_weight"] == "DTensor" and logs["head_is_fsdp_unit"]
    assert_same_logs(logs, one_process)


def test_ddp_moe_router_loss(tmp_path):
    """An MoE model (Qwen3-MoE, router loss on) under DDP: FastDPOTrainer takes the router logits from the same
    wrapped forward that computes the head's statistics, and logs the same losses, ``aux_loss`` and metrics, and
    ends with the same weights, as stock TRL and patched TRL in the same 2-process launch. The load-balancing loss
    is computed per rank (in stock TRL too), so it is not compared with one process."""
    logs = launch(tmp_path, "ddp_moe", accelerate("--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                  "--mixed_precision", "no", "--dynamo_backend", "no"),
                  GLOBAL_BATCH // 2, ["moe"])
    assert logs["num_processes"] == 2 and logs["wrapper"] == "DistributedDataParallel"
    stock = logs["stock"]
    assert len(stock) == 3 and all(entry["aux_loss"] > 0 for entry in stock)
    assert stock[-1]["loss"] < 0.8 * stock[0]["loss"], "training should move the loss"
    for trainer in ("fast", "patched"):
        assert len(logs[trainer]) == 3
        for step, (a, b) in enumerate(zip(logs[trainer], stock)):
            assert a.keys() == b.keys()
            for name in b:
                assert a[name] == pytest.approx(b[name], rel=2e-4, abs=2e-5), f"{trainer}, step {step}: {name}"
        ours, theirs = logs["params"][trainer], logs["params"]["stock"]
        assert ours.keys() == theirs.keys() and ours
        for name in theirs:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-5), f"{trainer}: {name}"
