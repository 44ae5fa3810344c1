"""The whole pipeline in the local debug mode (train -> array -> aggregate in order), its status view,
--retry-failed, and bad requests refused before anything is written. The same on the real SLURM
cluster, with dependencies, is in test_slurm.py."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcviz import store
from hpcviz.commands import pipeline as launch_pipeline
from hpcviz.config import TrainConfig, VizConfig
from hpcviz.launch.pipeline import PipelineTrainJob, check_request
from hpcviz.rundir import RunDir

from conftest import ROOT, wait_until

pytestmark = pytest.mark.slow  # whole pipelines: make test runs them, make check does not

TINY = ["--data", "builtin:20", "--image-size", "16", "--arch", "resnet20", "--epochs", "1", "--batch-size", "32",
        "--lr", "0.05", "--device", "cpu", "--images", "8", "--tasks", "2", "--invert-steps", "5",
        "--featviz-blocks", "all", "--featviz-steps", "2", "--report-images", "1", "--invert-images", "2"]


def pipeline(*args) -> int:
    try:
        return launch_pipeline.main(launch_pipeline.get_args_parser().parse_args(list(args)))
    except SystemExit as e:  # argparse's own refusals (a value of the wrong type)
        return int(e.code or 0)


def test_local_pipeline_then_status_then_retry(tmp_path, capsys):
    run = tmp_path / "p"
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY) == 0
    out = capsys.readouterr().out
    assert f"report: {run}/report/report.html" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert [manifest[s]["status"] for s in ("train", "viz", "aggregate")] == ["done", "done", "done"]
    assert manifest["pipeline"]["cluster"] == "debug"
    plan = json.loads((run / "viz" / "plan.json").read_text())  # written by the training job
    assert plan["n_images"] == 8 and len(plan["shards"]) == 2
    assert (run / "report" / "figures" / "inversions.png").exists()
    assert pipeline("--run", str(run), "--status") == 0
    table = capsys.readouterr().out
    for stage in ("train", "eval", "viz[0]", "viz[1]", "viz.h5", "project[0]", "featviz[0]", "aggregate"):
        assert stage in table
    assert sum("done (verified)" in line for line in table.splitlines() if re.search(r"│\s*viz\[", line)) == 2
    rows = [line for line in table.splitlines() if re.match(r"│\s*[^\s│]", line)]  # not a long detail's next line
    assert rows and all("done (verified)" in line for line in rows), table  # every item verified from disk
    # a lost shard: the status shows it, the report names it, --retry-failed redoes only it
    first = store.read_shard(run / "viz" / "viz.h5")
    RunDir(run).shard(1).unlink()
    assert pipeline("--run", str(run), "--status") == 0
    assert "missing" in capsys.readouterr().out
    mtime0 = RunDir(run).shard(0).stat().st_mtime_ns
    assert pipeline("--run", str(run), "--retry-failed", "--cluster", "debug") == 0
    assert RunDir(run).shard(0).stat().st_mtime_ns == mtime0  # the good shard was not redone
    again = store.read_shard(run / "viz" / "viz.h5")
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k], equal_nan=True) for k in first)
    assert "Warning" not in (run / "report" / "report.md").read_text()
    # a second run without --resume refuses; with it, finished stages are skipped
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--invert-blocks", "layer9.9"], "layer9.9"),
    (["--paths", "sideways"], "valid paths are both, residual, shortcut"),
    (["--prior", "l2"], "--prior 'l2'"),
    (["--arch", "resnet7"], "--arch 'resnet7'"),
    (["--data", "/nonexistent/images"], "/nonexistent/images"),
    (["--viz-split", "test"], "--viz-split 'test': not one of val, train"),
    (["--viz-batch-size", "0"], "--viz-batch-size 0: must be at least 1"),
    (["--indices", "3,x"], "--indices '3,x': not comma-separated integers"),
])
def test_bad_requests_are_one_line_and_write_nothing(tmp_path, capsys, bad, message):
    run = tmp_path / "bad"
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY, *bad) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


@pytest.mark.parametrize("bad, error, warning", [
    (["--lr", "1e9"], "TrainingError: loss is not finite",
     "training stage: failed: TrainingError: loss is not finite"),
    (["--indices", "5,99999"], "VizError: --indices [99999]: outside the val split of 20 images",
     "visualization stage: failed: VizError: --indices [99999]"),
])
def test_a_failing_stage_still_gets_a_report(tmp_path, capsys, bad, error, warning):
    run = tmp_path / "fails"  # local: the debug executor would open pdb on the job's exception
    assert pipeline("--cluster", "local", "--run", str(run), *TINY, *bad) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and error in errors[0], errors
    assert warning in (run / "report" / "report.html").read_text()


def test_status_and_retry_of_a_run_that_is_not_there(tmp_path, capsys):
    assert pipeline("--run", str(tmp_path / "none"), "--status") == 2
    assert pipeline("--run", str(tmp_path / "none"), "--retry-failed", "--cluster", "debug") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("no manifest.json" in line and line.startswith("error: --run") for line in err)


def test_check_request_counts_tasks_and_the_train_job_requeues_as_itself():
    cfg = TrainConfig(arch="resnet20")
    assert check_request(cfg, VizConfig(images=5, tasks=8)) == 5  # never an empty shard
    assert check_request(cfg, VizConfig(indices=[1, 2, 3], tasks=2)) == 2
    job = PipelineTrainJob(VizConfig(run_dir="r", images=3))
    again = job.checkpoint(cfg)
    assert isinstance(again.function, PipelineTrainJob) and again.function.viz_cfg.images == 3
    assert again.args[0].resume == "auto"


# ------------------------------------------------------------------------------------------ faults

def cli(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two finished pipelines of different models (seeds) on the same data."""
    base = tmp_path_factory.mktemp("faults")
    for name, seed in (("a", "0"), ("other", "1")):
        r = cli("launch_pipeline.py", "--cluster", "debug", "--run", str(base / name), *TINY, "--seed", seed)
        assert r.returncode == 0, r.stderr[-3000:]
    return base / "a", base / "other"


def test_a_copied_run_retries_itself_never_its_source(two_runs, tmp_path):
    src = two_runs[0]
    before = snapshot(src)
    copy = tmp_path / "b"
    shutil.copytree(src, copy)
    with h5py.File(copy / "viz" / "shards" / "shard-00001.h5", "r+") as f:
        del f.attrs["complete"]  # as if its writer had been killed
    r = cli("launch_pipeline.py", "--run", str(copy), "--retry-failed", "--cluster", "local")
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot(src) == before  # not one byte of the source run changed
    assert store.read_attrs(copy / "viz" / "viz.h5")["complete"] is True
    assert json.loads((copy / "viz" / "plan.json").read_text())["checkpoint"] == "checkpoints/last.pt"
    assert "Warning" not in (copy / "report" / "report.md").read_text()


def test_a_foreign_shard_is_missing_with_its_reason_everywhere(two_runs, tmp_path):
    run = tmp_path / "a"
    shutil.copytree(two_runs[0], run)
    shutil.copy(two_runs[1] / "viz" / "shards" / "shard-00001.h5", run / "viz" / "shards" / "shard-00001.h5")
    r = cli("aggregate.py", "--run", str(run))
    assert r.returncode == 1 and "error: the report lacks 1 shard(s): shard-00001.h5" in r.stderr
    plan = json.loads((run / "viz" / "plan.json").read_text())
    attrs = store.read_attrs(run / "viz" / "viz.h5")  # collated from this run's own shard only
    assert attrs["checkpoint_sha256"] == plan["checkpoint_sha256"] and attrs["n_images"] == len(plan["shards"][0])
    assert "another checkpoint" in attrs["missing_reasons"]["shards/shard-00001.h5"]
    md = (run / "report" / "report.md").read_text()
    assert "shard-00001.h5: not this plan's: made from another checkpoint" in md
    assert "## 4. Feature maps" in md  # the run's own images are still shown
    status = cli("launch_pipeline.py", "--run", str(run), "--status")
    assert re.search(r"viz\[1\].*foreign.*not this plan's", status.stdout, re.S), status.stdout
    summary = cli("inspect_results.py", str(run))
    assert "shard-00001.h5" in summary.stdout and "another checkpoint" in summary.stdout
    r = cli("launch_pipeline.py", "--run", str(run), "--retry-failed", "--cluster", "local")
    assert r.returncode == 0, r.stderr[-2000:]
    assert store.read_attrs(run / "viz" / "viz.h5")["complete"] is True


def _children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
                frontier.append(int(stat.parent.name))
    return found


def _kill_task_when(run: Path, ready, timeout: float = 120) -> None:
    """SIGKILL the tasks of the local job the run's lock names, once ready() holds."""
    wait_until(lambda: ready() and (run / ".lock").exists() and json.loads((run / ".lock").read_text() or "{}")
               .get("jobs"), timeout, "the job to get going", poll_s=0.05)
    job = int(json.loads((run / ".lock").read_text())["jobs"][-1]["id"])
    wait_until(lambda: _children(job), 60, "the job controller's task", poll_s=0.05)
    for pid in _children(job):
        os.kill(pid, signal.SIGKILL)


def test_kill_9_at_each_stage_then_rerun(tmp_path):
    run = tmp_path / "k"
    train = ["--run", str(run), "--cluster", "local", "--device", "cpu", "--data", "builtin:60", "--image-size", "16",
             "--arch", "resnet20", "--epochs", "4", "--batch-size", "32", "--lr", "0.05", "--checkpoint-minutes", "0"]
    # training: the job dies (SIGKILL) after its first checkpoint; the error says how to continue, the record failed
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "launch_train.py"), *train], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_task_when(run, lambda: (run / "checkpoints" / "last.pt.sha256").exists())
    out, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, err
    assert "ended without a result" in errors[0] and "--resume" in errors[0] and "last.pt" in errors[0]
    assert json.loads((run / "manifest.json").read_text())["train"]["status"] == "failed"
    assert not (run / ".lock").exists()
    r = cli("launch_train.py", *train, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == [1, 2, 3, 4]
    # an array task dies: named with its shard; the rerun redoes only that shard
    viz_args = ["--run", str(run), "--cluster", "local", "--device", "cpu", "--images", "8", "--tasks", "2",
                "--invert-steps", "150", "--blocks", "layer3.2", "--invert-blocks", "layer3.2", "--deconv-blocks", "none",
                "--featviz-blocks", "layer3.2", "--featviz-steps", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "launch_viz.py"), *viz_args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_task_when(run, lambda: (run / "viz" / "plan.json").exists())
    out, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "visualization task(s) failed; first: shard" in errors[0], err
    r = cli("launch_viz.py", *viz_args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"[12] to do", r.stderr) and "8 images in 2/2 shards" in r.stdout
    report = ["--report-images", "1", "--invert-images", "1"]
    # the aggregation dies (its own process, the lock holder, SIGKILLed); leftovers of an older killed writer too
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "aggregate.py"), "--run", str(run), *report], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (run / ".lock").exists(), 60, "the aggregation's lock", poll_s=0.02)
    time.sleep(1.0)
    proc.kill()
    proc.communicate()
    (run / "report.tmp-99999" / "figures").mkdir(parents=True, exist_ok=True)
    (run / "report" / "figures").mkdir(parents=True, exist_ok=True)
    (run / "report" / "figures" / "x.png.tmp-99999").write_bytes(b"half a png")
    r = cli("aggregate.py", "--run", str(run), *report)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "took over the stale lock" in r.stderr or not (run / ".lock").exists()
    assert not list(run.glob("report.*-*")) and not list((run / "report").rglob("*.tmp-*"))
    assert (run / "report" / "report.html").exists() and not (run / ".lock").exists()


def test_two_pipelines_on_one_run_the_second_is_refused_at_once(tmp_path):
    run = tmp_path / "twice"
    args = ["--cluster", "local", "--run", str(run), *TINY, "--data", "builtin:60", "--epochs", "3", "--images", "4",
            "--tasks", "1", "--invert-images", "1"]
    first = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "launch_pipeline.py"), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (run / ".lock").exists() and (run / ".lock").read_text().strip(), 60, "the first's lock",
               poll_s=0.02)
    t0 = time.monotonic()
    second = cli("launch_pipeline.py", *args)
    assert time.monotonic() - t0 < 30  # at once, not after waiting
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2 and len(errors) == 1, second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in errors[0] and f"lock file {run / '.lock'}" in errors[0]
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == [1, 2, 3]  # every epoch once
    parts = len(list((run / "viz" / "examples").glob("part-*.h5")))  # the projection parts
    featviz = len(list((run / "viz" / "featviz").glob("part-*.h5")))  # the featviz parts (one: --tasks 1)
    assert parts >= 10 and featviz == 1  # at least one per block of ResNet-20
    # one training job and no array task: a local CPU run with one worker's shards runs them, and makes its parts,
    # in the launcher (launch.array.here)
    assert len(list((run / "logs").glob("*_0_log.err"))) == 1
