"""Install, on the GPU machine (no network), the competitors' wheels benchmarks/fetch_wheels.sh brought, then fastdpo.

Each wheel of ``.wheels/`` that fits this interpreter is installed on its own, without dependencies and without
an index (a failed one is reported and skipped: a missing competitor costs a row, not the run). fastdpo is then
installed editable without build isolation (setuptools/wheel from ``.wheels/build`` where this Python lacks
them); if that fails, or the import does not resolve to this checkout, a copy of the package laid out as an
install would be (``kernels/fastdpo_kernels/`` as ``fastdpo/kernels``) is made under ``--shim`` and ``--env-file`` gets
the ``PYTHONPATH`` line that makes it importable.

    python3 benchmarks/install_wheels.py [--wheels .wheels] [--env-file FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check"]


def pick(folder: pathlib.Path) -> list:
    """The best-fitting wheel of each project in ``folder`` for this interpreter."""
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename

    rank = {tag: i for i, tag in enumerate(sys_tags())}
    best = {}
    for path in sorted(folder.glob("*.whl")):
        name, _, _, tags = parse_wheel_filename(path.name)
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (name not in best or score < best[name][0]):
            best[name] = (score, path)
    return [path for _, path in best.values()]


def _pip(*args, timeout=120) -> tuple[bool, str]:
    try:
        out = subprocess.run([*PIP, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip timed out after {timeout} s"
    return out.returncode == 0, (out.stdout + out.stderr).strip()[-600:]


def fastdpo_location(env=None) -> str | None:
    """Where ``fastdpo.kernels`` is imported from by a fresh interpreter (None if it does not import)."""
    code = "import fastdpo.kernels.logprob_fwd as m, fastdpo; print(fastdpo.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    return out.stdout.strip() if out.returncode == 0 else None


def make_shim(shim: pathlib.Path) -> pathlib.Path:
    """A copy of the package as installed: ``shim/fastdpo`` with ``kernels/fastdpo_kernels/`` as
    ``shim/fastdpo/kernels``."""
    target = shim / "fastdpo"
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fastdpo", target, ignore=ignore)
    shutil.copytree(ROOT / "kernels" / "fastdpo_kernels", target / "kernels", ignore=ignore)
    return shim


def install_fastdpo(shim: pathlib.Path, build_wheels: pathlib.Path) -> dict:
    """Editable install (no network, no build isolation), else the shim. Returns how, and the PYTHONPATH to use."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("setuptools", "wheel")):
        ok, msg = _pip(*map(str, pick(build_wheels))) if build_wheels.is_dir() else (False, "no .wheels/build")
        if not ok:
            print(f"install_wheels: setuptools/wheel not installed: {msg}", file=sys.stderr)
    ok, msg = _pip("--no-build-isolation", "-e", str(ROOT), timeout=180)
    where = fastdpo_location() if ok else None
    if where and where.startswith(str(ROOT)):
        return {"how": "editable", "pythonpath": None, "location": where}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(make_shim(shim)),
                                                                     os.environ.get("PYTHONPATH")])))
    where = fastdpo_location(env)
    return {"how": "shim" if where else "failed", "pythonpath": env["PYTHONPATH"], "location": where,
            "editable_error": None if ok else msg}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", default=str(ROOT / ".wheels"))
    parser.add_argument("--shim", default=os.path.join(tempfile.gettempdir(), "fastdpo-shim"))
    parser.add_argument("--env-file", help="write `export PYTHONPATH=...` here when the shim is needed")
    parser.add_argument("--json", help="write what was installed here")
    parser.add_argument("--skip-competitors", action="store_true")
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.wheels)
    report = {"python": sys.version.split()[0], "competitors": {}}
    if not args.skip_competitors:
        wheels = pick(folder) if folder.is_dir() else []
        if not wheels:
            print(f"install_wheels: no wheel in {folder} fits this Python; run benchmarks/fetch_wheels.sh",
                  file=sys.stderr)
        for wheel in wheels:
            ok, msg = _pip(str(wheel))
            report["competitors"][wheel.name] = "installed" if ok else f"failed: {msg}"
            print(f"{wheel.name}: {'installed' if ok else 'FAILED ' + msg}", flush=True)
    report["fastdpo"] = install_fastdpo(pathlib.Path(args.shim), folder / "build")
    print(f"fastdpo: {report['fastdpo']['how']} ({report['fastdpo']['location']})", flush=True)
    if args.env_file:
        with open(args.env_file, "w") as f:
            if report["fastdpo"]["pythonpath"]:
                f.write(f"export PYTHONPATH={report['fastdpo']['pythonpath']}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fastdpo"]["how"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
