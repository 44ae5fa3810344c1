import json
import os
import subprocess
import sys

import pytest

from hpcviz import dist
from hpcviz.config import ConfigError, LaunchConfig
from hpcviz.launch import executors as launch_mod
from hpcviz.launch.executors import _slurm_params, read_profile
from hpcviz.rundir import RunDir
from hpcviz.train import checkpoint

from conftest import ROOT

TINY = ["--arch", "resnet20", "--data", "builtin:20", "--image-size", "16", "--batch-size", "32",
        "--eval-batch-size", "64", "--epochs", "2", "--lr", "0.05", "--device", "cpu"]


def launch(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["device", "host"])
def test_two_gloo_processes_stay_in_sync(tmp_path, where):
    """Two local ranks; with host placement they share one node-wide copy of the data (rank 0 writes it)."""
    run = tmp_path / "ddp"
    r = launch(*TINY, "--cluster", "local", "--nproc", "2", "--run", str(run), "--data-placement", where)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done:" in r.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train"]["world_size"] == 2 and manifest["train"]["status"] == "done"
    assert manifest["train"]["data_placement"] == where and manifest["train"]["device"].startswith("cpu")
    # each rank returned a digest of its weights; the launcher refuses if they differ: check them here too
    import pickle
    digests = set()
    for rank in (0, 1):
        [res] = [p for p in (run / "logs").glob(f"*_{rank}_result.pkl")]
        outcome, value = pickle.loads(res.read_bytes())
        assert outcome == "success"
        digests.add(value["weights_sha256"])
    assert len(digests) == 1
    state = checkpoint.load_checkpoint(run / "checkpoints")
    assert state["world_size"] == 2
    assert len(RunDir(run).read_metrics()) == 2
    assert list((run / "logs").glob("*_0_log.err"))  # scheduler logs live in the run


@pytest.mark.parametrize("args,message", [
    (["--arch", "resnet19"], "--arch 'resnet19': not one of resnet18, resnet34"),
    (["--recipe", "fast"], "--recipe 'fast': not one of default, seed"),
    (["--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["--data", "builtin:many"], "N_PER_CLASS 'many' is not a positive integer"),
    (["--data", "EMPTY"], "no class subfolders"),
    (["--data", "CORRUPT", "--cluster", "local", "--batch-size", "8"], "cannot decode"),  # 19 training images
    (["--gpus", "64", "--cluster", "local", "--device", "auto"], "--gpus 64: this machine has"),
    (["--cluster", "moon"], "--cluster 'moon': not one of auto, slurm, local, debug"),
    (["--lr", "-1", "--cluster", "local"], "--lr -1.0: must be positive"),
    (["--profile", "nope", "--cluster", "local"], "--profile nope: no file"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    from PIL import Image
    for name in ("cat", "dog"):  # enough good images for a validation split, and one that is not an image
        (tmp_path / "corrupt" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / "corrupt" / name / f"{i}.png")
    (tmp_path / "corrupt" / "cat" / "x.jpg").write_bytes(b"not a jpeg")
    args = [{"EMPTY": str(tmp_path / "empty"), "CORRUPT": str(tmp_path / "corrupt")}.get(a, a) for a in args]
    r = launch(*TINY, "--run", str(tmp_path / "bad"), *args, timeout=60)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert message in r.stderr and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_refusal_leaves_the_run_intact(tmp_path):
    run = tmp_path / "r"
    assert launch(*TINY, "--cluster", "debug", "--epochs", "1", "--run", str(run)).returncode == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    r = launch(*TINY, "--cluster", "local", "--run", str(run))
    assert r.returncode == 2 and "pass --resume" in r.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    r = launch(*TINY, "--cluster", "local", "--run", str(run), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == [1, 2]


def test_profiles(tmp_path):
    prof = read_profile("default")
    assert prof["gpu_request"] == "gpus-per-node"
    bad = tmp_path / "bad.ini"
    bad.write_text("[slurm]\npartiton = gpu\n")
    with pytest.raises(ConfigError, match="unknown keys \\['partiton'\\]"):
        read_profile(str(bad))
    gres = tmp_path / "gres.ini"
    gres.write_text("[slurm]\ngpu_request = gres\npartition = gpu\naccount = lab\n")
    params = _slurm_params(LaunchConfig(cluster="slurm", gpus=4, profile=str(gres)), read_profile(str(gres)), 0)
    assert params["slurm_gres"] == "gpu:4" and "gpus_per_node" not in params
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "lab"
    flags = _slurm_params(LaunchConfig(cluster="slurm", gpus=2, partition="big"), read_profile("default"), 0)
    assert flags["gpus_per_node"] == 2 and flags["slurm_partition"] == "big" and "slurm_gres" not in flags
    cpu = _slurm_params(LaunchConfig(cluster="slurm"), read_profile("default"), 0)
    assert not {"gpus_per_node", "slurm_gres"} & set(cpu)  # no GRES on CPU-only clusters


# ---- GPUs: how many, which, and the cores that feed them -----------------------------------------

def test_gpus_not_given_means_one_where_there_is_one(monkeypatch, tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="local")) == 1
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="local", gpus=0)) == 0           # --gpus 0 opts out
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="local"), device="cpu") == 0    # --device cpu
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="local", nproc=2)) == 0         # CPU processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="local")) == 0
    yes = tmp_path / "gpu.ini"
    yes.write_text("[slurm]\ngpu_nodes = yes\n")
    monkeypatch.setattr(launch_mod, "detect_cluster", lambda c: c)
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="slurm", profile=str(yes))) == 1
    monkeypatch.setattr(launch_mod, "_sinfo", lambda fmt, part: ["gpu:h200:8(S:0-1)"] if fmt == "%G" else [])
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="slurm")) == 1                   # auto: sinfo's GRES
    monkeypatch.setattr(launch_mod, "_sinfo", lambda fmt, part: ["(null)"])
    assert launch_mod.resolve_gpus(LaunchConfig(cluster="slurm")) == 0                   # a CPU cluster


def test_viz_array_tasks_get_one_gpu_each(monkeypatch):
    assert launch_mod.viz_gpus(LaunchConfig(cluster="local", gpus=4)) == 1
    assert launch_mod.viz_gpus(LaunchConfig(cluster="local", gpus=0)) == 0
    from hpcviz.launch.executors import stage_launch as _stage_launch
    assert _stage_launch(LaunchConfig(cluster="local", gpus=4), "viz").gpus == 1
    assert _stage_launch(LaunchConfig(cluster="local", gpus=4), "aggregate").gpus == 0


def test_local_gpus_respect_the_allocations_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,GPU-aa11")
    params = launch_mod._local_gpu_params(2)
    assert params["gpus_per_node"] == 2 and params["local_setup"] == ["export CUDA_VISIBLE_DEVICES=3,5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "local_setup" not in launch_mod._local_gpu_params(2)


def test_cpus_per_gpu_task_are_asked_for_and_exported(monkeypatch):
    prof = read_profile("default")
    monkeypatch.setattr(launch_mod, "_sinfo", lambda fmt, part: ["64"] if fmt == "%c" else [])
    assert launch_mod.cpus_per_task(LaunchConfig(cluster="slurm", gpus=4), prof, "slurm") == 8
    monkeypatch.setattr(launch_mod, "_sinfo", lambda fmt, part: ["16"] if fmt == "%c" else [])
    assert launch_mod.cpus_per_task(LaunchConfig(cluster="slurm", gpus=4), prof, "slurm") == 4  # what the node has
    assert launch_mod.cpus_per_task(LaunchConfig(cluster="slurm", gpus=4, cpus_per_task=6), prof, "slurm") == 6
    assert launch_mod.cpus_per_task(LaunchConfig(cluster="slurm", gpus=0), prof, "slurm") == 0  # cluster default
    params = _slurm_params(LaunchConfig(cluster="slurm", gpus=4), prof, 8)
    assert params["slurm_srun_args"] == ["--cpus-per-task=8"]
    assert "export SRUN_CPUS_PER_TASK=8" in params["slurm_setup"]  # srun no longer inherits it from sbatch


def _hold_gpu_slot(folder: str, task: int, out: str, hold_s: float) -> None:
    import time
    with launch_mod.gpu_slot(folder, task) as slot:
        t0 = time.monotonic()
        time.sleep(hold_s)
        record = [slot, os.environ.get("CUDA_VISIBLE_DEVICES"), t0, time.monotonic()]
    with open(os.path.join(out, f"{task}.json"), "w") as f:
        json.dump(record, f)


def test_local_tasks_take_the_gpus_one_each_the_rest_queued(tmp_path, monkeypatch):
    """Five local array tasks, two (faked) GPUs: each task runs with one GPU as its only visible device, never
    two tasks on one GPU at a time, both GPUs in use at once, every task done in the end (the rest queued)."""
    import multiprocessing
    monkeypatch.setenv(launch_mod.GPU_SLOTS_VAR, "GPU-aa,GPU-bb")  # names as an allocation's CUDA_VISIBLE_DEVICES has
    monkeypatch.setattr(launch_mod, "_SLOT_POLL_S", 0.05)
    ctx = multiprocessing.get_context("fork")  # the children see the patched environment and poll interval
    procs = [ctx.Process(target=_hold_gpu_slot, args=(str(tmp_path / "logs"), k, str(tmp_path), 0.4))
             for k in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    records = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(5)]
    assert all(slot == visible for slot, visible, _, _ in records)  # the slot is the task's only GPU
    assert {r[0] for r in records} == {"GPU-aa", "GPU-bb"}
    for gpu in ("GPU-aa", "GPU-bb"):  # one task at a time on each
        spans = sorted((t0, t1) for slot, _, t0, t1 in records if slot == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    busy = [sum(t0 <= r[2] < t1 for _, _, t0, t1 in records) for r in records]  # tasks running at each start
    assert max(busy) == 2  # both GPUs used together, never a third task


def test_without_gpu_slots_a_task_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv(launch_mod.GPU_SLOTS_VAR, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with launch_mod.gpu_slot(str(tmp_path), 3) as slot:
        assert slot is None and os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert not any(tmp_path.iterdir())


class _Recorder:
    """An executor that records what map_array got, and the environment the local jobs would copy."""

    def __init__(self):
        self.calls = []

    def map_array(self, fn, runs, items):
        self.calls.append((fn, list(runs), [list(i) if isinstance(i, list) else i for i in items],
                           {k: os.environ.get(k) for k in (launch_mod.GPU_SLOTS_VAR, dist.THREADS_VAR)}))
        return [type("Job", (), {"job_id": str(100 + j)})() for j in range(len(items))]

    def update_parameters(self, **kw):
        pass


def test_local_arrays_run_as_a_pool_of_one_worker_per_gpu_or_core(tmp_path, monkeypatch):
    """Local items go to as many workers as there are GPUs (each takes one: gpu_slot's round robin) or, on
    CPUs, cores, items round robin, the cores shared among the workers; SLURM arrays keep a task per item."""
    from hpcviz.config import LaunchConfig
    from hpcviz.launch import array
    from hpcviz.rundir import RunDir

    def task(run_dir, item):
        return item
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv(launch_mod.GPU_SLOTS_VAR, raising=False)
    monkeypatch.delenv(dist.THREADS_VAR, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    run = RunDir(tmp_path / "run")
    ex = _Recorder()
    ids, jobs = array._submit(run, ex, task, [0, 1, 2, 3, 4, 5], LaunchConfig(cluster="local", gpus=1), None)
    fn, runs, items, env = ex.calls[-1]
    assert isinstance(fn, launch_mod.Worker) and fn.fn is task and fn.folder == str(run.logs)
    assert items == [[0, 2, 4], [1, 3, 5]] and runs == [str(run.path)] * 2 and ids == ["100", "101"]
    assert env == {launch_mod.GPU_SLOTS_VAR: "3,5", dist.THREADS_VAR: "4"}  # 2 workers on 8 cores
    assert launch_mod.GPU_SLOTS_VAR not in os.environ and dist.THREADS_VAR not in os.environ
    array._submit(run, ex, task, list(range(20)), LaunchConfig(cluster="local", gpus=0), None)
    _, _, items, env = ex.calls[-1]
    assert len(items) == 8 and sorted(sum(items, [])) == list(range(20)) and items[0] == [0, 8, 16]
    assert env == {launch_mod.GPU_SLOTS_VAR: None, dist.THREADS_VAR: "1"}  # 8 workers, a core each
    array._submit(run, ex, task, [4, 7], LaunchConfig(cluster="local", gpus=0), None)
    assert ex.calls[-1][2] == [[4], [7]] and ex.calls[-1][3][dist.THREADS_VAR] == "4"  # never an idle worker


def test_a_worker_runs_its_items_in_turn_and_names_the_ones_that_failed(tmp_path, monkeypatch):
    monkeypatch.delenv(launch_mod.GPU_SLOTS_VAR, raising=False)
    seen = []

    def task(run_dir, item):
        seen.append((run_dir, item))
        if item == 3:
            raise ValueError("shard 3 is broken\nmore")
    assert launch_mod.Worker(task, str(tmp_path))("run", [1, 3, 5]) == {3: "shard 3 is broken"}
    assert seen == [("run", 1), ("run", 3), ("run", 5)]  # the one after the failure ran too


def test_waiting_for_a_pool_names_each_failed_item(monkeypatch):
    from hpcviz.config import LaunchConfig
    from hpcviz.launch import array
    results = {"a": {2: "bad input"}, "b": RuntimeError("worker killed\n...")}

    def fake_wait(job, launch):
        r = results[job]
        if isinstance(r, Exception):
            raise r
        return r
    monkeypatch.setattr(array, "wait_result", fake_wait)
    lines = array.wait_all(["a", "b"], [0, 1, 2, 3], LaunchConfig(cluster="local"), what="shard")
    assert lines == ["shard 2: bad input", "shard 1: worker killed", "shard 3: worker killed"]
