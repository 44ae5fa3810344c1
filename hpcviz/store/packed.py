"""The packed image set (format ``hpcviz-packed-v1``, layout in the package docstring): write_packed, read_packed."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import h5py
import numpy as np

from ._common import StoreError, _plain, atomic_path

PACKED_FORMAT = "hpcviz-packed-v1"
CHUNK_IMAGES = 256  # 256 * 3*32*32 = 768 KiB per chunk: big enough for fast sequential reads
_RESERVED_ATTRS = ("format", "classes", "n", "image_size", "height", "width")
_REBUILD_HINT = "hint: rebuild it with python jobs/pack_data.py --data SPEC --out FILE.h5 --force"


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
    """Atomically write a packed image set (layout in the package docstring) to `path`."""
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
