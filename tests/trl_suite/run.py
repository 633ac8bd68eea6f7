"""Run TRL's own trainer test files with fastdpo in place, offline, and compare with the same files run stock.

    python tests/trl_suite/run.py PATH/TO/trl/tests [--files dpo kto sft rloo grpo] [--modes patch trainer]

``PATH/TO/trl/tests`` is the ``tests`` folder of a TRL checkout, best at the tag of the installed TRL. The folder is
copied into a work folder beside offline stand-ins for the hub ids it loads (:mod:`make_hub`), and each chosen
``test_<name>_trainer.py`` runs stock and in each mode of :mod:`swap_fastdpo` (``trainer`` for the DPO file only),
vision tests left out. Exit status 1 when a test that passes stock fails with fastdpo; the tests that fail stock too
(no stand-in for their data, a test newer than the installed TRL) are counted, not judged.
``--stub-missing`` turns names that TRL's test files import from ``trl`` but the installed TRL lacks into stubs
(``None``, or ``lambda: False`` for ``is_*_available``), so that a checkout newer than the installed TRL collects.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_hub  # noqa: E402

VISION = "not vlm and not VLM and not vision and not Vision"
_IMPORT = re.compile(r"^from (trl[\w.]*) import (?:\(([^)]*)\)|([^\n(]+))\n", re.M)


def stub_missing_imports(path):
    """Rewrite ``from trl... import a, b`` in ``path`` so that names the installed TRL lacks become stubs."""
    with open(path) as f:
        text = f.read()

    def replace(m):
        body = " ".join(line.split("#")[0] for line in (m.group(2) or m.group(3)).splitlines())
        lines = [f"import {m.group(1)} as _stubbed_module"]
        for item in filter(None, (n.strip() for n in body.split(","))):
            name, _, alias = item.partition(" as ")
            default = "(lambda: False)" if name.startswith("is_") and name.endswith("_available") else "None"
            lines.append(f"{(alias or name).strip()} = getattr(_stubbed_module, {name.strip()!r}, {default})")
        return "\n".join(lines) + "\n"

    with open(path, "w") as f:
        f.write(_IMPORT.sub(replace, text))


def failing(output):
    """Node ids pytest reported as failed or in error (``-rfE`` summary lines)."""
    return {line.split(" ")[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))}


def summary(output):
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def run_file(work, name, mode, python, timeout):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               FASTDPO_SWAP=mode, PYTHONPATH=os.pathsep.join([work, HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [python, "-m", "pytest", "-p", "swap_fastdpo", "-q", "-rfE", "-p", "no:cacheprovider",
           f"tests/test_{name}_trainer.py", "-k", VISION]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    with open(os.path.join(work, f"{name}-{mode}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trl_tests", help="the tests folder of a TRL checkout")
    parser.add_argument("--files", nargs="+", default=["dpo", "kto", "sft", "rloo", "grpo"],
                        help="test_<name>_trainer.py files to run (default: dpo kto sft rloo grpo)")
    parser.add_argument("--modes", nargs="+", choices=["patch", "trainer"], default=["patch", "trainer"])
    parser.add_argument("--work", help="work folder (default: a new temporary one; the logs stay there)")
    parser.add_argument("--stub-missing", action="store_true",
                        help="stub names TRL's tests import that the installed TRL lacks")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run (default 1800)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.trl_tests):
        parser.error(f"trl_tests must be a folder, got {args.trl_tests!r}")
    work = args.work or tempfile.mkdtemp(prefix="fastdpo-trl-suite-")
    shutil.copytree(args.trl_tests, os.path.join(work, "tests"), dirs_exist_ok=True)
    if args.stub_missing:
        for root, _, files in os.walk(os.path.join(work, "tests")):
            for f in files:
                if f.endswith(".py"):
                    stub_missing_imports(os.path.join(root, f))
    for name, why in make_hub.build(work).items():
        print(f"no stand-in for {name}: {why}")
    regressions = 0
    for name in args.files:
        stock = run_file(work, name, "stock", sys.executable, args.timeout)
        print(f"test_{name}_trainer.py stock: {summary(stock)}", flush=True)
        for mode in args.modes:
            if mode == "trainer" and name != "dpo":
                continue
            out = run_file(work, name, mode, sys.executable, args.timeout)
            new = sorted(failing(out) - failing(stock))
            regressions += len(new)
            print(f"test_{name}_trainer.py {mode}: {summary(out)}; failing only with fastdpo: {len(new)}", flush=True)
            for node in new:
                print(f"  {node}")
    print(f"logs in {work}")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
