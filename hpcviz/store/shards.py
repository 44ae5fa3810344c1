"""Shards (``hpcviz-shard-v1``, one file per array task): ShardWriter, verify_shard, read_shard,
list_datasets, read_attrs."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..files import check_space, disk_full, fsync_path, is_disk_full, leftovers
from ._common import StoreError, _dataset, _datasets, _error, _get_attrs, _open, _set_attrs

# ============================================================ shards: one file per array task
SHARD_FORMAT = "hpcviz-shard-v1"
COMPRESSIONS = (None, "gzip", "lzf")
_SMALL_CHUNK_BYTES = 64 * 2 ** 10  # per-image scalars/vectors: one chunk of 8 bytes per image wastes I/O
_SHARD_RESERVED = ("format", "n", "complete", "json_attrs")
_SHARD_HINT = "hint: rerun the array task that writes it (a shard that verifies is skipped)"


def _first_gap(ranges: list[tuple[int, int]], n: int) -> tuple[int, int] | None:
    pos = 0
    for start, stop in sorted(ranges):
        if start > pos:
            return pos, start
        pos = max(pos, stop)
    return (pos, n) if pos < n else None


def _to_half(array: np.ndarray) -> np.ndarray:
    """float16 copy of `array`. numpy's cast is scalar code (~110 M values/s measured); torch's is
    vectorised (~600 M/s), so use it for float32 when the caller has imported torch anyway (same bits)."""
    torch = sys.modules.get("torch")
    if torch is not None and array.dtype == np.float32:  # float64 would round twice in torch
        return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(torch.float16).numpy()
    with np.errstate(over="ignore"):  # overflow is counted by the caller instead of a warning per batch
        return np.ascontiguousarray(array, dtype=np.float16)


class ShardWriter:
    """One array task's shard: written to a temp file beside `path`, renamed onto `path` only by close()
    after every dataset is full; the root attr `complete` = True is written last. A killed writer leaves
    only a `*.tmp-<pid>` file that nothing accepts (and that the next writer of the same shard removes).

    Use as a context manager: close() on success, abort() on an exception (SIGTERM turned into
    SystemExit included). Datasets are created on first write with shape (n, *rest).
    """

    def __init__(self, path: str | os.PathLike, n: int, attrs: Mapping[str, Any],
                 compression: str | None = None) -> None:
        self.path, self.where = Path(path), f"shard {os.fspath(path)}"
        if compression not in COMPRESSIONS:
            raise StoreError(f"{self.where}: compression {compression!r} is not one of None, 'gzip', 'lzf'; "
                             "hint: None is fastest, lzf is fast and h5py-only, gzip is smallest and portable")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise StoreError(f"{self.where}: n={n!r} must be an int >= 0 (images in the shard); "
                             "hint: pass len(indices)")
        reserved = [k for k in attrs if k in _SHARD_RESERVED]
        if reserved:
            raise StoreError(f"{self.where}: attrs {reserved} are reserved (set by the writer: "
                             f"{', '.join(_SHARD_RESERVED)}); hint: rename them")
        self.n, self.compression = int(n), compression
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # rows written, per dataset
        self._dims: dict[str, tuple[str, ...]] = {}
        self._handles: dict[str, h5py.Dataset] = {}  # an h5py lookup by name costs as much as a small write
        self._bytes = [0, 0]  # [of the datasets created, written so far]: each new dataset checks the free space
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in leftovers(self.path):  # a killed writer's leftovers: one live writer per shard by design
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        # v110 format (fixed-array chunk index: cheaper per chunk, still read by HDF5 1.10 tools such as
        # Debian's h5dump) and no chunk cache (each chunk is written once, whole): ~40% faster measured
        self._f: h5py.File | None = h5py.File(self.tmp, "w", libver=("v110", "v110"), rdcc_nbytes=0)
        try:
            _set_attrs(self._f, {**attrs, "format": SHARD_FORMAT, "n": self.n, "complete": False}, self.where)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_file(self) -> h5py.File:
        if self._f is None:
            raise StoreError(f"{self.where}: the writer is closed or aborted; hint: make a new ShardWriter")
        return self._f

    def write(self, name: str, start: int, array: np.ndarray, *, dims: Sequence[str],
              dtype: Any = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Write rows [start, start + len(array)) of dataset `name` (created on the first write)."""
        self._open_file()  # raises once closed or aborted
        array, start = np.asarray(array), int(start)  # (b, *rest)
        if array.ndim == 0 or len(dims) != array.ndim:
            raise StoreError(f"{self.where}: {name}: dims {tuple(dims)} must label all {array.ndim} axes of an "
                             f"array {array.shape} (axis 0 = image); hint: e.g. dims=('image', 'channel', 'y', 'x')")
        ds = self._handles.get(name) or self._create(name, array, tuple(dims), dtype, attrs or {})
        stop = start + len(array)
        if ds.shape[1:] != array.shape[1:] or not 0 <= start <= stop <= self.n:
            raise StoreError(f"{self.where}: {name}: cannot write rows [{start}, {stop}) of shape {array.shape[1:]}; "
                             f"valid: rows within [0, {self.n}) of shape {ds.shape[1:]}; hint: check the batch loop")
        if tuple(dims) != self._dims[name]:
            raise StoreError(f"{self.where}: {name}: dims {tuple(dims)} differ from the first write's "
                             f"{self._dims[name]}; hint: pass the same dims on every write")
        if stop > start:
            self._bytes[1] += array.nbytes if ds.dtype == array.dtype else ds.dtype.itemsize * array.size
            try:
                ds[start:stop] = self._convert(ds, array)
            except OSError as e:
                self.abort()
                raise disk_full(self.path) if is_disk_full(e) else e from None
        self._ranges[name].append((start, stop))

    def _create(self, name: str, array: np.ndarray, dims: tuple[str, ...], dtype: Any,
                attrs: Mapping[str, Any]) -> h5py.Dataset:
        dt = np.dtype(dtype if dtype is not None else array.dtype)
        rest = array.shape[1:]
        # images and maps (ndim >= 3): one image per chunk, as the layout says; per-image scalars and
        # vectors (index, label, logits, ...): many images per chunk, up to 64 KiB
        per_row = max(1, dt.itemsize * math.prod(rest))
        rows = 1 if array.ndim >= 3 else max(1, min(self.n, _SMALL_CHUNK_BYTES // per_row))
        filters = {} if self.compression is None else {"compression": self.compression, "shuffle": True}
        chunks = (rows, *rest) if self.n and all(rest) else None  # HDF5 refuses chunks larger than the data
        self._bytes[0] += self.n * dt.itemsize * math.prod(rest)
        if self.compression is None:  # refuse now, not when the disk is full halfway through the task
            try:
                check_space(self.path, self._bytes[0] - self._bytes[1])
            except BaseException:
                self.abort()
                raise
        ds = self._open_file().create_dataset(name, shape=(self.n, *rest), dtype=dt, chunks=chunks,
                                              **(filters if chunks else {}))
        for axis, label in enumerate(dims):
            ds.dims[axis].label = label
        _set_attrs(ds, {**attrs, **({"fp16_overflow": 0} if dt == np.float16 else {})}, f"{self.where}: {name}")
        self._ranges[name], self._dims[name], self._handles[name] = [], dims, ds
        return ds

    @staticmethod
    def _convert(ds: h5py.Dataset, array: np.ndarray) -> np.ndarray:
        if ds.dtype != np.float16:
            return np.ascontiguousarray(array, dtype=ds.dtype)
        wide_infs = 0
        if array.dtype != np.float16:
            wide_infs = int(np.count_nonzero(np.isinf(array))) if array.dtype.kind == "f" else 0
            array = _to_half(array)
        # +-inf in the stored data that were finite before (|x| > 65504); when the caller converts (e.g. on
        # the GPU) every stored inf counts, as we cannot tell; either way the report can flag it
        overflow = int(np.count_nonzero((array.view(np.uint16) & 0x7FFF) == 0x7C00)) - wide_infs
        if overflow:
            ds.attrs["fp16_overflow"] = int(ds.attrs["fp16_overflow"]) + overflow
        return array

    def close(self) -> Path:
        """Check every dataset is full, mark complete, fsync, rename onto `path`; abort on any failure."""
        f = self._open_file()
        try:
            for name, ranges in self._ranges.items():
                gap = _first_gap(ranges, self.n)
                if gap:
                    raise StoreError(f"{self.where}: dataset {name!r} rows [{gap[0]}, {gap[1]}) of {self.n} were "
                                     "never written; hint: write every batch before close() (check the batch loop)")
            index = f.get("index")
            if isinstance(index, h5py.Dataset):  # attach at the end: callers may write /index in any order
                index.make_scale("index")
                for name in self._ranges:
                    if name != "index":
                        f[name].dims[0].attach_scale(index)
            f.attrs["complete"] = True  # last: a file without it is never accepted
            f.close()
            self._f = None
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort()
            if is_disk_full(e):
                raise disk_full(self.path) from None
            raise
        fsync_path(self.path.parent, directory=True)
        return self.path

    def abort(self) -> None:
        """Drop the temp file; `path` (an earlier complete shard, if any) is left as it was."""
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


# ============================================================ reading shards and viz.h5
def _shard_problem(path: Path, n: int | None) -> tuple[str | None, dict[str, Any]]:
    """(what is wrong with the shard or None, its root attrs): shared by verify_shard and collate."""
    try:
        with _open(path, "shard", _SHARD_HINT) as (f, _):
            attrs = _get_attrs(f)
            if attrs.get("format") != SHARD_FORMAT:
                return f"format attr is {attrs.get('format')!r}, expected {SHARD_FORMAT!r}", attrs
            if attrs.get("complete") is not True:
                return "incomplete (root attr complete is not True: its writer did not finish)", attrs
            want = attrs.get("n") if n is None else n
            for name, ds in _datasets(f):
                if ds.shape[:1] != (want,):
                    return f"dataset {name} has shape {ds.shape}, expected {want} rows", attrs
            if attrs.get("n") != want:
                return f"holds {attrs.get('n')} images, expected {want}", attrs
            return None, attrs
    except StoreError as e:
        return getattr(e, "problem", str(e)), {}


def verify_shard(path: str | os.PathLike, n: int | None = None) -> dict[str, Any]:
    """Root attrs of a complete shard (of `n` images, if given); one-line StoreError otherwise."""
    problem, attrs = _shard_problem(Path(path), n)
    if problem:
        raise _error(f"shard {os.fspath(path)}", problem, _SHARD_HINT)
    return attrs


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Root attrs of any hpcviz HDF5 file (shard, viz.h5, packed) as plain Python values."""
    with _open(path) as (f, _):
        return _get_attrs(f)


def list_datasets(path: str | os.PathLike) -> list[str]:
    """Every dataset path, sorted: ["act/conv1", ..., "images", "index", ...]."""
    with _open(path) as (f, _):
        return [name for name, _ in _datasets(f)]


def _read_rows(ds: h5py.Dataset, rows: slice | Sequence[int] | None, where: str) -> np.ndarray:
    if rows is None or ds.ndim == 0:
        return ds[()]
    if isinstance(rows, slice) and (rows.step or 1) > 0:
        return ds[rows]
    n = ds.shape[0]
    idx = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise _error(where, f"rows {idx.min()}..{idx.max()} of {ds.name} out of range; valid: 0..{n - 1}",
                     "hint: check the row numbers")
    if idx.size == 0:
        return np.empty((0, *ds.shape[1:]), ds.dtype)
    unique, inverse = np.unique(np.where(idx < 0, idx + n, idx), return_inverse=True)
    return ds[unique][inverse]  # h5py selects increasing unique rows only


def read_shard(path: str | os.PathLike, names: Sequence[str] | None = None,
               rows: slice | Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Datasets `names` (all if None) at `rows` (all if None) of a shard or of viz.h5."""
    with _open(path) as (f, where):
        names = [name for name, _ in _datasets(f)] if names is None else list(names)
        return {name: _read_rows(_dataset(f, name, where), rows, where) for name in names}
