"""The packed image set (format ``hpcviz-packed-v1``, layout in the package docstring): write_packed
(whole array), PackedWriter (batch by batch), read_packed (whole file), PackedReader (rows, in parallel).

/images is written contiguous and uncompressed: row i is the `row bytes` at one file offset + i * row
bytes, so PackedReader reads a batch's rows with plain preads, no HDF5 call, the GIL released, several
threads at once. Files written before that (/images chunked by 256 images) still read everywhere:
PackedReader falls back to h5py reads under a lock for them (correct, slower) and says so once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..files import check_space
from ._common import StoreError, _plain, atomic_path

PACKED_FORMAT = "hpcviz-packed-v1"
_RESERVED_ATTRS = ("format", "classes", "n", "image_size", "height", "width")
_WRITER_ATTRS = (*_RESERVED_ATTRS, "fingerprint")  # PackedWriter computes the fingerprint itself
_COPY_BYTES = 64 * 2 ** 20  # sequential passes (the shrinking copy) move this much at a time
_REBUILD_HINT = "hint: rebuild it with python jobs/pack_data.py --data SPEC --out FILE.h5 --force"
log = logging.getLogger("hpcviz")
_told_chunked: set[str] = set()  # packed files already reported as slow (chunked): say it once per process


def _check_batch(what: str, images: np.ndarray, labels: np.ndarray, n_classes: int | None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1] != 3 or images.shape[0] == 0:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise StoreError(f"{what}: images must be a non-empty uint8 numpy array (N, 3, H, W), got {got}; "
                         "hint: pass ImageSet.images.numpy()")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise StoreError(f"{what}: labels must be an integer array of shape ({images.shape[0]},), got "
                         f"{labels.dtype} {labels.shape}; hint: pass ImageSet.labels.numpy()")
    if n_classes is not None and (labels.min() < 0 or labels.max() >= n_classes):
        raise StoreError(f"{what}: labels must lie in [0, {n_classes - 1}] (one per class), got "
                         f"[{labels.min()}, {labels.max()}]; hint: check the class list")


def _check_meta(what: str, classes: Sequence[str], attrs: Mapping[str, str | int | float],
                reserved: Sequence[str]) -> None:
    if not classes or isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise StoreError(f"{what}: classes must be a non-empty sequence of str, got {classes!r}; "
                         "hint: pass ImageSet.classes")
    for key, value in attrs.items():
        if key in reserved or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise StoreError(f"{what}: attr {key!r}={value!r} is reserved or not str/int/float; reserved: "
                             f"{', '.join(reserved)}; hint: rename it or convert the value")


def _check_packed_inputs(images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                         attrs: Mapping[str, str | int | float]) -> None:
    _check_batch("write_packed", images, labels, None)
    _check_meta("write_packed", classes, attrs, _RESERVED_ATTRS)
    _check_batch("write_packed", images, labels, len(classes))  # the label range needs valid classes


def _write_rest(f: h5py.File, labels: np.ndarray, classes: Sequence[str], height: int, width: int,
                attrs: Mapping[str, str | int | float]) -> None:
    """Everything but /images: /labels and the root attrs."""
    f.create_dataset("labels", data=labels.astype(np.int64))
    f.attrs["format"] = PACKED_FORMAT
    f.attrs["classes"] = json.dumps(list(classes))
    f.attrs["n"] = labels.shape[0]
    f.attrs["image_size"] = height if height == width else 0
    f.attrs["height"], f.attrs["width"] = height, width
    for key, value in attrs.items():
        f.attrs[key] = value


def write_packed(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str], attrs: Mapping[str, str | int | float]) -> None:
    """Atomically write a packed image set (layout in the package docstring) to `path`."""
    labels = np.asarray(labels)
    _check_packed_inputs(images, labels, classes, attrs)
    _, _, height, width = images.shape  # (N, 3, H, W)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=np.ascontiguousarray(images))  # contiguous: PackedReader preads rows
        _write_rest(f, labels, classes, height, width, attrs)


def _shape_hash(shape: tuple[int, int, int, int]) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(json.dumps(list(shape)).encode())  # hpcviz.data.fingerprint hashes the shape first
    return h


def _hash_tail(h: hashlib._Hash, labels: np.ndarray, classes: Sequence[str]) -> str:
    h.update(labels.astype("<i8").tobytes())
    h.update(json.dumps(list(classes)).encode())
    return h.hexdigest()


def fingerprint_blocks(shape: Sequence[int], blocks: Iterable[np.ndarray], labels: np.ndarray,
                       classes: Sequence[str]) -> str:
    """hpcviz.data.sources.fingerprint of a set of `shape` (N, 3, H, W) whose images arrive as uint8 blocks in order:
    one bounded pass, for sets that are never held whole."""
    h = _shape_hash(tuple(int(v) for v in shape))  # type: ignore[arg-type]
    for block in blocks:
        h.update(np.ascontiguousarray(block).data.cast("B"))
    return _hash_tail(h, np.asarray(labels), classes)


class _Aborted(Exception):
    """Thrown into atomic_path to make it drop the temp file when abort() is called without an error."""


class PackedWriter:
    """Write a packed file batch by batch in bounded memory, atomically: nothing appears at `path` until
    close() succeeds; an exception inside ``with`` (or abort()) leaves `path` as it was, no temp behind.

    `n` images are planned; fewer may be appended (unreadable files skipped): close() then copies them
    in chunks into a right-sized file, since a contiguous dataset cannot shrink. close() stores the attr
    ``fingerprint``, the value hpcviz.data.fingerprint gives for the same set (sha256 over json(list(shape)),
    the image bytes in order, the labels as int64 LE, json(list(classes))), computed as the batches are
    written, or during the copy when fewer came (the shape, hashed first, is only known then).
    """

    def __init__(self, path: str | os.PathLike, n: int, height: int, width: int, classes: Sequence[str],
                 attrs: Mapping[str, str | int | float]) -> None:
        self.what, self.path = f"PackedWriter {os.fspath(path)}", Path(path)
        if min(n, height, width) < 1:
            raise StoreError(f"{self.what}: n={n}, height={height}, width={width} must all be >= 1; "
                             "hint: plan at least one image")
        _check_meta(self.what, classes, attrs, _WRITER_ATTRS)
        self.n, self.height, self.width, self.count, self.fingerprint = n, height, width, 0, ""
        self.classes, self.attrs = list(classes), dict(attrs)
        self._shape = (n, 3, height, width)  # (N, 3, H, W) as planned
        self._labels = np.empty(n, np.int64)  # (N,) 8 bytes per image: small next to the images
        self._hash = _shape_hash(self._shape)
        # the whole file's space is checked first: HDF5 on a full disk fails late, or worse
        self._atomic: Any = atomic_path(path, needed=n * 3 * height * width + 9 * n)
        self._tmp = self._atomic.__enter__()
        self._small = self._tmp.with_name(self._tmp.name + "-small")  # the right-sized copy, if needed
        self._f: Any = None  # h5py.File while writing
        try:
            self._f = h5py.File(self._tmp, "w")
            self._images = self._f.create_dataset("images", shape=self._shape, dtype=np.uint8)  # contiguous
        except BaseException as e:
            self.abort(e)
            raise

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
        elif self._atomic is not None:
            self.abort(exc)

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Write the next b images (b, 3, H, W) uint8 and their labels (b,) after those appended so far."""
        labels = np.asarray(labels)
        _check_batch(self.what, images, labels, len(self.classes))
        b = images.shape[0]
        if self._atomic is None or images.shape[1:] != self._shape[1:] or self.count + b > self.n:
            state = "closed" if self._atomic is None else f"{self.count} of {self.n} images written"
            raise StoreError(f"{self.what}: cannot append {images.shape} ({state}); valid: batches of "
                             f"(b, {', '.join(map(str, self._shape[1:]))}), {self.n} images in all; "
                             "hint: plan n and the image size before writing")
        images = np.ascontiguousarray(images)
        self._images[self.count:self.count + b] = images  # one write into the contiguous block
        self._hash.update(images.data)  # the bytes in file order, as data.fingerprint reads them
        self._labels[self.count:self.count + b] = labels
        self.count += b

    def close(self) -> str:
        """Finish the file and rename it onto `path`; returns the fingerprint (also stored as an attr)."""
        if self._atomic is None:
            return self.fingerprint
        try:
            if self.count == 0:
                raise StoreError(f"{self.what}: no images were appended, expected 1 to {self.n}; "
                                 "hint: check that the source has readable images")
            labels = self._labels[:self.count]  # (count,)
            if self.count == self.n:
                self.fingerprint = _hash_tail(self._hash, labels, self.classes)
                _write_rest(self._f, labels, self.classes, *self._shape[2:], {**self.attrs,
                                                                            "fingerprint": self.fingerprint})
                self._f.close()
            else:
                self._f.close()
                self.fingerprint = self._shrink(labels)
        except BaseException as e:
            self.abort(e)
            raise
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)  # fsync, rename onto path
        return self.fingerprint

    def _shrink(self, labels: np.ndarray) -> str:
        """Copy the `count` images written into a right-sized file in ~64 MB chunks, hashing as it goes."""
        shape = (self.count, *self._shape[1:])  # (count, 3, H, W)
        check_space(self.path, int(np.prod(shape)) + 9 * self.count)
        h, step = _shape_hash(shape), max(1, _COPY_BYTES // int(np.prod(shape[1:])))
        with h5py.File(self._tmp, "r") as src, h5py.File(self._small, "w") as dst:
            out = dst.create_dataset("images", shape=shape, dtype=np.uint8)
            for lo in range(0, self.count, step):
                block = src["images"][lo:min(self.count, lo + step)]  # (b, 3, H, W)
                out[lo:lo + block.shape[0]] = block
                h.update(block)
            digest = _hash_tail(h, labels, self.classes)
            _write_rest(dst, labels, self.classes, *shape[2:], {**self.attrs, "fingerprint": digest})
        os.replace(self._small, self._tmp)
        return digest

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop everything written: `path` stays as it was, no temp file is left."""
        if self._atomic is None:
            return
        atomic, self._atomic = self._atomic, None
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # a half-built HDF5 file may refuse to flush: it is deleted anyway
                pass
        self._small.unlink(missing_ok=True)
        exc = exc if exc is not None else _Aborted()
        atomic.__exit__(type(exc), exc, exc.__traceback__)  # removes the temp, does not raise


def _validated(f: h5py.File, where: str) -> tuple[h5py.Dataset, np.ndarray, list[str], dict]:
    """/images (not read), labels (N,) int64, classes and attrs of an open packed file, or a StoreError."""
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if attrs.get("format") != PACKED_FORMAT:
        raise StoreError(f"{where}: format attr is {attrs.get('format')!r}, expected {PACKED_FORMAT!r}; "
                         f"{_REBUILD_HINT}")
    missing = [name for name in ("images", "labels") if not isinstance(f.get(name), h5py.Dataset)]
    if missing:
        raise StoreError(f"{where}: missing dataset(s) {', '.join('/' + m for m in missing)}, expected "
                         f"/images and /labels; {_REBUILD_HINT}")
    images, labels = f["images"], f["labels"][()]  # (N, 3, H, W) uint8 dataset, (N,) int64
    try:
        classes = json.loads(str(attrs["classes"]))
    except (KeyError, TypeError, ValueError):
        classes = None
    ok = (images.ndim == 4 and images.shape[1] == 3 and images.dtype == np.uint8
          and labels.shape == images.shape[:1] and isinstance(classes, list))
    if not ok:
        raise StoreError(f"{where}: inconsistent contents (images {images.dtype} {images.shape}, labels "
                         f"{labels.shape}, classes {attrs.get('classes')!r}), expected (N,3,H,W) uint8, (N,), "
                         f"JSON list; {_REBUILD_HINT}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise StoreError(f"{where}: labels {int(labels.min())}..{int(labels.max())} are outside 0..{len(classes) - 1} "
                         f"(its {len(classes)} classes); {_REBUILD_HINT}")
    return images, labels.astype(np.int64), [str(c) for c in classes], attrs


def _check_file(path: str | os.PathLike, where: str) -> None:
    if not os.path.isfile(path):
        raise StoreError(f"{where}: no such file; expected a {PACKED_FORMAT} .h5 file; {_REBUILD_HINT}")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{where}: not an HDF5 file; expected a {PACKED_FORMAT} .h5 file; {_REBUILD_HINT}")


def _unreadable(where: str, e: OSError) -> StoreError:
    reason = " ".join(str(e).split())[:200]  # h5py reports truncation / corrupt chunks as OSError, often multi-line
    return StoreError(f"{where}: unreadable, truncated or corrupt HDF5 ({reason}); {_REBUILD_HINT}")


def read_packed(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Read a packed image set: (images (N,3,H,W) uint8, labels (N,) int64, classes, attrs)."""
    where = f"packed file {os.fspath(path)}"
    _check_file(path, where)
    try:
        with h5py.File(path, "r") as f:
            images, labels, classes, attrs = _validated(f, where)
            return images[()], labels, classes, attrs
    except OSError as e:
        raise _unreadable(where, e) from e


def _contiguous_offset(ds: h5py.Dataset) -> int | None:
    """File offset of /images' raw bytes if they are one plain block (contiguous, no filters), else None."""
    if ds.chunks is not None or ds.is_virtual or ds.external:
        return None
    return ds.id.get_offset()  # None if never written (HDF5 allocates contiguous storage at the first write)


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset` (looping over short reads); returns the bytes read (< len(buf) only at EOF)."""
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):  # releases the GIL; reads straight into buf, no intermediate bytes object
            got = os.preadv(fd, [buf[done:]], offset + done)
        else:  # macOS < 11: pread and copy
            data = os.pread(fd, len(buf) - done, offset + done)
            got = len(data)
            buf[done:done + got] = data
        if got == 0:
            break
        done += got
    return done


class PackedReader:
    """Random row access to a packed file without loading it: thread-safe, bounded memory.

    Opening reads and checks the metadata and /labels (read_packed's one-line StoreErrors) and keeps
    them: `n`, `shape` (N, 3, H, W), `labels` (N,) int64, `classes`, `attrs`. Images are read on demand.
    Contiguous /images (what write_packed / PackedWriter write): one os.preadv per run of consecutive
    rows on a raw descriptor, so threads read in parallel and nothing is mapped (the RSS stays at the
    buffers). Chunked /images (older files): one h5py read per row, in file order, under a lock.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.where = os.fspath(path), f"packed file {os.fspath(path)}"
        self._fd, self._f, self._lock, self._closed = -1, None, threading.Lock(), False
        _check_file(path, self.where)
        try:
            # No chunk cache: with it, every random row of a chunked file pulls its whole chunk (256 rows)
            # through the cache (~1,500 rows/s at 32 px); without, HDF5 reads just the row (~30,000/s).
            f = h5py.File(path, "r", rdcc_nbytes=0)
            try:
                ds, self.labels, self.classes, self.attrs = _validated(f, self.where)
                n, c, h, w = (int(d) for d in ds.shape)
                self.shape: tuple[int, int, int, int] = (n, c, h, w)  # (N, 3, H, W)
                self._offset = _contiguous_offset(ds)
            except BaseException:
                f.close()
                raise
        except OSError as e:
            raise _unreadable(self.where, e) from e
        self.n = self.shape[0]
        self._row_bytes = int(np.prod(self.shape[1:]))
        if self._offset is None:
            self._f, self._images = f, ds
            if self.path not in _told_chunked:
                _told_chunked.add(self.path)
                log.warning("%s: /images is chunked (an older packed file): rows are read through h5py "
                            "under a lock, slower; repack it for fast parallel reads: python jobs/pack_data.py "
                            "--data %s --out NEW.h5", self.where, self.path)
            return
        f.close()  # contiguous: from here on only preads, no HDF5 call
        self._fd = os.open(path, os.O_RDONLY)
        end = self._offset + self.n * self._row_bytes
        if os.fstat(self._fd).st_size < end:
            self.close()
            raise StoreError(f"{self.where}: truncated: /images needs bytes up to {end}, the file has "
                             f"{os.path.getsize(path)}; {_REBUILD_HINT}")

    @property
    def contiguous(self) -> bool:
        """Whether rows are read with plain preads (fast, parallel) rather than through h5py."""
        return self._offset is not None

    def __enter__(self) -> PackedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os or h5py may be half torn down
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._f is not None:
                self._f.close()
                self._f = None

    def _check_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise StoreError(f"{self.where}: rows must be a 1-d integer array, got {rows.dtype} {rows.shape}; "
                             "hint: pass np.asarray(rows, np.int64)")
        want = (rows.shape[0], *self.shape[1:])
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != want \
                or not out.flags.c_contiguous or not out.flags.writeable:
            got = f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
            raise StoreError(f"{self.where}: out must be a writeable C-contiguous uint8 array {want}, got {got}; "
                             f"hint: out = np.empty({want}, np.uint8)")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise StoreError(f"{self.where}: rows must lie in [0, {self.n - 1}], got [{rows.min()}, "
                             f"{rows.max()}]; hint: rows index the file's {self.n} images from 0")
        self._check_open()
        return rows.astype(np.int64, copy=False)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.where}: the reader is closed; hint: open a new PackedReader")

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill `out` (b, 3, H, W) uint8, C-contiguous, with the images at `rows` (b,) int64, in the order
        of rows (any order, duplicates allowed); returns `out`. Safe to call from several threads."""
        rows = self._check_rows(rows, out)
        if rows.size == 0:
            return out
        if self._fd < 0:
            with self._lock:  # h5py serialises anyway; the lock also keeps close() from racing a read
                self._check_open()
                rows_list = rows.tolist()
                for i in np.argsort(rows, kind="stable").tolist():  # in file order; one row per read:
                    out[i] = self._images[rows_list[i]]  # ~20x faster than one fancy read of the batch
            return out
        flat, rb = out.data.cast("B"), self._row_bytes  # (b * row bytes,) view of out, no copy
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()  # runs of consecutive rows: one read each
        starts, rows_list = [0, *breaks], rows.tolist()
        for lo, hi in zip(starts, [*breaks, rows.shape[0]]):
            if _pread_into(self._fd, flat[lo * rb:hi * rb], self._offset + rows_list[lo] * rb) < (hi - lo) * rb:
                raise StoreError(f"{self.where}: short read at row {rows_list[lo]} (truncated since opened?); "
                                 f"{_REBUILD_HINT}")
        return out

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images (b, 3, H, W) uint8) over all rows in order, b <= rows_per_chunk, a fresh array
        per chunk (callers may keep it): sequential passes (hashes, statistics, copies) in bounded memory."""
        if rows_per_chunk < 1:
            raise StoreError(f"{self.where}: rows_per_chunk={rows_per_chunk} must be >= 1; "
                             "hint: e.g. 64 MB // (3 * H * W)")
        for lo in range(0, self.n, rows_per_chunk):
            hi = min(self.n, lo + rows_per_chunk)
            block = np.empty((hi - lo, *self.shape[1:]), np.uint8)  # (b, 3, H, W)
            if self._fd >= 0:
                self.read_rows(np.arange(lo, hi), block)  # consecutive rows: a single pread
            else:
                with self._lock:
                    self._check_open()
                    self._images.read_direct(block, np.s_[lo:hi])  # a slice, not a fancy read
            yield lo, block
