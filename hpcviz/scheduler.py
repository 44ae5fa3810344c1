"""Job status that never hangs: sacct, else squeue, else scontrol, else the run's own files.

submitit asks sacct; where sacct is missing, misconfigured or slow, a `--wait` built on it
can wait forever. Here each source is asked with a timeout, the result pickles submitit
writes into the run's logs/ are checked directly, and a job that has left the scheduler
without a result ends the wait with the tail of its log.
"""
from __future__ import annotations

import logging
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import DiskFullError, InputError, JobError

log = logging.getLogger("hpcviz")

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class JobFailed(JobError):
    """The job ended without a result, or with an error."""


def _run(cmd: list[str], timeout: float = 20.0) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise OSError(r.stderr.strip() or f"{cmd[0]} exited {r.returncode}")
    return r.stdout


def _sacct(job_id: str) -> str:
    lines = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"]).splitlines()
    for line in lines:
        jid, _, state = line.partition("|")
        if jid.strip() == job_id:
            return state.split()[0] if state.strip() else ""
    return ""


def _squeue(job_id: str) -> str:
    try:
        return _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip().splitlines()[0].strip()
    except (OSError, IndexError):  # "Invalid job id" once the job has left the queue
        return ""


def _scontrol(job_id: str) -> str:
    try:
        out = _run(["scontrol", "show", "job", "-o", job_id])
    except OSError:
        return ""
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


SOURCES: tuple[tuple[str, Callable[[str], str]], ...] = (("sacct", _sacct), ("squeue", _squeue),
                                                         ("scontrol", _scontrol))


def query_state(job_id: str) -> tuple[str, str]:
    """(state, source): the first source that knows the job; ('GONE', 'none') if none does. An ended state from
    the accounting is checked against the queue: a job requeued at its time limit is pending again there while
    sacct can still show its last run's end (FAILED) for a while."""
    found: tuple[str, str] | None = None
    for name, ask in SOURCES:
        try:
            state = ask(job_id)
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("%s failed for job %s: %s", name, job_id, e)
            continue
        if state and found is None:
            found = (state, name)
            if state in ACTIVE or name != "sacct":
                return found
        elif state in ACTIVE:  # the queue holds it again: requeued
            return state, name
        elif found is not None:
            return found
    return found or ("GONE", "none")


def _expand_tasks(job_id: str, array_id: str) -> list[int]:
    """Task indices named by one sacct/squeue JobID: 'A_3' -> [3], 'A_[0-2,5%2]' -> [0, 1, 2, 5]."""
    m = re.fullmatch(rf"{re.escape(array_id)}_(\d+)", job_id)
    if m:
        return [int(m.group(1))]
    m = re.fullmatch(rf"{re.escape(array_id)}_\[([^\]]+)\]", job_id)
    if not m:
        return []
    out: list[int] = []
    for part in m.group(1).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += range(int(lo), int(hi or lo) + 1)
    return out


def array_states(array_id: str) -> dict[int, str]:
    """{task index: state} of an array job: sacct for every task that has one, then squeue's live view
    (one line per task with -r) on top; tasks neither knows are absent. Never hangs (timeouts)."""
    states: dict[int, str] = {}
    for cmd in (["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,State"],
                ["squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T"]):
        try:
            lines = _run(cmd).splitlines()
        except (OSError, subprocess.SubprocessError):
            continue  # squeue: 'Invalid job id' once the whole array has left the queue
        for line in lines:
            jid, _, state = line.partition("|")
            for k in _expand_tasks(jid.strip(), array_id):
                if state.strip():
                    states[k] = state.split()[0]
    return states


def latest_tasks(tasks: dict[str, int]) -> dict[int, str]:
    """{item: newest task id} from {'J_K': item} (manifest viz.tasks): a later array, a retry, wins."""
    order = sorted(tasks, key=lambda t: [int(x) for x in re.findall(r"\d+", t)])
    return {int(tasks[t]): t for t in order}


def task_states(task_ids: Iterable[str]) -> dict[str, str]:
    """{'J_K': state} of array tasks, asking once per array (array_states); tasks no source knows are absent."""
    wanted: dict[str, list[int]] = {}
    for tid in task_ids:
        arr, _, k = tid.partition("_")
        if k.isdigit():
            wanted.setdefault(arr, []).append(int(k))
    out: dict[str, str] = {}
    for arr, ks in wanted.items():
        states = array_states(arr)
        out.update({f"{arr}_{k}": states[k] for k in ks if k in states})
    return out


def result_paths(folder: Path, job_id: str, ntasks: int) -> list[Path]:
    """Where submitit puts each task's (outcome, value) pickle."""
    return [Path(folder) / f"{job_id}_{k}_result.pkl" for k in range(ntasks)]


def read_results(paths: list[Path]) -> list[Any] | None:
    """The tasks' results once all exist; JobFailed if any task raised."""
    if not all(p.exists() for p in paths):
        return None
    out = []
    for p in paths:
        with open(p, "rb") as f:
            outcome, value = pickle.load(f)
        if outcome != "success":
            last = [line for line in str(value).splitlines() if line.strip()]
            raise JobFailed(last[-1] if last else f"task result {p.name}: {outcome}")
        out.append(value)
    return out


def error_class(line: str) -> type | None:
    """The hpcviz error class that the last line of a job's traceback names ('hpcviz.data.sources.DataError: ...'),
    or None for any other line."""
    import importlib
    name = line.split(":", 1)[0].strip()
    module, _, cls = name.rpartition(".")
    if not module.startswith("hpcviz"):
        return None
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def is_input_error(line: str) -> bool:
    """True for the last traceback line of one of hpcviz's bad-input errors (errors.InputError) or of a full
    disk: that line says everything (what, where, the hint), no log tail is needed."""
    found = error_class(line)
    return found is not None and issubclass(found, (InputError, DiskFullError))


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([f"--- {path} (last {lines} lines)"] + text[-lines:])


class LogFollower:
    """Prints what was appended to a log file since the last call."""

    def __init__(self, path: Path, only_dated: bool = False) -> None:
        self.path, self.pos, self.only_dated = Path(path), 0, only_dated

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except OSError:
            return
        text = chunk.decode(errors="replace")
        if self.only_dated:
            text = "".join(line for line in text.splitlines(keepends=True) if line[:2] == "20")
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


def wait_for_job(job_id: str, folder: Path, ntasks: int, follow: bool = False, poll_s: float = 3.0,
                 grace_s: float = 30.0, timeout_s: float | None = None) -> list[Any]:
    """Block until the job's results exist or it has ended without them; never hangs on sacct."""
    paths = result_paths(folder, job_id, ntasks)
    stderr = Path(folder) / f"{job_id}_0_log.err"
    follower = LogFollower(stderr) if follow else None
    last, ended_at, start = "", None, time.monotonic()
    while True:
        try:
            results = read_results(paths)
        except JobFailed as e:
            more = "" if is_input_error(str(e)) else "\n" + tail(stderr)
            raise JobFailed(f"job {job_id} failed: {e}{more}") from None
        if results is not None:
            if follower:
                follower.poll()
            return results
        state, source = query_state(job_id)
        if state != last:
            log.info("job %s: %s (from %s)", job_id, state, source)
            last = state
        if state in ACTIVE:
            ended_at = None
        elif ended_at is None:
            ended_at = time.monotonic()  # results may lag the state on a network file system
        elif time.monotonic() - ended_at > grace_s:
            raise JobFailed(f"job {job_id} ended ({state}, from {source}) without writing its result; "
                            f"hint: read its logs in {folder}\n{tail(stderr)}")
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise JobFailed(f"job {job_id}: still {state} after {timeout_s:.0f} s; it keeps running; "
                            f"hint: check `squeue -j {job_id}`")
        if follower:
            follower.poll()
        time.sleep(poll_s)
