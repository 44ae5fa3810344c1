"""Shared fixtures: tiny configs, a free port, and the SLURM marker's skip/fail rule."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slurm_available() -> tuple[bool, str]:
    if not shutil.which("sinfo"):
        return False, "sinfo is not on PATH (start it with: bash slurm/testcluster.sh start)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"sinfo failed: {e}"
    if r.returncode != 0:
        return False, f"no SLURM cluster answers ({r.stderr.strip()[:120]}); start one: bash slurm/testcluster.sh start"
    return True, ""


def scontrol_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


_SLURM: tuple[bool, str] | None = None


def pytest_runtest_setup(item):
    """Tests marked `slurm` skip (with the reason) without a cluster; under CI=true they fail instead."""
    global _SLURM
    if "slurm" not in item.keywords:
        return
    if _SLURM is None:
        _SLURM = slurm_available()
    ok, why = _SLURM
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no SLURM cluster: {why}")
    pytest.skip(f"no SLURM cluster: {why}")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A TrainConfig that trains a ResNet-20 on 200 builtin 16 px images in a few seconds."""
    from hpcviz.config import TrainConfig

    def make(**kw):
        base = dict(data="builtin:20", image_size=16, arch="resnet20", epochs=2, batch_size=32, lr=0.05,
                    eval_batch_size=64, run_dir=str(tmp_path / "run"), device="cpu", log_every=1000)
        base.update(kw)
        return TrainConfig(**base)
    return make
