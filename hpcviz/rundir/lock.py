"""The run's lock: one command at a time may change a run directory.

`<run>/.lock` names who holds the run: the process (pid, host, command line, since when) and the
jobs it left running (SLURM job ids, or the pids of local jobs). A command takes it with an
exclusive `flock` on the file, so a process that dies loses it at once, and writes its record; it
releases it by removing the file, or, when it submitted SLURM jobs and returned, by leaving its record
for them: later commands are refused while those jobs are pending or running.

A second command is refused at once, naming the holder and the lock file. A record whose process is
dead (pid gone on this host) or whose jobs have all ended is stale: it is taken over, with a warning.
Where `flock` does not work (some parallel file systems), the record alone decides.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..scheduler import ACTIVE, array_states, query_state
from .clock import now

log = logging.getLogger("hpcviz")


class RunBusyError(InputError):
    """Another command or job holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that nobody waited for yet is a zombie: dead for us
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _job_state(job: dict[str, Any], host: str) -> str:
    """The state of a job the holder left ('' when it has ended)."""
    if job.get("cluster") == "slurm":
        working = ACTIVE - {"COMPLETING"}  # a completing job has written its results
        if job.get("array"):
            states = [s for s in array_states(str(job["id"])).values() if s in working]
            return states[0] if states else ""
        state = query_state(str(job["id"]))[0]
        return state if state in working else ""
    if job.get("cluster") == "local" and str(job.get("id", "")).isdigit():
        if host != socket.gethostname():
            return "on another host"
        return "running" if _pid_alive(int(job["id"])) else ""
    return ""


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}, since "
            f"{holder.get('since', '?')})")


class RunLock:
    """`with RunLock(run_dir / '.lock', 'launch_pipeline.py ...'):` holds the run for this process."""

    def __init__(self, path: str | os.PathLike, command: str = "") -> None:
        self.path = Path(path)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.fd: int | None = None
        self.jobs: list[dict[str, Any]] = []
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command[:300],
                       "since": now(), "jobs": self.jobs}

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # the file may be replaced between open and flock: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._take(fd):
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise RunBusyError(f"--run {self.path.parent}: could not take the lock {self.path} (it keeps changing); "
                           "hint: try again")

    def _take(self, fd: int) -> bool:
        """True once this process holds the run; False to retry; RunBusyError when another holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            raise self._busy(_read(fd), "holds it now") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            flocked = False  # no flock on this file system: the record alone decides
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # released (removed) while we waited: lock the new file instead
        except FileNotFoundError:
            return False
        holder = _read(fd)
        if holder:
            why = self._still_held(holder, flocked)
            if why:
                raise self._busy(holder, why)
            if not holder.get("released"):
                log.warning("took over the stale lock %s of %s: that process is gone", self.path, describe(holder))
        _write(fd, self.record)
        return True

    def _still_held(self, holder: dict[str, Any], flocked: bool) -> str:
        """Why `holder`'s record still holds the run ('' when it is stale)."""
        active = [f"{j.get('cluster', '')} job {j.get('id')} ({state})" for j in holder.get("jobs") or []
                  if (state := _job_state(j, holder.get("host", "")))]
        if active:
            return "its jobs are still queued or running: " + ", ".join(active[:4])
        if holder.get("released"):
            return ""
        pid = int(holder.get("pid") or 0)
        if holder.get("host") != socket.gethostname():
            return "from another host, where this one cannot tell whether it still runs"
        if pid and pid != os.getpid() and _pid_alive(pid):
            return "it is still running" if not flocked else "its process is still alive"
        return ""

    def _busy(self, holder: dict[str, Any], why: str) -> RunBusyError:
        run = self.path.parent
        who = describe(holder) if holder else "another process (starting up)"
        jobs = [str(j.get("id")) for j in (holder or {}).get("jobs") or [] if j.get("cluster") == "slurm"]
        hint = (f"wait for it (python jobs/launch_pipeline.py --run {run} --status --wait), or scancel "
                f"{' '.join(jobs)}" if jobs else "wait for it to finish, or stop it; if it is gone for sure, "
                f"delete {self.path}")
        return RunBusyError(f"--run {run} is in use: {who} {why}; lock file {self.path}; hint: {hint}")

    def add_jobs(self, ids: list[str], cluster: str, array: bool = False) -> None:
        """Jobs that work on the run for this command; a SLURM job keeps holding it after we return."""
        self.jobs += [{"id": str(i), "cluster": cluster, **({"array": True} if array else {})} for i in ids]
        if self.fd is not None:
            _write(self.fd, self.record)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if any(j["cluster"] == "slurm" for j in self.jobs):
                _write(fd, {**self.record, "released": True})  # the jobs hold the run now
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # drops the flock


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
