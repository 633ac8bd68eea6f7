"""``kernels/`` ships as ``fastdpo.kernels`` in both the wheel and the editable install, never as a
top-level ``kernels`` module (PyPI has a popular package of that name)."""

import pathlib
import subprocess
import sys
import zipfile

import fastdpo.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_folder():
    assert pathlib.Path(fastdpo.kernels.__file__).resolve().parent == ROOT / "kernels"
    from fastdpo.kernels import logprob_bwd, logprob_fwd  # noqa: F401


def test_wheel_contains_fastdpo_kernels_and_no_top_level_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel, = tmp_path.glob("fastdpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdpo/kernels/logprob_fwd.py" in names
    assert "fastdpo/kernels/logprob_bwd.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
