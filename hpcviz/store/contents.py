"""Inspection: metadata (describe), statistics (dataset_stats) and one image (read_image)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._common import _dataset, _error, _get_attrs, _open


# ============================================================ inspection (metadata, statistics, one image)
def _short(value: Any, limit: int = 120) -> Any:
    """Long attr values cut for display: describe() must stay small whatever a file holds."""
    if isinstance(value, list) and len(value) > 8:
        return [_short(v, limit) for v in value[:8]] + [f"... ({len(value)} items)"]
    if isinstance(value, list):
        return [_short(v, limit) for v in value]
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else None
    if text is not None and len(text) > limit:
        return f"{text[:limit]}... ({len(text)} chars)"
    return value


def _meta(ds: h5py.Dataset) -> dict[str, Any]:
    virtual = ds.is_virtual
    return {"kind": "dataset", "shape": tuple(ds.shape), "dtype": str(ds.dtype), "chunks": ds.chunks,
            "compression": ds.compression, "compression_opts": ds.compression_opts, "shuffle": ds.shuffle,
            "is_virtual": virtual, "sources": len({m.file_name for m in ds.virtual_sources()}) if virtual else 0,
            "dims": [d.label for d in ds.dims], "scales": [list(d.keys()) for d in ds.dims],
            "is_scale": ds.is_scale, "nbytes": int(ds.size * ds.dtype.itemsize),
            "storage_bytes": int(ds.id.get_storage_size())}


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Root attrs and every group's / dataset's metadata (shape, dtype, chunks, filters, virtual, dims,
    attrs with long values cut); never reads dataset values, so it works on any size of file."""
    with _open(path) as (f, _):
        objects: list[dict[str, Any]] = []

        viewers = [k for k in f if isinstance(f[k], h5py.Group) and f[k].attrs.get("NX_class") == "NXentry"]

        def visit(name: str, obj: h5py.HLObject) -> None:
            if name.split("/")[0] in viewers:  # the soft links for HDF5 viewers (tag_nxdata): no data of their own
                return
            entry = {"name": name, "kind": "group", "attrs": {k: _short(v) for k, v in _get_attrs(obj).items()}}
            objects.append({**entry, **_meta(obj)} if isinstance(obj, h5py.Dataset) else entry)

        f.visititems(visit)
        return {"path": os.fspath(path), "file_bytes": Path(path).stat().st_size,
                "attrs": {k: _short(v) for k, v in _get_attrs(f).items()},
                "objects": sorted(objects, key=lambda e: e["name"])}


_STATS_ELEMS = 2 ** 21  # values per block read by dataset_stats (16 MiB as float64): bounded memory


class _Moments:
    """Running count / mean / M2 (Chan et al. merge) over the finite values, plus NaN, inf, zero counts."""

    def __init__(self) -> None:
        self.count = self.finite = self.nan = self.inf = self.zeros = 0
        self.mean = self.m2 = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, block: np.ndarray) -> None:
        x = np.asarray(block, dtype=np.float64).reshape(-1)
        ok = np.isfinite(x)
        y = x[ok]
        nan = int(np.isnan(x).sum())
        self.count, self.nan, self.inf = self.count + x.size, self.nan + nan, self.inf + x.size - y.size - nan
        if y.size:
            mean, k = float(y.mean()), self.finite + y.size
            delta = mean - self.mean
            self.m2 += float(((y - mean) ** 2).sum()) + delta * delta * self.finite * y.size / k
            self.mean += delta * y.size / k
            self.finite, self.zeros = k, self.zeros + int(np.count_nonzero(y == 0))
            self.lo, self.hi = min(self.lo, float(y.min())), max(self.hi, float(y.max()))

    def result(self) -> dict[str, Any]:
        some = self.finite > 0  # min/max/mean/std are over the finite values; None when there are none
        return {"count": self.count, "finite": self.finite, "nan": self.nan, "inf": self.inf, "zeros": self.zeros,
                "min": self.lo if some else None, "max": self.hi if some else None,
                "mean": self.mean if some else None, "std": math.sqrt(self.m2 / self.finite) if some else None}


def _check_index(ds: h5py.Dataset, index: int, where: str) -> int:
    n = ds.shape[0] if ds.ndim else 0
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise _error(where, f"index {index!r} out of range for /{ds.name.strip('/')} of {n} images; valid: "
                            f"0..{n - 1}", "hint: pass --index within the range")
    return int(index)


def dataset_stats(path: str | os.PathLike, name: str, index: int | None = None) -> dict[str, Any]:
    """min, max, mean, std (finite values), NaN / inf / zero counts of one image (`index`) or of the whole
    dataset, read in blocks of images so memory stays bounded whatever its size."""
    with _open(path) as (f, where):
        ds = _dataset(f, name, where)
        moments = _Moments()
        if index is not None:
            moments.add(ds[_check_index(ds, index, where)])
            shape = ds.shape[1:]
        elif ds.ndim == 0:
            moments.add(ds[()])
            shape = ()
        else:
            step = max(1, _STATS_ELEMS // max(1, math.prod(ds.shape[1:])))
            for start in range(0, ds.shape[0], step):
                moments.add(ds[start:start + step])  # (step, *rest)
            shape = ds.shape
        return {"name": ds.name.strip("/"), "dtype": str(ds.dtype), "shape": tuple(shape), "index": index,
                **moments.result()}


def read_image(path: str | os.PathLike, name: str, index: int) -> np.ndarray:
    """Row `index` of dataset `name`, e.g. images (3, H, W) or act/layer1.0 (C, h, w)."""
    with _open(path) as (f, where):
        ds = _dataset(f, name, where)
        return ds[_check_index(ds, index, where)]
