"""Checkpoints and the run directory's small files (config, manifest, metrics, eval).

Checkpoints are torch state dicts (loadable with `weights_only=True`), written
atomically (temp file, fsync, rename) beside a sha256 sidecar. Saving rotates
`last.pt` to `prev.pt`, so a crash at any instant leaves at least one checkpoint
that verifies; loading checks the sha256 and falls back to `prev.pt` with a
warning when `last.pt` is truncated or corrupt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .store import atomic_path

log = logging.getLogger("hpcviz")

CKPT_FORMAT = "hpcviz-checkpoint-v1"
LAST, PREV = "last.pt", "prev.pt"


class CheckpointError(ValueError):
    """No checkpoint that verifies, or one that does not fit the run."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write `data` (temp file, fsync, rename): readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(path, data)


def to_cpu(obj: Any) -> Any:
    """`obj` (a state dict, nested dicts/lists of tensors) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | os.PathLike) -> Path:
    """Write `state` as ckpt_dir/last.pt (+ .sha256), keeping the previous one as prev.pt."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, **to_cpu(state)}, buf)  # CPU tensors: loads on machines without GPUs
    data = buf.getvalue()
    last, prev = ckpt_dir / LAST, ckpt_dir / PREV
    if last.exists() and _verifies(last):
        # keep a good previous checkpoint; a corrupt last.pt is simply replaced
        os.replace(last, prev)
        os.replace(_sidecar(last), _sidecar(prev))
    _write_bytes(last, data)
    _write_bytes(_sidecar(last), (_sha256_bytes(data) + "\n").encode())
    return last


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verifies(path: Path) -> bool:
    """The file matches its own sidecar, or (a save that stopped mid-rotation) the other one."""
    if not path.is_file():
        return False
    sides = [_sidecar(path)] + [_sidecar(path.with_name(n)) for n in (LAST, PREV) if n != path.name]
    known = {s.read_text().strip() for s in sides if s.is_file()}
    return bool(known) and sha256_file(path) in known


def find_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ckpt_dir that verifies (last.pt, else prev.pt with a warning)."""
    ckpt_dir = Path(ckpt_dir)
    last, prev = ckpt_dir / LAST, ckpt_dir / PREV
    if _verifies(last):
        return last
    if _verifies(prev):
        if last.exists():
            log.warning("checkpoint %s does not match its sha256 (truncated or corrupt): using %s", last, prev)
        return prev
    if last.exists() or prev.exists():
        raise CheckpointError(f"{ckpt_dir}: no checkpoint matches its sha256 (truncated or corrupt); "
                              "hint: start a new run with another --run, or remove the directory")
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file or the best one in a directory; verified, weights_only."""
    path = Path(path)
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: holds no checkpoint; hint: train first, or point at a run's checkpoints/")
        path = found
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; hint: pass results/<run>/checkpoints/last.pt")
    elif _sidecar(path).is_file() and not _verifies(path):
        raise CheckpointError(f"{path}: does not match its sha256 (truncated or corrupt); hint: use prev.pt beside it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a bad zip/pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                              "hint: pass a file written by hpcviz or torch.save(state_dict)") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not an hpcviz checkpoint (format {CKPT_FORMAT} expected); "
                              "hint: for torchvision weights use --init instead of --resume")
    state["path"], state["sha256"] = str(path), sha256_file(path)
    return state


# ---- the run directory's small files ---------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # written atomically by us, so someone else broke it
        raise CheckpointError(f"{path}: not valid JSON ({e}); hint: restore it, or move it away to have the "
                              "stage that writes it run again") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # the launcher (login node) and the job (compute node) both update manifest.json
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # e.g. Lustre mounted without flock: go on unlocked rather than crash
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_json(path: str | os.PathLike, key: str, value: Any) -> dict[str, Any]:
    """Set path[key] = value (merging dicts one level deep) under a lock; returns the new content.
    `value` may be a function of the current path[key] (or {}): read, modified and written in one lock."""
    path = Path(path)
    with _locked(path):
        content = read_json(path, {})
        if callable(value):
            value = value(content.get(key, {}))
        if isinstance(value, dict) and isinstance(content.get(key), dict):
            value = {**content[key], **value}
        content[key] = value
        write_json(path, content)
    return content


def update_manifest(run_dir: str | os.PathLike, stage: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("updated", time.strftime("%Y-%m-%dT%H:%M:%S"))
    return update_json(Path(run_dir) / "manifest.json", stage, fields)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise CheckpointError(f"{path}: line {k + 1} is not JSON; hint: delete that line") from None
            log.warning("%s: the last line is cut short (a job killed mid-append), ignored", path)
    return records


def write_metrics(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl atomically (used on resume to drop epochs that will be redone)."""
    _write_bytes(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())


def append_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
