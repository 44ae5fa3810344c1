"""hpcviz.rundir: the typed manifest and its transitions, the plan, the small files, the run's lock."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hpcviz.config import VizConfig
from hpcviz.rundir import Manifest, Plan, RunBusyError, RunDir, RunDirError


def test_metrics_and_manifest(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1})
    run.append_metrics({"epoch": 2})
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    run.update("train", job_id="7", status="submitted")
    m = run.update("train", status="done", val_accuracy=0.5)
    assert isinstance(m, Manifest) and m.train.job_id == "7" and m.train.status == "done"
    on_disk = json.loads(run.manifest_file.read_text())
    assert set(on_disk) == {"train"} and on_disk["train"]["val_accuracy"] == 0.5  # stages that never ran stay out
    with pytest.raises(AssertionError, match="no fields \\['stauts'\\]"):
        run.update("train", stauts="done")  # typed: a misspelt field is a bug, not a new key


def test_update_with_a_function_merges_under_one_lock(tmp_path):
    run = RunDir(tmp_path)
    run.update("viz", job_ids=["1"], tasks={"1_0": 0}, cluster="slurm")
    run.update("viz", lambda rec: {"job_ids": [*rec.job_ids, "2"], "tasks": {**rec.tasks, "2_0": 1}})
    viz = run.manifest().viz
    assert (viz.job_ids, viz.tasks, viz.cluster) == (["1", "2"], {"1_0": 0, "2_0": 1}, "slurm")


def test_a_refused_submission_puts_the_previous_record_back_byte_for_byte(tmp_path):
    run = RunDir(tmp_path)
    run.update("train", status="done", job_id="5", val_accuracy=0.9)
    before = run.manifest_file.read_bytes()
    run.begin("train", cluster="local")
    assert run.manifest().train.status == "submitted" and run.manifest().train.previous["job_id"] == "5"
    assert run.abandon("train")
    assert run.manifest_file.read_bytes() == before
    assert not run.abandon("train")  # nothing pending: nothing to undo
    fresh = RunDir(tmp_path / "new")
    fresh.begin("train")
    assert fresh.abandon("train") and not fresh.manifest_file.exists()  # it did not exist before


def test_bad_json_and_a_cut_short_metrics_line(tmp_path):
    run = RunDir(tmp_path)
    run.eval_file().write_text("{not json")
    with pytest.raises(RunDirError, match="eval.json: not valid JSON.*hint"):
        run.read_eval()
    run.metrics_file.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert run.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    run.metrics_file.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(RunDirError, match="line 2 is not JSON"):
        run.read_metrics()


def _plan(**kw) -> Plan:
    values = dict(config=VizConfig(images=4), checkpoint="checkpoints/last.pt", checkpoint_sha256="ab" * 32,
                  dataset_fingerprint="cd" * 32, split="val", blocks=["conv1"], deconv_blocks=[], paths=["both"],
                  invert_blocks=[], invert_steps=0, invert_target=0.05, invert_solver="lbfgs", prior="tv", fast=False, shards=[[1, 2], [3, 4]],
                  n_images=4)
    return Plan(**{**values, **kw})


def test_the_plan_belongs_to_its_run(tmp_path):
    src = RunDir(tmp_path / "a")
    src.write_plan(_plan(config=VizConfig(run_dir=str(src.path), images=4)))
    stored = json.loads(src.plan_file.read_text())
    assert stored["config"]["run_dir"] == "" and stored["checkpoint"] == "checkpoints/last.pt"  # nothing absolute
    os.rename(src.path, tmp_path / "b")
    moved = RunDir(tmp_path / "b").read_plan()
    assert moved.config.run_dir == str(tmp_path / "b") and moved.same_request(_plan())
    assert not moved.same_request(_plan(blocks=["conv1", "layer1.0"]))
    assert "another checkpoint" in moved.mismatch({**_plan().shard_attrs(), "checkpoint_sha256": "ff" * 32})
    assert "another data set" in moved.mismatch({**_plan().shard_attrs(), "dataset_fingerprint": "00"})
    assert moved.mismatch(_plan().shard_attrs()) is None
    src.plan_file.parent.mkdir(parents=True)
    src.plan_file.write_text('{"shards": []}')
    with pytest.raises(RunDirError, match="not a plan this hpcviz can read.*--fresh"):
        src.read_plan()


# ------------------------------------------------------------------------------------------ the lock

def test_a_second_holder_is_refused_with_the_holder_and_the_file(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock("first command"):
        with pytest.raises(RunBusyError) as e:
            run.lock("second").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "first command" in msg
        assert f"lock file {run.lock_file}" in msg and "hint:" in msg
    assert not run.lock_file.exists()  # released: nothing left behind
    with run.lock("third"):
        pass


def test_a_lock_held_by_another_live_process_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from hpcviz.rundir import RunLock
with RunLock({str(run.lock_file)!r}, "sleeper"):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=f"pid {holder.pid} on .*sleeper.*holds it now"):
            run.lock().acquire()
    finally:
        holder.kill()
        holder.wait()
    with run.lock():  # killed: the kernel dropped its flock, its record is stale
        pass


def test_a_stale_record_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = RunDir(tmp_path / "r")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.path.mkdir()
    record = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "killed -9", "since": "then",
              "jobs": []}
    run.lock_file.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="hpcviz"), run.lock("me"):
        assert json.loads(run.lock_file.read_text())["command"] == "me"
    assert "took over the stale lock" in caplog.text and "killed -9" in caplog.text
    # a record from another host cannot be checked from here: refused, with the way out
    run.lock_file.write_text(json.dumps({**record, "host": "elsewhere"}))
    with pytest.raises(RunBusyError, match=f"another host.*delete {run.lock_file}"):
        run.lock().acquire()


def test_jobs_left_running_hold_the_run_until_they_end(tmp_path, monkeypatch):
    from hpcviz.rundir import lock as lock_mod
    run = RunDir(tmp_path / "r")
    states = {"42": "RUNNING"}
    monkeypatch.setattr(lock_mod, "_job_state", lambda job, host: states.get(job["id"], ""))
    with run.lock("submitter") as lock:
        lock.add_jobs(["42"], "slurm")
    assert json.loads(run.lock_file.read_text())["released"] is True  # the record stays for the job
    with pytest.raises(RunBusyError, match="slurm job 42 \\(RUNNING\\).*scancel 42"):
        run.lock().acquire()
    states.clear()  # the job ended: the run is free again, without a warning
    with run.lock("next"):
        pass
    assert not run.lock_file.exists()


def test_local_jobs_of_a_killed_launcher_still_hold_the_run(tmp_path):
    run = RunDir(tmp_path / "r")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.path.mkdir()
        run.lock_file.write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "command": "x",
                                             "since": "t", "jobs": [{"id": str(child.pid), "cluster": "local"}]}))
        with pytest.raises(RunBusyError, match=f"local job {child.pid}"):
            run.lock().acquire()
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    with run.lock():
        pass
