"""Install, on the GPU machine (no network), the wheels benchmarks/fetch_wheels.sh brought, then fastdpo.

Picks from ``.wheels/`` the one wheel of each project that fits this interpreter (fetch_wheels.sh brings
them for several Python versions), installs them without dependencies, brings setuptools/wheel from
``.wheels/build`` only if this Python lacks them, and installs fastdpo editable without build isolation.

    python benchmarks/install_wheels.py [--wheels .wheels]
"""

import argparse
import importlib.util
import pathlib
import subprocess
import sys

from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pick(folder: pathlib.Path) -> list:
    """The best-fitting wheel of each project in ``folder`` for this interpreter."""
    rank = {tag: i for i, tag in enumerate(sys_tags())}
    best = {}
    for path in sorted(folder.glob("*.whl")):
        name, _, _, tags = parse_wheel_filename(path.name)
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (name not in best or score < best[name][0]):
            best[name] = (score, path)
    return [str(path) for _, path in best.values()]


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args], check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", default=str(ROOT / ".wheels"))
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.wheels)
    if not all(importlib.util.find_spec(m) for m in ("setuptools", "wheel")):
        pip(*pick(folder / "build"))
    wheels = pick(folder)
    if not wheels:
        print(f"install_wheels.py: no wheel in {folder} fits this Python; run benchmarks/fetch_wheels.sh",
              file=sys.stderr)
        return 1
    pip(*wheels)
    pip("--no-build-isolation", "-e", str(ROOT))
    print(f"installed {len(wheels)} wheels and fastdpo (editable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
