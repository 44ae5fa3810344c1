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

from ..config import COMPRESSIONS
from ..files import check_space, disk_full, fsync_path, is_disk_full, leftovers
from ._common import (
    StoreError,
    _dataset,
    _datasets,
    _error,
    _get_attrs,
    _open,
    _per_image,
    _set_attrs,
    _write_arrays,
    tag_nxdata,
)

# ============================================================ shards: one file per array task
SHARD_FORMAT = "hpcviz-shard-v1"
# chunks of whole images, about this many bytes: the per-chunk cost of HDF5 vanishes (one image per chunk was
# 8 KiB at ResNet-20's deep blocks: 0.43 of raw write speed), and reading one image still reads one chunk.
# Uncompressed chunks are assembled in memory from the batches and written whole, straight to the file
# (H5Dwrite_chunk): no partial chunk is ever written, then read back to be completed.
CHUNK_BYTES = 2 ** 20
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
        if (compression or "") not in COMPRESSIONS:  # None or '' = none
            raise StoreError(f"{self.where}: compression {compression!r} is not one of {COMPRESSIONS}; hint: none is "
                             "fastest, lzf is fast and h5py-only, gzip is smallest and portable")
        compression = compression or None
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
        self._summaries: set[str] = set()  # datasets over all the shard's images (write_summary)
        self._bytes = [0, 0]  # [of the datasets created, written so far]: each new dataset checks the free space
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in leftovers(self.path):  # a killed writer's leftovers: one live writer per shard by design
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._pending: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # chunk -> (rows, which are set)
        self._flushed: dict[str, set[int]] = {}  # chunks on disk, per dataset
        # v110 format (fixed-array chunk index: cheaper per chunk, still read by HDF5 1.10 tools such as
        # Debian's h5dump); a chunk cache of a few chunks for compressed datasets (batches fill their chunks
        # in parts), uncompressed ones bypass it (see CHUNK_BYTES)
        self._f: h5py.File | None = h5py.File(self.tmp, "w", libver=("v110", "v110"), rdcc_nbytes=4 * CHUNK_BYTES,
                                              rdcc_w0=1.0)
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
                if self.compression is None and ds.chunks is not None:
                    self._write_chunks(name, ds, start, self._convert(ds, array))
                else:
                    ds[start:stop] = self._convert(ds, array)
            except OSError as e:
                self.abort()
                raise disk_full(self.path) if is_disk_full(e) else e from None
        self._ranges[name].append((start, stop))

    def write_summary(self, name: str, array: np.ndarray, *, dims: Sequence[str],
                      attrs: Mapping[str, Any] | None = None) -> None:
        """A dataset over the shard's images as a whole (e.g. topk/<block>/value (C, k)), written at once:
        its first axis must not be 'image' (collation merges these instead of concatenating them)."""
        f, array = self._open_file(), np.asarray(array)
        if len(dims) != array.ndim or (dims and dims[0] == "image") or name in self._ranges or name in self._summaries:
            raise StoreError(f"{self.where}: {name}: a summary needs dims labelling all {array.ndim} axes, the "
                             f"first not 'image', written once (got {tuple(dims)}); hint: per-image rows go "
                             "through write()")
        try:
            _write_arrays(f, {name: (array, dims, attrs or {})}, self.where)
        except OSError as e:
            self.abort()
            raise disk_full(self.path) if is_disk_full(e) else e from None
        self._summaries.add(name)

    def _write_chunks(self, name: str, ds: h5py.Dataset, start: int, array: np.ndarray) -> None:
        """Rows [start, start + len(array)) into their chunks: a chunk that is complete goes to the file whole
        (from the batch itself when the batch covers it, else from its assembled rows); rows of a chunk already
        on disk (a rewrite) go through HDF5, which reads the chunk back."""
        rows, stop = ds.chunks[0], start + len(array)
        pending, flushed = self._pending.setdefault(name, {}), self._flushed.setdefault(name, set())
        zeros = (0,) * (ds.ndim - 1)
        for c in range(start // rows, (stop - 1) // rows + 1):
            lo, hi = c * rows, min((c + 1) * rows, self.n)
            a, b = max(lo, start), min(hi, stop)
            part = array[a - start:b - start]
            if c in flushed:
                ds[a:b] = part
                continue
            if (a, b) == (lo, hi) and hi - lo == rows and c not in pending:
                ds.id.write_direct_chunk((lo, *zeros), np.ascontiguousarray(part))
                flushed.add(c)
                continue
            buf, have = pending.setdefault(c, (np.zeros(ds.chunks, ds.dtype), np.zeros(rows, bool)))
            buf[a - lo:b - lo], have[a - lo:b - lo] = part, True
            if have[:hi - lo].all():  # the last chunk is written whole too, zero-padded past n
                ds.id.write_direct_chunk((lo, *zeros), buf)
                flushed.add(c)
                del pending[c]

    def _create(self, name: str, array: np.ndarray, dims: tuple[str, ...], dtype: Any,
                attrs: Mapping[str, Any]) -> h5py.Dataset:
        dt = np.dtype(dtype if dtype is not None else array.dtype)
        rest = array.shape[1:]
        per_row = max(1, dt.itemsize * math.prod(rest))
        rows = max(1, min(self.n, CHUNK_BYTES // per_row))
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
            tag_nxdata(f)
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
                if _per_image(ds) and ds.shape[:1] != (want,):
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
    """Every dataset path, sorted: ["act/conv1", ..., "images", "index", ...] (summaries included)."""
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
    """Datasets `names` (all if None; all per-image ones when `rows` is given) at `rows` (all if None) of a
    shard or of viz.h5; a summary dataset (no image axis) is read whole."""
    with _open(path) as (f, where):
        if names is None:
            names = [name for name, ds in _datasets(f) if rows is None or _per_image(ds)]
        names = list(names)
        out = {}
        for name in names:
            ds = _dataset(f, name, where)
            out[name] = _read_rows(ds, rows, where) if _per_image(ds) else ds[()]
        return out


def read_summaries(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every summary dataset (no image axis: topk/*, class_mean/*, class_count, ...) of a shard, whole."""
    with _open(path, "shard", _SHARD_HINT) as (f, _):
        return {name: ds[()] for name, ds in _datasets(f) if not _per_image(ds)}


class BackgroundWriter:
    """ShardWriter.write on a thread of its own, at most `depth` writes waiting: the next batch is computed
    while the last one goes to disk. An error of the thread comes back at the next write or at close.
    `seconds`: the time spent writing (for the task's timing). The arrays handed over must not change."""

    def __init__(self, writer: ShardWriter, depth: int = 4) -> None:
        import queue
        import threading
        self.writer, self.seconds = writer, 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after an error, drain without writing
                t0 = time.perf_counter()
                try:
                    name, start, array, kw = item
                    self.writer.write(name, start, array, **kw)
                except BaseException as e:  # handed to the caller at its next call
                    self._error = e
                self.seconds += time.perf_counter() - t0

    def write(self, name: str, start: int, array: np.ndarray, **kw: Any) -> None:
        self._raise()
        self._queue.put((name, start, array, kw))

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for every write; raises the thread's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._error = self._error or exc  # stop writing what is still queued
            self._queue.put(None)
            self._thread.join()
