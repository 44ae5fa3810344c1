"""The run directory: every path in it, its small files, the typed manifest and plan, the lock.

```
results/<run>/
  .lock                  who holds the run now (see rundir.lock)
  config.json            the resolved config of every stage that ran: {"train": ..., "viz": ..., "aggregate": ...}
  manifest.json          one typed record per stage (rundir.manifest)
  logs/                  scheduler logs, one pair per job / array task
  checkpoints/           last.pt + prev.pt with .sha256 sidecars (hpcviz.checkpoint)
  metrics.jsonl          one line per epoch
  eval.json, eval-<name>.json
  viz/plan.json          the visualization plan (rundir.plan); viz/shards/*.h5; viz/viz.h5; viz/examples/;
                         viz/featviz/ (feature visualization parts)
  report/                figures/, tables/, report.md, report.html, report.json
```

One module owns it: other code asks a `RunDir` for paths and never builds them, and only this
package writes the small files (atomically: temp file, fsync, rename). Paths stored inside the run
are relative to it, so a copied or moved run is its own run.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import fsync_path, write_bytes
from .clock import TIME_FORMAT, now
from .lock import RunBusyError, RunLock
from .manifest import Manifest, changed, without_previous
from .plan import SHARD_KEYS, Plan

__all__ = ["RunDir", "RunDirError", "RunBusyError", "RunLock", "Manifest", "Plan", "SHARD_KEYS", "TIME_FORMAT",
           "now", "write_json", "read_json"]

log = logging.getLogger("hpcviz")

class RunDirError(InputError):
    """A run directory, or one of its small files, that cannot be used as it is."""


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, sorted JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # written atomically by us, so someone else broke it
        raise RunDirError(f"{path}: not valid JSON ({e}); hint: restore it, or move it away to have the stage "
                          "that writes it run again") from None


class RunDir:
    """A run directory (it need not exist yet)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ layout
    config_file = property(lambda self: self.path / "config.json")
    manifest_file = property(lambda self: self.path / "manifest.json")
    logs = property(lambda self: self.path / "logs")
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    viz_dir = property(lambda self: self.path / "viz")
    shards_dir = property(lambda self: self.path / "viz" / "shards")
    plan_file = property(lambda self: self.path / "viz" / "plan.json")
    viz_file = property(lambda self: self.path / "viz" / "viz.h5")
    examples_dir = property(lambda self: self.path / "viz" / "examples")  # projection parts (collation)
    featviz_dir = property(lambda self: self.path / "viz" / "featviz")  # feature visualization parts
    report_dir = property(lambda self: self.path / "report")
    lock_file = property(lambda self: self.path / ".lock")

    def eval_file(self, name: str = "") -> Path:
        """eval.json (training's own validation), or eval-<name>.json (config.EvalConfig checks the name)."""
        return self.path / (f"eval-{name}.json" if name else "eval.json")

    def shard(self, k: int) -> Path:
        return self.shards_dir / f"shard-{k:05d}.h5"

    def examples_part(self, k: int) -> Path:
        return self.examples_dir / f"part-{k:05d}.h5"

    def featviz_part(self, k: int) -> Path:
        return self.featviz_dir / f"part-{k:05d}.h5"

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the run directory (how the run's own files name each other)."""
        return Path(os.path.relpath(Path(path).absolute(), self.path.absolute())).as_posix()

    def is_run(self) -> bool:
        return self.path.is_dir() and any(p.exists() for p in (self.config_file, self.manifest_file,
                                                                  self.checkpoints))

    def lock(self, command: str = "") -> RunLock:
        return RunLock(self.lock_file, command)

    # ------------------------------------------------------------------ small files
    def read_config(self) -> dict[str, Any]:
        return read_json(self.config_file, {})

    def write_config(self, stage: str, cfg: Mapping[str, Any]) -> None:
        """config.json[stage] = cfg (the resolved config the stage ran with)."""
        with self._locked():
            write_json(self.config_file, {**self.read_config(), stage: dict(cfg)})

    def read_eval(self, name: str = "") -> dict[str, Any] | None:
        return read_json(self.eval_file(name))

    def write_eval(self, result: Mapping[str, Any], name: str = "") -> Path:
        write_json(self.eval_file(name), dict(result))
        return self.eval_file(name)

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.metrics_file
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k < len(lines) - 1:
                    raise RunDirError(f"{path}: line {k + 1} is not JSON; hint: delete that line") from None
                log.warning("%s: the last line is cut short (a job killed mid-append), ignored", path)
        return records

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl atomically (on resume, to drop the epochs that will be redone)."""
        write_bytes(self.metrics_file, "".join(json.dumps(r) + "\n" for r in records).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ manifest
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """For read-modify-write of the small files: the launcher (login node) and the jobs (compute nodes)
        both update them. Not the run lock, which the launcher holds while its jobs write."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".manifest.json.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # e.g. Lustre mounted without flock: go on unlocked rather than crash
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def manifest(self) -> Manifest:
        content = read_json(self.manifest_file, {})
        if not isinstance(content, dict):
            raise RunDirError(f"{self.manifest_file}: not a JSON object; hint: move it away and rerun")
        return Manifest.from_dict(content)

    def update(self, stage: str, change: Callable[[Any], Mapping[str, Any]] | None = None,
               **fields: Any) -> Manifest:
        """Set fields of one stage's record (or those `change(record)` returns) in one locked
        read-modify-write; the record's `updated` is set too."""
        with self._locked():
            manifest = self.manifest()
            record = manifest.record(stage)
            new = {**(change(record) if change else {}), **fields}
            if new:
                record = changed(record, {"updated": now(), **new})
                setattr(manifest, stage, record)
                write_json(self.manifest_file, manifest.to_dict())
        return manifest

    def begin(self, stage: str, **fields: Any) -> None:
        """Mark `stage` submitted, keeping the record it replaces (see abandon)."""
        self.update(stage, lambda rec: {"previous": rec.previous if rec.status == "submitted" else
                                        without_previous(rec), "status": "submitted", "error": "", **fields})

    def mark_lost(self, stage: str, why: str) -> None:
        """A local job that ended without saying so (killed): its record must not stay 'running'."""
        record = self.manifest().record(stage)
        if record.status in ("running", "submitted"):
            self.update(stage, status="failed", error=why.splitlines()[0])

    def abandon(self, stage: str) -> bool:
        """The submission marked by `begin` never started (refused): put the previous record back."""
        with self._locked():
            manifest = self.manifest()
            record = manifest.record(stage)
            if record.status != "submitted" or record.previous is None:
                return False
            setattr(manifest, stage, type(record)(**record.previous))
            if manifest.to_dict():
                write_json(self.manifest_file, manifest.to_dict())
            else:
                self.manifest_file.unlink()
        return True

    # ------------------------------------------------------------------ plan and shards
    def plan(self) -> Plan | None:
        values = read_json(self.plan_file)
        if values is None:
            return None
        try:
            return Plan.from_dict(values, str(self.path))
        except (TypeError, KeyError, InputError) as e:
            raise RunDirError(f"{self.plan_file}: not a plan this hpcviz can read ({e}); hint: launch the "
                              f"visualization again with --fresh") from None

    def read_plan(self) -> Plan:
        plan = self.plan()
        if plan is None:
            raise RunDirError(f"{self.plan_file}: missing; hint: launch the array with jobs/launch_viz.py")
        return plan

    def write_plan(self, plan: Plan) -> None:
        write_json(self.plan_file, plan.to_dict())

    def remove_shards(self) -> int:
        """Delete every shard (`--fresh`, once the new request has been checked in full)."""
        n = 0
        for p in self.shards_dir.glob("shard-*.h5"):
            p.unlink()
            n += 1
        if n:
            fsync_path(self.shards_dir, directory=True)
        return n
