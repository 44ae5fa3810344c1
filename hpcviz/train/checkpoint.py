"""Checkpoints: the only code that reads and writes checkpoints/ (the rest of the run directory is
hpcviz.rundir's).

Checkpoints are torch state dicts (loadable with `weights_only=True`), written
atomically (temp file, fsync, rename) beside a sha256 sidecar. Saving rotates
`last.pt` to `prev.pt`, so a crash at any instant leaves at least one checkpoint
that verifies; loading checks the sha256 and falls back to `prev.pt` with a
warning when `last.pt` is truncated or corrupt.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, default_stem
from ..errors import InputError
from ..files import atomic_path, write_bytes

log = logging.getLogger("hpcviz")

CKPT_FORMAT = "hpcviz-checkpoint-v1"
LAST, PREV = "last.pt", "prev.pt"


class CheckpointError(InputError):
    """No checkpoint that verifies, or one that does not fit the run."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    # the new file is whole on disk before anything is renamed: a full disk leaves last.pt and prev.pt as they were
    with atomic_path(last, needed=len(data) + 4096) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        if last.exists() and _verifies(last):
            # keep a good previous checkpoint; a corrupt last.pt is simply replaced
            known = _WRITTEN.pop(last.absolute(), None)
            os.replace(last, prev)
            os.replace(_sidecar(last), _sidecar(prev))
            if known is not None:  # a rename keeps the size and mtime
                _remember(prev, known[2])
        sha = _sha256_bytes(data)
        write_bytes(_sidecar(last), (sha + "\n").encode())
    _remember(last, sha)
    return last


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# checkpoints this process wrote: path -> (size, mtime_ns, sha256). Saving verifies last.pt before keeping it as
# prev.pt; for a file this process wrote and nobody touched since, that costs a stat, not a hash of the file
_WRITTEN: dict[Path, tuple[int, int, str]] = {}


def _remember(path: Path, sha: str) -> None:
    st = path.stat()
    _WRITTEN[path.absolute()] = (st.st_size, st.st_mtime_ns, sha)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256_file, without reading a checkpoint this process wrote and nobody changed since."""
    path = Path(path)
    st = path.stat()
    size, mtime, sha = _WRITTEN.get(path.absolute(), (-1, -1, ""))
    return sha if (size, mtime) == (st.st_size, st.st_mtime_ns) else sha256_file(path)


def _verifies(path: Path) -> bool:
    """The file matches its own sidecar, or (a save that stopped mid-rotation) the other one."""
    if not path.is_file():
        return False
    sides = [_sidecar(path)] + [_sidecar(path.with_name(n)) for n in (LAST, PREV) if n != path.name]
    known = {s.read_text().strip() for s in sides if s.is_file()}
    return bool(known) and file_sha256(path) in known


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


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) without its UserWarnings (a plain pickle of protocol > 2 warns twice before
    it is refused): the caller turns a refusal into its own one-line error."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


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
        state = torch_load(path, map_location)
    except Exception as e:  # torch raises several types for a bad zip/pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                              "hint: pass a file written by hpcviz or torch.save(state_dict)") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not an hpcviz checkpoint (format {CKPT_FORMAT} expected); "
                              "hint: for torchvision weights use --init instead of --resume")
    state["path"], state["sha256"] = str(path), sha256_file(path)
    return state


def check_resumable(state: dict[str, Any], cfg: TrainConfig, num_classes: int | None, fingerprint: str | None) -> None:
    """Refuse to continue a checkpoint of another architecture, stem, class count or data set (None: not known
    here; the job checks again with the data loaded)."""
    old = state["config"]
    mine = (cfg.arch, cfg.resolved_stem(), num_classes)
    theirs = (old["arch"], old.get("stem") or default_stem(old["arch"]), len(state["classes"]))
    if mine != theirs and num_classes is not None or mine[:2] != theirs[:2]:
        raise CheckpointError(
            f"--resume {state['path']}: the checkpoint is arch {theirs[0]} stem {theirs[1]} with {theirs[2]} classes, "
            f"this run is arch {mine[0]} stem {mine[1]} with {mine[2] or '?'} classes; hint: resume with the same "
            "--arch/--stem/--data, or start a new --run")
    if fingerprint and state.get("data_fingerprint") and fingerprint != state["data_fingerprint"]:
        raise CheckpointError(
            f"--resume {state['path']}: the checkpoint was trained on other data (--data {old.get('data')}, "
            f"fingerprint {state['data_fingerprint'][:12]}), this --data {cfg.data} has fingerprint "
            f"{fingerprint[:12]}; "
            "hint: resume with the same --data, or start a new --run with --init to fine-tune")
