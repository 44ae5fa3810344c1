"""The command layer defers torch (and matplotlib) until the request is known to be good: `--help` of every jobs/*.py
and a refused option answer without importing them, fast (hpcviz.commands: one deferred stage import each)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.py"))
# run a job's main as `python jobs/X.py ARGS` does, then say which heavy modules were imported
PROBE = """
import runpy, sys
sys.argv = [{script!r}, *{args!r}]
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "matplotlib", "torchvision") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def probe(script: str, *args: str) -> subprocess.CompletedProcess:
    code = PROBE.format(script=script, args=list(args), path=str(ROOT / "jobs" / script))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", JOBS)
def test_help_imports_no_torch(script):
    r = probe(script, "--help")
    assert "usage:" in r.stdout, r.stderr[-1000:]
    assert "HEAVY=\n" in r.stderr or r.stderr.rstrip().endswith("HEAVY="), r.stderr[-500:]


@pytest.mark.parametrize("script, args", [("launch_train.py", ["--epochs", "0"]), ("launch_viz.py", ["--run", "r",
                                          "--images", "0"]), ("aggregate.py", ["--run", "r", "--channels", "0"])])
def test_a_refused_option_imports_no_torch(script, args):
    r = probe(script, *args)
    assert "error: " in r.stderr and r.stderr.rstrip().endswith("HEAVY="), r.stderr[-500:]
