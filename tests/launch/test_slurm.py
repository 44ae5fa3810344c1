"""Integration tests on the real single-node SLURM cluster (slurm/testcluster.sh), through submitit's
SLURM executor: a 2-task gloo DDP job, preemption by `scontrol requeue`, the time-limit requeue path,
a failing job, and a --wait that survives a broken sacct. Marked `slurm`: skipped without a cluster,
failed under CI=true."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpcviz.rundir import RunDir
from hpcviz.scheduler import JobFailed, wait_for_job
from hpcviz.train import checkpoint

from conftest import ROOT, scontrol_field, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DDP = ["--cluster", "slurm", "--nproc", "2", "--cpus-per-task", "1", "--device", "cpu", "--arch", "resnet20",
       "--image-size", "16", "--batch-size", "32", "--eval-batch-size", "64", "--lr", "0.05"]


def launch(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def submit(run: Path, *args) -> str:
    r = launch(*DDP, "--run", str(run), *args, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    assert f"tail -f {run}/logs/" in r.stdout
    return m.group(1)


def finish(run: Path, job_id: str, timeout_s: float = 480) -> list[dict]:
    try:
        return wait_for_job(job_id, run / "logs", ntasks=2, timeout_s=timeout_s, poll_s=1.0)
    except JobFailed as e:  # what the controller saw of the job: its requeues and how each run ended
        ctld = Path(os.environ.get("HPCVIZ_SLURM_DIR", "/tmp/hpcviz-slurm")) / "log" / "slurmctld.log"
        seen = [line for line in (ctld.read_text(errors="replace").splitlines() if ctld.exists() else [])
                if re.search(rf"JobId={job_id}\b", line)]
        runs = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "JobID,State,ExitCode,Start,End"],
                              capture_output=True, text=True).stdout
        raise AssertionError(f"{e}\n--- slurmctld on job {job_id}:\n" + "\n".join(seen[-40:]) +
                             f"\n--- sacct --duplicates:\n{runs}") from None


def test_two_task_ddp_job(tmp_path):
    run = tmp_path / "ddp"
    job_id = submit(run, "--data", "builtin:20", "--epochs", "2")
    results = finish(run, job_id)
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == [1, 2]
    assert json.loads((run / "eval.json").read_text())["n"] == 20
    assert checkpoint.load_checkpoint(run / "checkpoints")["world_size"] == 2
    manifest = json.loads((run / "manifest.json").read_text())["train"]
    assert manifest["job_id"] == job_id and manifest["status"] == "done" and manifest["cluster"] == "slurm"
    log = (run / "logs" / f"{job_id}_0_log.err").read_text()
    assert "epoch 2/2" in log and "done: val accuracy" in log
    assert "epoch" not in (run / "logs" / f"{job_id}_1_log.err").read_text()  # only rank 0 talks


def test_preempted_job_resumes_bit_exactly(tmp_path):
    args = ["--data", "builtin:40", "--epochs", "8", "--checkpoint-every", "3"]
    ref_id = submit(tmp_path / "ref", *args)
    run = tmp_path / "cut"
    job_id = submit(run, *args)
    # requeue once the job has saved a checkpoint and before it is done
    wait_until(lambda: (run / "checkpoints" / "last.pt.sha256").exists(), 240, "a first checkpoint")
    assert scontrol_field(job_id, "JobState") == "RUNNING"
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    results = finish(run, job_id)
    reference = finish(tmp_path / "ref", ref_id)
    assert int(scontrol_field(job_id, "Restarts")) >= 1
    assert json.loads((run / "manifest.json").read_text())["train"]["restarts"] >= 1
    assert results[0]["weights_sha256"] == reference[0]["weights_sha256"]  # bit-identical weights
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == list(range(1, 9))
    a = checkpoint.load_checkpoint(run / "checkpoints")["model"]
    b = checkpoint.load_checkpoint(tmp_path / "ref" / "checkpoints")["model"]
    assert all(a[k].equal(b[k]) for k in a)


def test_time_limit_requeues_and_completes(tmp_path):
    profile = tmp_path / "short.ini"
    # warn 60 s before a 2-minute limit; slurmctld looks every 30 s and adds 30 s of slack, so each run
    # of the job is warned 30 to 60 s after it starts. Not sooner: a warning during start-up (12-18 s on a
    # loaded CI machine, before any handler is installed) kills the run with SIGUSR2 instead of requeueing
    # it (seen in CI with 80 s: warned 18 s after the start, the job FAILED with 140). The training must
    # outlast the first slot on a fast machine (80 epochs: ~68 s) and end within the allowed requeues on a slow one
    profile.write_text("[slurm]\nsignal_delay_s = 60\nmax_num_timeout = 30\n")
    args = ["--data", "builtin:60", "--epochs", "80", "--checkpoint-every", "5"]
    ref_id = submit(tmp_path / "ref", *args)
    run = tmp_path / "short"
    job_id = submit(run, *args, "--time", "2", "--profile", str(profile))
    results = finish(run, job_id, timeout_s=900)
    reference = finish(tmp_path / "ref", ref_id)
    assert int(scontrol_field(job_id, "Restarts")) >= 1, "training fit in one slot: make it longer"
    log = (run / "logs" / f"{job_id}_0_log.err").read_text()
    assert "stopping at epoch" in log and "SIGUSR2" in log
    assert results[0]["weights_sha256"] == reference[0]["weights_sha256"]
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == list(range(1, 81))


def test_failing_job_is_a_clear_error_not_a_hang(tmp_path):
    from PIL import Image
    empty = tmp_path / "corrupt"  # passes the launcher's checks (a class folder with a .jpg), fails in the job
    for name in ("cat", "dog"):
        (empty / name).mkdir(parents=True)
        for i in range(30):  # enough for one batch of 32, so the launcher accepts it
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(empty / name / f"{i}.png")
    (empty / "cat" / "x.jpg").write_bytes(b"not a jpeg")
    t0 = time.monotonic()
    r = launch(*DDP, "--run", str(tmp_path / "bad"), "--data", str(empty), "--wait")
    assert r.returncode == 2  # the job refused its input: bad input, one line, as if refused here
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("error: job ") and "cannot decode" in errors[0] and str(empty) in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 300


def test_wait_survives_a_broken_sacct(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sacct").write_text("#!/bin/sh\necho 'sacct: error: slurmdbd: connection refused' >&2\nexit 1\n")
    (fake / "sacct").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    r = launch(*DDP, "--run", str(tmp_path / "nosacct"), "--data", "builtin:20", "--epochs", "1", "--wait", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from squeue" in r.stderr or "from scontrol" in r.stderr
    assert "done:" in r.stdout


def test_sbatch_equivalent_runs_the_same_code(tmp_path):
    run = tmp_path / "sb"
    (run / "logs").mkdir(parents=True)
    out = subprocess.run(["sbatch", "--parsable", f"--output={run}/logs/%j_sbatch.out", "--ntasks-per-node=2",
                          "--cpus-per-task=1", "--time=10", "slurm/train.sbatch", "--run", str(run),
                          *DDP[DDP.index("--device"):], "--data", "builtin:20", "--epochs", "1"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_until(lambda: scontrol_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300,
               "the sbatch job", poll_s=1)
    assert scontrol_field(job_id, "JobState") == "COMPLETED", (run / "logs" / f"{job_id}_sbatch.out").read_text()
    assert json.loads((run / "eval.json").read_text())["n"] == 20
    assert checkpoint.load_checkpoint(run / "checkpoints")["world_size"] == 2


def test_viz_array_of_two_tasks_and_a_rerun_of_one(tmp_path):
    from hpcviz import store
    from hpcviz.config import TrainConfig
    from hpcviz.train.loop import train
    run = tmp_path / "vizrun"
    train(TrainConfig(data="builtin:20", image_size=16, arch="resnet20", epochs=1, batch_size=32, lr=0.05,
                      device="cpu", run_dir=str(run), log_every=1000))
    cmd = [sys.executable, str(ROOT / "jobs" / "launch_viz.py"), "--run", str(run), "--images", "20", "--tasks", "2",
           "--cluster", "slurm", "--cpus-per-task", "1", "--device", "cpu", "--invert-steps", "10", "--featviz-steps",
           "2", "--wait"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "20 images in 2/2 shards" in r.stdout
    manifest = json.loads((run / "manifest.json").read_text())["viz"]
    assert manifest["status"] == "done" and len(manifest["job_ids"]) == 1  # one array
    assert sorted(manifest["tasks"]) == [f"{manifest['job_ids'][0]}_0", f"{manifest['job_ids'][0]}_1"]
    first = store.read_shard(run / "viz" / "viz.h5")
    for k in (0, 1):  # each task's log: progress lines, then its timing by part
        log = (run / "logs" / f"{manifest['job_ids'][0]}_{k}_0_log.err").read_text()
        assert f"shard {k}: forward and deconvnet, images" in log and "ETA" in log, log
        assert re.search(rf"shard {k} done: 10 images in [\d.]+ s \(load [\d.]+, forward [\d.]+, topk [\d.]+, "
                         r"deconv [\d.]+, inversion [\d.]+, write [\d.]+ s\)", log), log
    # a lost shard: reported by collation, then the rerun submits only that one
    (run / "viz" / "shards" / "shard-00001.h5").unlink()
    summary = store.write_view([run / "viz" / "shards" / f"shard-0000{i}.h5" for i in (0, 1)], run / "viz" / "viz.h5")
    assert summary["n_images"] == 10 and list(summary["missing"]) == ["shards/shard-00001.h5"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 to do" in r.stderr
    again = store.read_shard(run / "viz" / "viz.h5")
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k], equal_nan=True) for k in first)


def test_pipeline_with_dependencies_a_killed_task_and_retry(tmp_path):
    """train -> array (afterok) -> aggregate (afterany) on the cluster; one array task is cancelled
    before it starts: the report names its shard, --retry-failed fills it, and the re-aggregated
    viz.h5 equals the one of a clean visualization run on the same checkpoint."""
    import shutil

    from hpcviz import store
    run = tmp_path / "pipe"
    common = ["--cluster", "slurm", "--cpus-per-task", "1", "--device", "cpu"]
    viz_args = ["--images", "12", "--tasks", "2", "--invert-steps", "10", "--featviz-steps", "2"]
    cmd = [sys.executable, str(ROOT / "jobs" / "launch_pipeline.py"), *common, "--run", str(run), "--arch", "resnet20",
           "--data", "builtin:20", "--image-size", "16", "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
           *viz_args, "--report-images", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = {k: re.search(rf"{k} (?:job|array) (\d+)", r.stdout).group(1)
           for k in ("train", "viz", "project", "featviz", "aggregate")}
    # killed while it waits for training: at once, before training can end (a task that started would leave
    # another reason than "no such file")
    subprocess.run(["scancel", f"{ids['viz']}_1"], check=True)
    # the dependencies, as the scheduler holds them: train -> viz array -> projection array -> aggregation, and
    # train -> featviz array -> aggregation
    assert scontrol_field(ids["viz"], "Dependency").startswith(f"afterok:{ids['train']}")
    assert scontrol_field(ids["featviz"], "Dependency").startswith(f"afterok:{ids['train']}")
    assert scontrol_field(ids["project"], "Dependency").startswith(f"afterany:{ids['viz']}")
    assert scontrol_field(ids["aggregate"], "Dependency").startswith(f"afterany:{ids['project']}")
    assert re.search(rf"(?<!\d){ids['featviz']}(?!\d)", scontrol_field(ids["aggregate"], "Dependency"))
    assert "--kill-on-invalid-dep=yes" in (run / "logs" / f"{ids['viz']}_submission.sh").read_text()
    # the submitted jobs hold the run: another command on it is refused, naming the job
    busy = subprocess.run([sys.executable, str(ROOT / "jobs" / "aggregate.py"), "--run", str(run)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert busy.returncode == 2 and "is in use" in busy.stderr and "slurm job" in busy.stderr, busy.stderr
    assert f"scancel {ids['train']}" in busy.stderr and not (run / "report").exists()
    wait_until(lambda: (run / "logs" / f"{ids['aggregate']}_0_result.pkl").exists(), 420, "the aggregation", 1)
    md = (run / "report" / "report.md").read_text()
    assert "1 of 2 visualization shards missing" in md, md
    assert re.search(rf"shard-00001\.h5: no such file \(array task {ids['viz']}\\?_1", md), md  # Markdown escapes _
    for name in ("training_curves", "class_accuracy", "confusion_matrix", "conv1_filters", "feature_maps_0",
                 "deconv_0", "inversions"):
        assert (run / "report" / "figures" / f"{name}.png").exists(), name
    for name in ("accuracy", "per_class_accuracy", "inversion_error", "training_parameters"):
        assert (run / "report" / "tables" / f"{name}.csv").exists() and (run / "report" / "tables" / f"{name}.md").exists()
    assert (run / "report" / "report.html").stat().st_size > 10_000
    status = subprocess.run([*cmd[:2], "--run", str(run), "--status"], capture_output=True, text=True, cwd=ROOT)
    assert re.search(r"viz\[1\].*missing", status.stdout) and re.search(r"train .*COMPLETED", status.stdout)
    r = subprocess.run([*cmd[:2], *common, "--run", str(run), "--retry-failed", "--wait"], capture_output=True,
                       text=True, cwd=ROOT, timeout=420)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "resubmitted 1 shard(s) [1]" in r.stdout
    assert "Warning" not in (run / "report" / "report.md").read_text()
    # a clean visualization run on a copy of the checkpoint, through the same kind of array
    ref = tmp_path / "ref"
    shutil.copytree(run / "checkpoints", ref / "checkpoints")
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_viz.py"), *common, "--run", str(ref), *viz_args,
                        "--wait"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = store.read_shard(run / "viz" / "viz.h5"), store.read_shard(ref / "viz" / "viz.h5")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k], equal_nan=True) for k in want)
    assert "examples/layer3.2/patch" in got  # the projections, by the second array in both
    assert store.read_attrs(run / "viz" / "viz.h5")["complete"] is True


def test_pipeline_whose_training_fails_still_reports(tmp_path):
    """afterok removes the array (--kill-on-invalid-dep), afterany still runs the aggregation."""
    run = tmp_path / "fails"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_pipeline.py"), "--cluster", "slurm",
                        "--cpus-per-task", "1", "--device", "cpu", "--run", str(run), "--arch", "resnet20",
                        "--data", "builtin:20", "--image-size", "16", "--epochs", "2", "--batch-size", "32",
                        "--lr", "1e9", "--images", "4", "--tasks", "2", "--wait"],
                       capture_output=True, text=True, cwd=ROOT, timeout=420)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "error: training failed (TrainingError: loss is not finite" in r.stderr
    # the rows say what the run holds: no shard made, a report of what there is
    assert "viz=not run" in r.stdout and "aggregate=partial" in r.stdout, r.stdout
    md = (run / "report" / "report.md").read_text()
    assert "training stage: failed: TrainingError: loss is not finite" in md
    assert "the visualization array did not run" in md
