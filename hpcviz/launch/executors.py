"""submitit executors, cluster profiles and the training job.

`--cluster slurm` submits with sbatch (one task per GPU, or `nproc` CPU tasks for gloo), `local`
runs the same tasks as subprocesses here, `debug` runs in this process. Jobs receive configs and
paths, never models. `check_launch` checks a launch request in full (cluster, profile, GPUs here)
before anything is written; the commands call it first.
"""
from __future__ import annotations

import configparser
import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from ..config import CLUSTERS, ConfigError, LaunchConfig, TrainConfig, check_choice
from ..errors import DiskFullError, InputError, JobError
from ..rundir import RunDir
from ..scheduler import JobFailed, LogFollower, error_class, read_results, result_paths, tail, wait_for_job

log = logging.getLogger("hpcviz")

REPO = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO / "slurm" / "profiles"
PROFILE_KEYS = {"partition": "", "account": "", "qos": "", "constraint": "", "gpu_request": "gpus-per-node",
                "gpu_nodes": "auto", "cpus_per_task": "0", "cpus_per_gpu": "8", "mem_gb": "0", "time_min": "60",
                "signal_delay_s": "90", "max_num_timeout": "20", "setup": ""}
_INT_KEYS = ("cpus_per_task", "cpus_per_gpu", "mem_gb", "time_min", "signal_delay_s", "max_num_timeout")


class LaunchError(JobError):
    """A job could not be submitted, or it failed."""


class JobRefused(InputError):
    """A job that refused its input before it started (its own one-line error)."""


def detect_cluster(requested: str) -> str:
    """auto -> slurm when sbatch is on PATH, else local. inline = run in this process as one
    rank of whatever started it (srun in slurm/train.sbatch, torchrun), submitting nothing."""
    check_choice("--cluster", requested, CLUSTERS)
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm" and not shutil.which("sbatch"):
        raise ConfigError("--cluster slurm: sbatch is not on PATH; hint: run on a SLURM login node, or --cluster local")
    return requested


def read_profile(name: str) -> dict[str, str]:
    """A cluster profile: slurm/profiles/<name>.ini, or a path to an .ini; '' = $HPCVIZ_PROFILE or 'default'."""
    name = name or os.environ.get("HPCVIZ_PROFILE", "default")
    path = Path(name) if name.endswith(".ini") or os.sep in name else PROFILE_DIR / f"{name}.ini"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.ini"))
        raise ConfigError(f"--profile {name}: no file {path}; valid profiles: {', '.join(known) or 'none'}; "
                          "hint: copy slurm/profiles/default.ini and edit it")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as e:
        raise ConfigError(f"profile {path}: not an .ini file ({str(e).splitlines()[0]}); hint: compare it with "
                          "slurm/profiles/default.ini") from None
    section = dict(parser["slurm"]) if parser.has_section("slurm") else {}
    unknown = sorted(set(section) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"profile {path}: unknown keys {unknown}; valid keys: {', '.join(PROFILE_KEYS)}")
    prof = {**PROFILE_KEYS, **section}
    check_choice(f"profile {path}: gpu_request", prof["gpu_request"], ("gpus-per-node", "gres"))
    check_choice(f"profile {path}: gpu_nodes", prof["gpu_nodes"], ("auto", "yes", "no"))
    bad = [k for k in _INT_KEYS if not prof[k].strip().isdigit()]
    if bad:
        raise ConfigError(f"profile {path}: {bad[0]} = {prof[bad[0]]!r} is not a whole number >= 0; "
                          f"hint: e.g. {bad[0]} = {PROFILE_KEYS[bad[0]]}")
    return prof


def _sinfo(fmt: str, partition: str) -> list[str]:
    """sinfo's answer for the partition (or every one), [] when it cannot tell (never hangs)."""
    import subprocess
    cmd = ["sinfo", "-h", "-o", fmt] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def gpu_profile(prof: dict[str, str], partition: str = "") -> bool:
    """The profile's nodes have GPUs: gpu_nodes = yes, or auto and sinfo lists a gpu GRES on the partition."""
    if prof["gpu_nodes"] != "auto":
        return prof["gpu_nodes"] == "yes"
    return any("gpu" in line for line in _sinfo("%G", partition or prof["partition"]))


def resolve_gpus(launch: LaunchConfig, device: str = "auto") -> int:
    """--gpus as given, or, when it is not: 1 where a GPU is to be had (locally: this machine has one; on
    SLURM: a GPU profile), else 0. A CPU request (--device cpu, --nproc N > 1) gets 0."""
    if launch.gpus is not None:
        return launch.gpus
    if device == "cpu" or launch.nproc > 1:
        return 0
    if detect_cluster(launch.cluster) == "slurm":
        return 1 if gpu_profile(read_profile(launch.profile), launch.partition) else 0
    import torch
    return 1 if torch.cuda.is_available() else 0


def check_launch(launch: LaunchConfig, device: str = "auto") -> LaunchConfig:
    """The launch request checked in full, nothing written: a copy with the cluster and GPUs resolved.
    Bad input is a ConfigError (exit 2): an unknown cluster or profile, --gpus with --device cpu, more
    GPUs than this machine has (local, debug), several processes for the debug cluster."""
    launch = dataclasses.replace(launch.validate(), extra=dict(launch.extra))
    if launch.gpus and device == "cpu":
        raise ConfigError(f"--gpus {launch.gpus} with --device cpu; hint: drop one of them (--gpus 0 for CPUs)")
    launch.cluster = detect_cluster(launch.cluster)
    read_profile(launch.profile)
    if launch.cluster == "inline":
        return launch
    launch.gpus = resolve_gpus(launch, device)
    if launch.cluster == "slurm" and not launch.mem_gb:  # resolved, like the GPUs: what a job's node will have
        launch.mem_gb = int(read_profile(launch.profile)["mem_gb"])
    if launch.cluster == "debug" and (launch.tasks_per_node() > 1 or launch.nodes > 1):
        raise ConfigError("--cluster debug runs one process, in this one; hint: use --cluster local for "
                          "--nproc/--gpus > 1 or --nodes > 1")
    if launch.cluster != "slurm":
        _check_local_gpus(launch.gpus)
        if launch.nodes > 1:
            raise ConfigError(f"--nodes {launch.nodes}: --cluster {launch.cluster} runs on this one machine; "
                              "hint: --cluster slurm for several nodes")
    return launch


def _check_local_gpus(gpus: int) -> None:
    if gpus <= 0:
        return
    import torch
    have = torch.cuda.device_count()
    if gpus > have:
        raise ConfigError(f"--gpus {gpus}: this machine has {have} GPU(s); hint: use --gpus {have} "
                          f"{'or --nproc N for CPU processes' if not have else ''}".rstrip())


def make_executor(launch: LaunchConfig, folder: Path, job_name: str) -> submitit.Executor:
    """An executor for a request that check_launch has resolved, logging into `folder`."""
    prof = read_profile(launch.profile)
    cluster = launch.cluster
    assert cluster in ("slurm", "local", "debug") and launch.gpus is not None, "check_launch() first"
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=int(prof["max_num_timeout"]))
    # the profile's time limit is the cluster's; a job here runs until it is done (unless --time)
    limit = launch.time_min or (int(prof["time_min"]) if cluster == "slurm" else 60 * 24 * 365)
    params: dict[str, Any] = dict(name=job_name, nodes=launch.nodes, tasks_per_node=launch.tasks_per_node(),
                                  timeout_min=limit)
    cpus = cpus_per_task(launch, prof, cluster)
    if cpus:
        params["cpus_per_task"] = cpus
    if cluster == "slurm":
        params.update(_slurm_params(launch, prof, cpus))
    elif cluster == "local" and launch.gpus:
        params.update(_local_gpu_params(launch.gpus))
    ex.update_parameters(**params)
    return ex


def cpus_per_task(launch: LaunchConfig, prof: dict[str, str], cluster: str) -> int:
    """--cpus-per-task, else the profile's; for GPU tasks without either, cpus_per_gpu (8) or what a node
    of the partition has per task (sinfo), whichever is less: a GPU rank needs cores to feed it."""
    cpus = launch.cpus_per_task or int(prof["cpus_per_task"])
    if cpus or not launch.gpus:
        return cpus
    cpus = int(prof["cpus_per_gpu"])
    if cluster == "slurm":
        node = [int(c) for c in _sinfo("%c", launch.partition or prof["partition"]) if c.isdigit()]
        if node:
            cpus = max(1, min(cpus, min(node) // max(1, launch.gpus)))
    return cpus


def _local_gpu_params(gpus: int) -> dict[str, Any]:
    """Local tasks see the first `gpus` of the GPUs this process sees: inside an allocation that is its own
    CUDA_VISIBLE_DEVICES (ids, UUIDs or MIG names), not 0..N-1 of the whole machine."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    params: dict[str, Any] = {"gpus_per_node": gpus}
    if visible:  # submitit sets 0..N-1; a setup line runs after that, in the task's shell
        params["local_setup"] = [f"export CUDA_VISIBLE_DEVICES={','.join(visible[:gpus])}"]
    return params


def _slurm_params(launch: LaunchConfig, prof: dict[str, str], cpus: int) -> dict[str, Any]:
    params: dict[str, Any] = {"slurm_signal_delay_s": int(prof["signal_delay_s"])}
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(launch, key) or prof[key]
        if value:
            params[f"slurm_{key}"] = value
    mem = launch.mem_gb or int(prof["mem_gb"])
    if mem:
        params["mem_gb"] = mem
    if launch.gpus:  # GPU options only when asked: clusters without GRES reject them
        if prof["gpu_request"] == "gres":
            params["slurm_gres"] = f"gpu:{launch.gpus}"
        else:
            params["gpus_per_node"] = launch.gpus
    setup = [line for line in prof["setup"].splitlines() if line.strip()]
    if cpus:  # srun (22.05+) no longer inherits sbatch's --cpus-per-task: each rank would get one core
        params["slurm_srun_args"] = [f"--cpus-per-task={cpus}"]
        setup.append(f"export SRUN_CPUS_PER_TASK={cpus}")
    if setup:
        params["slurm_setup"] = setup
    if launch.extra:
        params["slurm_additional_parameters"] = dict(launch.extra)
    return params


def submit_train(cfg: TrainConfig, launch: LaunchConfig, job: Any) -> submitit.Job:
    """Submit the training job; the manifest's train record says `submitted` only once sbatch took it
    (the previous record comes back if the submission is refused)."""
    run = RunDir(cfg.run_dir)
    ex = make_executor(launch, run.logs, f"hpcviz-train-{run.path.resolve().name}")
    job.alone = launch.cluster == "debug"
    run.logs.mkdir(parents=True, exist_ok=True)
    run.begin("train", cluster=launch.cluster)
    try:
        submitted = ex.submit(job, cfg)
    except Exception as e:  # submitit wraps sbatch's refusal in several types
        run.abandon("train")
        first = str(e).strip().splitlines()
        raise LaunchError(f"submission refused: {first[-1] if first else type(e).__name__}; "
                          "hint: check --gpus/--partition/--account against `sinfo` and the profile") from None
    run.update("train", job_id=str(submitted.job_id))
    return submitted


def _follow_local(job: submitit.Job) -> None:
    """A foreground local job: show rank 0's log as it grows, so the terminal is not silent."""
    if not isinstance(job, submitit.LocalJob):
        return
    # only the training log's own lines (they start with a date): tracebacks end in the error line
    follower = LogFollower(Path(job.paths.folder) / f"{job.job_id}_0_log.err", only_dated=True)
    while not job.done():
        follower.poll()
        time.sleep(0.5)
    follower.poll()


def _job_error(job: submitit.Job, line: str, tail: str) -> Exception:
    """The launcher's error for a job whose error (its traceback's last line) is `line`: a refused input is
    the job's own one line (exit 2), a full disk its one line (exit 1), anything else that line and the tail
    of the job's log."""
    found = error_class(line)
    message = f"job {job.job_id}: {line.split(': ', 1)[-1]}"
    if found is not None and issubclass(found, InputError):
        return JobRefused(message)
    if found is not None and issubclass(found, DiskFullError):
        return DiskFullError(message)
    return LaunchError(f"job {job.job_id} failed: {line}" + (f"\n{tail}" if tail else ""))


def wait_result(job: submitit.Job, launch: LaunchConfig | None = None, follow: bool = False) -> Any:
    """Block until the job ends; its failure becomes _job_error's error; a job that ended without a result
    (killed) says so.

    SLURM jobs are watched through hpcviz.jobstate (sacct, else squeue/scontrol, else the
    run's files), so the wait ends whatever happened to the job.
    """
    ntasks = launch.tasks_per_node() * launch.nodes if launch else 1
    try:
        if isinstance(job, submitit.SlurmJob):
            results = wait_for_job(str(job.job_id), job.paths.folder, ntasks, follow=follow)
        else:
            _follow_local(job)
            results = job.results()
    except JobFailed as e:
        first, _, rest = str(e).partition("\n")
        if " failed: " not in first:  # it ended without a result, or still runs past the timeout
            raise LaunchError(str(e)) from None
        raise _job_error(job, first.split(" failed: ", 1)[-1], rest) from None
    except Exception as e:  # FailedJobError, UncompletedJobError, or the job's own exception
        line = f"{type(e).__module__}.{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if type(e).__name__ == "UncompletedJobError":
            line = "it ended without a result (killed, or out of memory?)"
        try:  # the task's own exception, from the result file submitit wrote
            read_results(result_paths(job.paths.folder, str(job.job_id), ntasks))
        except JobFailed as failed:
            line = str(failed)
        except OSError:
            pass
        logs = "\n".join(tail(Path(str(p).replace("%t", "0"))) for p in (job.paths.stderr, job.paths.stdout))
        raise _job_error(job, line, logs) from None
    digests = {r.get("weights_sha256") for r in results if isinstance(r, dict)} - {None}
    if len(digests) > 1:  # every rank returns a digest of its weights: DDP must keep them identical
        raise LaunchError(f"job {job.job_id}: the {len(results)} ranks ended with different weights; "
                          "hint: report this with the job's logs")
    return results[0]


def max_array_size() -> int:
    """The cluster's MaxArraySize (arrays hold indices 0..MaxArraySize-1); 1001 when it cannot be read."""
    import subprocess
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 1001
    for line in out.splitlines():
        if line.replace(" ", "").startswith("MaxArraySize="):
            return int(line.split("=", 1)[1].strip())
    return 1001


GPU_SLOTS_VAR = "HPCVIZ_GPU_SLOTS"  # set by a launcher whose local array tasks share this machine's GPUs
_SLOT_POLL_S = 1.0  # a queued task looks for a free GPU this often


@contextlib.contextmanager
def gpu_slot(folder: str, task: int) -> Iterator[str | None]:
    """A local array task's GPU (GPU_SLOTS_VAR lists them): the first free one from `task` mod N on (round
    robin), held by an flock on folder/gpu-<k>.lock (released if the process dies), made this process's only
    visible device before CUDA starts; a task that finds none free waits. Elsewhere: None, nothing done."""
    slots = [s for s in os.environ.get(GPU_SLOTS_VAR, "").split(",") if s]
    if not slots:
        yield None
        return
    os.makedirs(folder, exist_ok=True)
    while True:
        for j in range(len(slots)):
            k = (task + j) % len(slots)
            fd = os.open(os.path.join(folder, f"gpu-{k}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.environ["CUDA_VISIBLE_DEVICES"] = slots[k]
                yield slots[k]
                return
            finally:
                os.close(fd)  # releases the lock
        time.sleep(_SLOT_POLL_S)


@dataclass(frozen=True)
class Worker:
    """A local pool worker: one process that runs its items in turn (one interpreter, torch import and start-up
    for all of them), first taking a GPU of its own when the launcher gave slots (gpu_slot: round robin, one
    worker on each), held throughout. An item's failure is logged and recorded; the next items still run.
    Returns {item: the first line of its error} for the items that failed."""
    fn: Callable[[str, int], Any]
    folder: str  # where the slots' lock files are (the run's logs/)

    def __call__(self, run_dir: str, items: list[int]) -> dict[int, str]:
        failed: dict[int, str] = {}
        with gpu_slot(self.folder, items[0] if items else 0):
            for item in items:
                try:
                    self.fn(run_dir, item)
                except Exception as e:  # noqa: BLE001 (the item's own error, whatever it is, is its line)
                    log.exception("item %d failed", item)
                    failed[item] = (str(e).splitlines() or [type(e).__name__])[0]
        return failed


def submit_array(ex: submitit.Executor, fn: Any, run_dir: str, items: list[int], cluster: str,
                 throttle: int = 0) -> list[submitit.Job]:
    """One array task per item, as few arrays as MaxArraySize allows (each chunk is offset into `items`)."""
    chunk = max_array_size() if cluster == "slurm" else max(1, len(items))
    jobs: list[submitit.Job] = []
    for offset in range(0, len(items), chunk):
        part = items[offset:offset + chunk]
        if cluster == "slurm" and throttle:
            ex.update_parameters(slurm_array_parallelism=throttle)
        jobs += ex.map_array(fn, [run_dir] * len(part), part)
    return jobs


def viz_gpus(launch: LaunchConfig) -> int:
    """One GPU per array task at most (each task is one process on one shard; several would run the
    same shard N times on one GPU), by default where there is one (resolve_gpus), --gpus 0 for none."""
    gpus = resolve_gpus(launch)
    if gpus > 1:
        log.warning("--gpus %d: each visualization array task uses one GPU; run more tasks (--tasks, "
                    "--throttle) to use more GPUs", gpus)
    return min(gpus, 1)


def stage_launch(launch: LaunchConfig, stage: str) -> LaunchConfig:
    """Array tasks (visualization, projection, feature visualization): one process (one GPU if training had
    GPUs); aggregation: one CPU process."""
    gpus = viz_gpus(launch) if stage in ("viz", "project", "featviz") else 0
    return dataclasses.replace(launch, nproc=1, nodes=1, gpus=gpus, extra=dict(launch.extra))
