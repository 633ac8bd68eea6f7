"""Packaging: ``kernels/fastdpo_kernels/`` ships as ``fastdpo.kernels`` (``kernels/`` is never a top-level ``kernels``
package: Hugging Face's ``kernels``, which transformers imports, must win even when Python runs from the repository
root) and the measuring tools as ``fastdpo.bench``, in both the wheel and the editable install; the library never
imports the tools; the ``fastdpo`` console script and ``python -m fastdpo`` both reach them."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import fastdpo.bench
import fastdpo.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_MODULES = ("__init__", "cli", "run", "competitors", "profiling", "memory")


def test_editable_install_maps_kernels_and_bench_folders():
    assert pathlib.Path(fastdpo.kernels.__file__).resolve().parent == ROOT / "kernels" / "fastdpo_kernels"
    assert pathlib.Path(fastdpo.bench.__file__).resolve().parent == ROOT / "fastdpo" / "bench"
    from fastdpo.bench import cli, competitors, memory, profiling, run  # noqa: F401
    from fastdpo.kernels import logprob_bwd, logprob_fwd  # noqa: F401


def test_kernels_folder_is_no_package():
    # A folder without __init__.py is only a namespace portion: any regular package named `kernels` beats it.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert [p.name for p in (ROOT / "kernels").glob("*.py")] == []


def test_repo_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    """From the repository root (on ``sys.path`` as ``''``), ``import kernels`` finds a regular package installed
    elsewhere, and ``fastdpo.kernels`` still imports."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'installed kernels package'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    code = ("import kernels, fastdpo.kernels.logprob_fwd as m; from kernels import CUDAProperties; "
            "print(CUDAProperties); print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert first == "installed kernels package"
    assert pathlib.Path(second).resolve().parent == ROOT / "kernels" / "fastdpo_kernels"


def test_tools_left_the_package_root():
    for name in ("bench.py", "cli.py", "competitors.py", "profiling.py", "memory.py"):
        assert not (ROOT / "fastdpo" / name).exists(), name


def test_wheel_contains_fastdpo_kernels_and_bench_and_no_top_level_kernels(tmp_path):
    # Built from a clean copy: setuptools reuses a checkout's build/ folder, whose stale files could hide a module
    # that the package list leaves out.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel, = tmp_path.glob("fastdpo-*.whl")
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    assert "fastdpo/kernels/logprob_fwd.py" in names
    assert "fastdpo/kernels/logprob_bwd.py" in names
    for module in BENCH_MODULES:
        assert f"fastdpo/bench/{module}.py" in names, module
    assert not [n for n in names if n.startswith("kernels/")]
    entry_points, = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "fastdpo = fastdpo.bench.cli:main" in zf.read(entry_points).decode()
    # Every source file ships (a subpackage missing from pyproject's package list would break `import fastdpo`).
    sources = {"fastdpo/" + p.relative_to(ROOT / "fastdpo").as_posix() for p in (ROOT / "fastdpo").rglob("*.py")}
    sources |= {"fastdpo/kernels/" + p.name for p in (ROOT / "kernels" / "fastdpo_kernels").glob("*.py")}
    assert sources - set(names) == set()
    assert "fastdpo/py.typed" in names
    # And the wheel alone imports every module, from outside the repository.
    zf.extractall(tmp_path / "site")
    site = str(tmp_path / "site")
    code = (f"import importlib, pkgutil, fastdpo; assert fastdpo.__file__.startswith({site!r}), fastdpo.__file__; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fastdpo.__path__, 'fastdpo.') "
            "if m.name != 'fastdpo.__main__']")
    env = dict(os.environ, PYTHONPATH=site)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_library_never_imports_the_tools():
    code = ("import sys, fastdpo, fastdpo.functional, fastdpo.losses, fastdpo.module, fastdpo.reference, "
            "fastdpo.integrations; import fastdpo._torch_backend, fastdpo.head; "
            "print(sorted(m for m in sys.modules if m.startswith('fastdpo.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_library_sources_do_not_mention_the_tools_package():
    for path in sorted((ROOT / "fastdpo").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        if "bench" in path.relative_to(ROOT).parts[1:-1] or path.name == "__main__.py":
            continue
        text = path.read_text()
        assert "fastdpo.bench" not in text and "from .bench" not in text and "from ..bench" not in text, path


def test_console_script_and_module_reach_the_command_line():
    for argv in ([sys.executable, "-m", "fastdpo", "--help"],
                 [str(pathlib.Path(sys.executable).with_name("fastdpo")), "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "bench" in out.stdout and "profile" in out.stdout


# The packages the floors suite pins (`make test-floors`).
FLOOR_PACKAGES = {"transformers", "trl", "peft", "accelerate", "deepspeed"}


def test_floors_suite_pins_the_floors_pyproject_claims():
    """.ci/floors.txt pins each package at exactly the lower bound that every extra of pyproject claims for it."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = Version(spec.version)
    assert set(pins) == FLOOR_PACKAGES
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    claimed = 0
    for extra, requirements in extras.items():
        for text in requirements:
            req = Requirement(text)
            if req.name.lower() in FLOOR_PACKAGES:
                floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
                # Version("5.0") == Version("5.0.0"): the pin is the claimed floor itself.
                assert floors == [pins[req.name.lower()]], f"[{extra}] {text}: .ci/floors.txt pins {pins[req.name]}"
                claimed += 1
    assert claimed >= len(FLOOR_PACKAGES)
