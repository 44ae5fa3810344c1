"""HDF5 storage for hpcviz: the packed image set (and, later, activation shards).

This is the only module that imports h5py. Every writer goes through `atomic_path`, so a
crash or a SLURM time-out never leaves a half-written file under the final name: readers
either see the previous complete file or the new complete file.

Packed layout (format ``hpcviz-packed-v1``)::

    /images   (N, 3, H, W) uint8, chunked by 256 images, uncompressed (fast to load whole)
    /labels   (N,) int64
    root attrs: format, classes (JSON list of str), n, image_size (H if square, else 0),
                height, width, plus any caller attrs (source spec, fingerprint, created, ...)
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

__all__ = ["StoreError", "PACKED_FORMAT", "write_packed", "read_packed", "atomic_path"]

PACKED_FORMAT = "hpcviz-packed-v1"
CHUNK_IMAGES = 256  # 256 * 3*32*32 = 768 KiB per chunk: big enough for fast sequential reads
_RESERVED_ATTRS = ("format", "classes", "n", "image_size", "height", "width")
_REBUILD_HINT = "hint: rebuild it with python jobs/pack_data.py --data SPEC --out FILE.h5 --force"


class StoreError(ValueError):
    """An hpcviz HDF5 file is missing, corrupt, truncated or of the wrong format."""


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some filesystems (and Windows) cannot open directories; rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it onto `path`.

    On any exception the temp file is removed and `path` is left exactly as it was.
    The temp lives in the same directory so that os.replace is a same-filesystem atomic rename.
    """
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:  # also KeyboardInterrupt / SLURM's SIGTERM turned into SystemExit
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_path(final.parent, directory=True)  # make the rename itself durable


def _check_packed_inputs(images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                         attrs: Mapping[str, str | int | float]) -> None:
    what = "write_packed"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1] != 3 or images.shape[0] == 0:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise StoreError(f"{what}: images must be a non-empty uint8 numpy array (N, 3, H, W), got {got}; "
                         "hint: pass ImageSet.images.numpy()")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise StoreError(f"{what}: labels must be an integer array of shape ({images.shape[0]},), got "
                         f"{labels.dtype} {labels.shape}; hint: pass ImageSet.labels.numpy()")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise StoreError(f"{what}: classes must be a non-empty sequence of str, got {classes!r}; "
                         "hint: pass ImageSet.classes")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise StoreError(f"{what}: labels must lie in [0, {len(classes) - 1}] (one per class), got "
                         f"[{labels.min()}, {labels.max()}]; hint: check the class list")
    for key, value in attrs.items():
        if key in _RESERVED_ATTRS or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise StoreError(f"{what}: attr {key!r}={value!r} is reserved or not str/int/float; reserved: "
                             f"{', '.join(_RESERVED_ATTRS)}; hint: rename it or convert the value")


def write_packed(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str], attrs: Mapping[str, str | int | float]) -> None:
    """Atomically write a packed image set (layout in the module docstring) to `path`."""
    labels = np.asarray(labels)
    _check_packed_inputs(images, labels, classes, attrs)
    n, _, height, width = images.shape  # (N, 3, H, W)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=np.ascontiguousarray(images),
                         chunks=(min(CHUNK_IMAGES, n), 3, height, width))
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.attrs["format"] = PACKED_FORMAT
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["n"] = n
        f.attrs["image_size"] = height if height == width else 0
        f.attrs["height"], f.attrs["width"] = height, width
        for key, value in attrs.items():
            f.attrs[key] = value


def _plain(value: object) -> object:
    """HDF5 attrs come back as numpy scalars or bytes; hand callers plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _read_packed_open(f: h5py.File, where: str) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if attrs.get("format") != PACKED_FORMAT:
        raise StoreError(f"{where}: format attr is {attrs.get('format')!r}, expected {PACKED_FORMAT!r}; "
                         f"{_REBUILD_HINT}")
    missing = [name for name in ("images", "labels") if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        raise StoreError(f"{where}: missing dataset(s) {', '.join('/' + m for m in missing)}, expected "
                         f"/images and /labels; {_REBUILD_HINT}")
    images, labels = f["images"][()], f["labels"][()]  # (N, 3, H, W) uint8, (N,) int64
    try:
        classes = json.loads(attrs["classes"])
    except (KeyError, TypeError, ValueError):
        classes = None
    ok = (images.ndim == 4 and images.shape[1] == 3 and images.dtype == np.uint8
          and labels.shape == images.shape[:1] and isinstance(classes, list))
    if not ok:
        raise StoreError(f"{where}: inconsistent contents (images {images.dtype} {images.shape}, labels "
                         f"{labels.shape}, classes {attrs.get('classes')!r}), expected (N,3,H,W) uint8, (N,), "
                         f"JSON list; {_REBUILD_HINT}")
    return images, labels.astype(np.int64), [str(c) for c in classes], attrs


def read_packed(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Read a packed image set: (images (N,3,H,W) uint8, labels (N,) int64, classes, attrs)."""
    where = f"packed file {os.fspath(path)}"
    if not os.path.isfile(path):
        raise StoreError(f"{where}: no such file; expected a {PACKED_FORMAT} .h5 file; {_REBUILD_HINT}")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{where}: not an HDF5 file; expected a {PACKED_FORMAT} .h5 file; {_REBUILD_HINT}")
    try:
        with h5py.File(path, "r") as f:
            return _read_packed_open(f, where)
    except OSError as e:  # h5py reports truncation / corrupt chunks as OSError, often multi-line
        reason = " ".join(str(e).split())[:200]
        raise StoreError(f"{where}: unreadable, truncated or corrupt HDF5 ({reason}); {_REBUILD_HINT}") from e
