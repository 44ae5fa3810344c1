"""Two-node tests on the test cluster's namespace nodes (slurm/testcluster.sh: partition `multi`, two
slurmds in their own network namespaces and hostnames): a 2-node x 1-task gloo DDP training through
the launcher, requeued mid-training and compared bit-for-bit with an uninterrupted 2-node run; and the
environment SLURM really gives the two tasks, read by hpcviz.dist.read_env. Marked `slurm`: skipped
without a cluster or without its partition `multi`, failed under CI=true."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcviz.rundir import RunDir
from hpcviz.scheduler import wait_for_job
from hpcviz.train import checkpoint

from conftest import ROOT, scontrol_field, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PARTITION = "multi"
# One thread per rank: the two "nodes" share this machine's cores, and a rank that takes them all
# (torch's default without CPU binding) runs ~10x slower when the other does the same.
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SUBMITIT_")},
       "OMP_NUM_THREADS": "1"}
TRAIN = ["--cluster", "slurm", "--partition", PARTITION, "--nodes", "2", "--nproc", "1", "--cpus-per-task", "1",
         "--arch", "resnet20", "--data", "builtin:20", "--image-size", "16", "--epochs", "10", "--batch-size", "32",
         "--lr", "0.05", "--device", "cpu", "--checkpoint-every", "3", "--wait"]


@pytest.fixture(scope="module")
def multi_nodes() -> list[str]:
    """The two nodes of partition `multi`, when both answer; otherwise skip (fail under CI=true) saying why."""
    r = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    bad = [f"{n} is {s}" for n, s in rows if s.rstrip("*") not in ("idle", "mixed", "allocated", "completing")
           or s.endswith("*")]
    why = ""
    if r.returncode != 0 or len(rows) != 2:
        why = f"no partition {PARTITION!r} with 2 nodes ({r.stderr.strip()[:200] or r.stdout.strip()[:200] or 'sinfo lists none'})"
    elif bad:
        why = f"partition {PARTITION!r}: {', '.join(bad)}"
    if why:
        state = Path(os.environ.get("HPCVIZ_SLURM_DIR", "/tmp/hpcviz-slurm")) / "run" / "multinode"
        recorded = state.read_text().strip().replace("\n", ": ") if state.is_file() else ""
        why += (f"; the test cluster's namespace nodes are not up ({recorded[:600]})" if recorded else
                "; the test cluster's namespace nodes are not up") + "; see `bash slurm/testcluster.sh status`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return [n for n, _ in rows]


def start_training(run: Path) -> subprocess.Popen:
    out = open(run.parent / f"{run.name}.launcher.log", "w")  # a file, not a pipe: --wait follows the log
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "launch_train.py"), *TRAIN, "--run", str(run)],
                            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)


def end_training(proc: subprocess.Popen, run: Path, timeout_s: float = 240) -> str:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (run.parent / f"{run.name}.launcher.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"done: {run}" in text, text[-3000:]
    return text


def job_id_of(run: Path) -> str:
    try:
        return str(json.loads((run / "manifest.json").read_text())["train"].get("job_id", ""))
    except (OSError, ValueError, KeyError):
        return ""


def rank_hosts(run: Path, job_id: str) -> dict[int, set[tuple[str, int]]]:
    """rank -> {(hostname, SLURM node index)} over every run of the job, from submitit's own log lines
    (`Starting with JobEnvironment(job_id=.., hostname=.., local_rank=0(1), node=1(2), global_rank=1(2))`)."""
    found: dict[int, set[tuple[str, int]]] = {}
    for rank in (0, 1):
        text = "".join((run / "logs" / f"{job_id}_{rank}_log.{ext}").read_text(errors="replace") for ext in ("out", "err"))
        for host, node, grank in re.findall(r"JobEnvironment\(.*?hostname=([^,]+), .*?node=(\d+)\(2\), "
                                            r"global_rank=(\d+)\(2\)", text):
            assert int(grank) == rank, text[-2000:]
            found.setdefault(rank, set()).add((host, int(node)))
    return found


def test_two_node_ddp_requeued_mid_training_is_bit_exact(tmp_path, multi_nodes):
    t0 = time.monotonic()
    ref, run = tmp_path / "ref", tmp_path / "cut"
    ref_proc, proc = start_training(ref), start_training(run)
    try:
        wait_until(lambda: job_id_of(run), 60, "the job id in the manifest")
        job_id = job_id_of(run)
        # requeue once the job has saved a checkpoint (every 3 steps) and before it is done
        wait_until(lambda: (run / "checkpoints" / "last.pt.sha256").exists(), 150, "a first checkpoint")
        assert scontrol_field(job_id, "JobState") == "RUNNING"
        assert scontrol_field(job_id, "NumNodes") == "2"
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        end_training(proc, run)
        end_training(ref_proc, ref)
    finally:
        for p in (proc, ref_proc):
            if p.poll() is None:
                p.kill()
    ref_id = job_id_of(ref)
    assert int(scontrol_field(job_id, "Restarts")) >= 1
    assert json.loads((run / "manifest.json").read_text())["train"]["restarts"] >= 1
    # the two ranks ran on the two nodes, rank 0 on the first (in both runs of the requeued job)
    for rid, r in ((job_id, run), (ref_id, ref)):
        hosts = rank_hosts(r, rid)
        assert hosts[0] == {(multi_nodes[0], 0)} and hosts[1] == {(multi_nodes[1], 1)}, hosts
        assert json.loads((r / "manifest.json").read_text())["train"]["host"] == multi_nodes[0]
        assert "2 process(es)" in (r / "logs" / f"{rid}_0_log.err").read_text()
    assert (run / "logs" / f"{job_id}_1_log.out").read_text().count("Starting with JobEnvironment") >= 2  # ran again
    # bit-identical weights: every rank of both runs, and the saved checkpoints
    results = wait_for_job(job_id, run / "logs", ntasks=2, timeout_s=30, poll_s=1.0)
    reference = wait_for_job(ref_id, ref / "logs", ntasks=2, timeout_s=30, poll_s=1.0)
    digests = {r["weights_sha256"] for r in results + reference}
    assert len(digests) == 1, (results, reference)
    assert [m["epoch"] for m in RunDir(run).read_metrics()] == list(range(1, 11))
    a = checkpoint.load_checkpoint(run / "checkpoints")
    b = checkpoint.load_checkpoint(ref / "checkpoints")
    assert a["world_size"] == b["world_size"] == 2
    assert all(a["model"][k].equal(b["model"][k]) for k in b["model"])
    assert json.loads((run / "eval.json").read_text())["accuracy"] == json.loads((ref / "eval.json").read_text())["accuracy"]
    print(f"two-node requeue test: {time.monotonic() - t0:.0f}s")


PROBE = r"""
import dataclasses, json, os, socket
import torch, torch.distributed as td
from hpcviz import dist
e = dist.read_env()
keys = ("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_PROCID",
        "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NUM_NODES")
out = {"hostname": socket.gethostname(), "env": {k: os.environ.get(k) for k in keys},
       "dist": dataclasses.asdict(e), "master_ip": socket.gethostbyname(e.master_addr),
       "my_ip": socket.gethostbyname(socket.gethostname())}
dist.init("cpu")  # gloo rendezvous at read_env's master_addr:master_port, across the two nodes
t = torch.tensor([float(e.rank + 1)])
td.all_reduce(t)
out["sum"] = t.item()
dist.cleanup()
print("PROBE " + json.dumps(out), flush=True)
"""


def test_slurm_environment_on_two_nodes_is_what_read_env_expects(multi_nodes):
    from hpcviz.dist import first_host
    r = subprocess.run(["srun", "-p", PARTITION, "-N", "2", "-n", "2", "--ntasks-per-node=1", "--time=5",
                        sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**ENV, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    tasks = sorted((json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("PROBE ")),
                   key=lambda t: t["dist"]["rank"])
    assert len(tasks) == 2, r.stdout + r.stderr
    nodelist = tasks[0]["env"]["SLURM_JOB_NODELIST"]
    master = first_host(nodelist)
    assert master == multi_nodes[0]
    for rank, t in enumerate(tasks):
        d, env = t["dist"], t["env"]
        assert env["SLURM_JOB_NODELIST"] == nodelist and env["SLURM_STEP_NUM_NODES"] == "2"
        assert d["source"] == "slurm" and d["rank"] == rank == int(env["SLURM_PROCID"])
        assert d["world_size"] == 2 and d["local_rank"] == 0 == int(env["SLURM_LOCALID"]) and d["local_world_size"] == 1
        assert d["master_addr"] == master and d["master_port"] == tasks[0]["dist"]["master_port"]
        assert int(env["SLURM_NODEID"]) == rank and t["hostname"] == multi_nodes[rank]
        assert t["master_ip"] == tasks[0]["my_ip"] and not t["my_ip"].startswith("127.")  # gloo needs a reachable address
        assert t["sum"] == 3.0  # the all_reduce went across the nodes
    assert tasks[0]["hostname"] != tasks[1]["hostname"] and tasks[0]["my_ip"] != tasks[1]["my_ip"]
