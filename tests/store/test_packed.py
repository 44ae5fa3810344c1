"""hpcviz.store: packed image sets (write_packed, PackedWriter, read_packed, PackedReader), atomic writes, bad files."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcviz.store import (
    PACKED_FORMAT,
    PackedReader,
    PackedWriter,
    StoreError,
    atomic_path,
    read_packed,
    write_packed,
)

from conftest import CLASSES, one_line, tiny, write_chunked


def test_round_trip(tmp_path):
    images, labels = tiny()
    path = tmp_path / "p.h5"
    write_packed(path, images, labels, CLASSES, {"source": "builtin:100", "seed": 3, "ratio": 0.5})
    got_images, got_labels, classes, attrs = read_packed(path)
    assert got_images.dtype == np.uint8 and got_images.tobytes() == images.tobytes()
    assert got_images.shape == images.shape
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    assert classes == CLASSES
    assert attrs["format"] == PACKED_FORMAT and attrs["n"] == 300 and attrs["image_size"] == 4
    assert attrs["source"] == "builtin:100" and attrs["seed"] == 3 and attrs["ratio"] == 0.5
    with h5py.File(path, "r") as f:
        assert f["images"].chunks is None and f["images"].compression is None  # contiguous: rows by offset
    assert os.listdir(tmp_path) == ["p.h5"]


@pytest.mark.parametrize("bad", ["dtype", "shape", "labels", "reserved_attr"])
def test_write_validates_inputs(tmp_path, bad):
    images, labels = tiny(5)
    attrs = {"source": "x"}
    if bad == "dtype":
        images = images.astype(np.float32)
    elif bad == "shape":
        images = images[:, :2]
    elif bad == "labels":
        labels = labels + 3  # out of range for 3 classes
    else:
        attrs = {"n": 7}
    with pytest.raises(StoreError):
        write_packed(tmp_path / "p.h5", images, labels, CLASSES, attrs)
    assert os.listdir(tmp_path) == []


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    images, labels = tiny(10)
    path = tmp_path / "p.h5"
    real = h5py.Group.create_dataset

    def fail_on_labels(self, name, *args, **kwargs):
        if name == "labels":  # /images is already in the temp file: a genuinely half-written file
            raise RuntimeError("disk on fire")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_labels)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_packed(path, images, labels, CLASSES, {})
    assert os.listdir(tmp_path) == []  # no file at path, no temp left

    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    write_packed(path, images, labels, CLASSES, {"version": 1})
    before = path.read_bytes()
    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_labels)
    with pytest.raises(RuntimeError):
        write_packed(path, images[:5], labels[:5], CLASSES, {"version": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.h5"]  # the old file survives intact


def test_atomic_path(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name until the block succeeds
    assert target.read_bytes() == b"new"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_truncated_file(tmp_path):
    images, labels = tiny()
    path = tmp_path / "p.h5"
    write_packed(path, images, labels, CLASSES, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        read_packed(path)
    assert "truncated" in one_line(e, path)


@pytest.mark.parametrize("content", [b"", b"just some text\n" * 100])
def test_not_hdf5(tmp_path, content):
    path = tmp_path / "p.h5"
    path.write_bytes(content)
    with pytest.raises(StoreError) as e:
        read_packed(path)
    assert "not an HDF5 file" in one_line(e, path)
    with pytest.raises(StoreError, match="no such file"):
        read_packed(tmp_path / "missing.h5")


@pytest.mark.parametrize("problem", ["format", "datasets"])
def test_wrong_format(tmp_path, problem):
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else" if problem == "format" else PACKED_FORMAT
        f.create_dataset("images", data=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(StoreError) as e:
        read_packed(path)
    assert (PACKED_FORMAT if problem == "format" else "/labels") in one_line(e, path)
    assert issubclass(StoreError, ValueError)




def test_packed_writer_in_batches(tmp_path):
    from hpcviz.data.sources import ImageSet, fingerprint
    images, labels = tiny(300, 5)
    path = tmp_path / "w.h5"
    with PackedWriter(path, 300, 5, 5, CLASSES, {"source": "x"}) as w:
        for lo in range(0, 300, 7):
            w.append(images[lo:lo + 7], labels[lo:lo + 7])
        assert not path.exists()  # nothing under the final name until closed
    got, got_labels, classes, attrs = read_packed(path)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels) and classes == CLASSES
    expected = fingerprint(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), tuple(CLASSES), "x"))
    assert attrs["fingerprint"] == w.fingerprint == expected and attrs["n"] == 300 and attrs["source"] == "x"
    with h5py.File(path, "r") as f:
        assert f["images"].chunks is None and f["images"].compression is None
    assert os.listdir(tmp_path) == ["w.h5"]


def test_packed_writer_fewer_than_planned_is_copied_to_fit(tmp_path, monkeypatch):
    from hpcviz.data.sources import ImageSet, fingerprint
    from hpcviz.store import packed
    monkeypatch.setattr(packed, "_COPY_BYTES", 100)  # a copy of many chunks
    images, labels = tiny(40, 4)
    w = PackedWriter(tmp_path / "w.h5", 50, 4, 4, CLASSES, {})
    for lo in range(0, 40, 9):
        w.append(images[lo:lo + 9], labels[lo:lo + 9])
    assert w.close() == fingerprint(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), tuple(CLASSES), ""))
    got, got_labels, _, attrs = read_packed(tmp_path / "w.h5")
    assert got.shape == (40, 3, 4, 4) and np.array_equal(got, images) and np.array_equal(got_labels, labels)
    assert attrs["n"] == 40 and attrs["fingerprint"] == w.fingerprint and os.listdir(tmp_path) == ["w.h5"]


def test_packed_writer_failures_leave_the_old_file(tmp_path):
    images, labels = tiny(10, 4)
    path = tmp_path / "w.h5"
    write_packed(path, images, labels, CLASSES, {"v": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with PackedWriter(path, 10, 4, 4, CLASSES, {}) as w:
            w.append(images[:5], labels[:5])
            raise RuntimeError("disk on fire")
    for bad in ("shape", "too_many", "labels", "none"):
        w = PackedWriter(path, 10, 4, 4, CLASSES, {})
        with pytest.raises(StoreError) as e:
            if bad == "shape":
                w.append(images[:, :, :3], labels)
            elif bad == "too_many":
                w.append(np.concatenate([images, images[:1]]), np.concatenate([labels, labels[:1]]))
            elif bad == "labels":
                w.append(images, labels + 3)
            else:
                w.close()  # no images appended: refused, and the temp is gone
        assert "\n" not in str(e.value) and "hint" in str(e.value)
        w.abort()
    for args in [(0, 4, 4, CLASSES, {}), (10, 4, 4, [], {}), (10, 4, 4, CLASSES, {"fingerprint": "x"})]:
        with pytest.raises(StoreError):
            PackedWriter(path, *args)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.h5"]


# ----------------------------------------------------------------------------- PackedReader
@pytest.fixture(params=["contiguous", "chunked"])
def packed_file(request, tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = tiny(600, 6)
    path = tmp_path / f"{request.param}.h5"
    if request.param == "contiguous":
        write_packed(path, images, labels, CLASSES, {"source": "t"})
    else:
        write_chunked(path, images, labels)
    return path, images, labels


def test_packed_reader_rows(packed_file, caplog):
    path, images, labels = packed_file
    whole = read_packed(path)
    with PackedReader(path) as r:
        assert r.contiguous == (path.stem == "contiguous")
        assert r.n == 600 and r.shape == (600, 3, 6, 6) and r.classes == CLASSES and r.attrs == whole[3]
        assert r.labels.dtype == np.int64 and np.array_equal(r.labels, labels)
        rng = np.random.default_rng(5)
        for rows in (rng.integers(0, 600, 256), np.array([599, 3, 3, 4, 5, 6, 0, 599, 2]),  # unsorted, repeats, runs
                     np.arange(100, 356), np.array([7]), np.array([], np.int64), rng.permutation(600)):
            out = np.full((len(rows), 3, 6, 6), 77, np.uint8)
            assert r.read_rows(rows, out) is out and np.array_equal(out, images[rows])
        chunks = list(r.iter_chunks(256))
        assert [lo for lo, _ in chunks] == [0, 256, 512] and np.array_equal(np.concatenate([c for _, c in chunks]),
                                                                              whole[0])
    assert ("chunked" in caplog.text and "repack" in caplog.text) == (path.stem == "chunked")
    caplog.clear()
    PackedReader(path).close()
    assert "repack" not in caplog.text  # said once per file and process


def test_packed_reader_bad_rows_and_out(packed_file):
    path, _, _ = packed_file
    r = PackedReader(path)
    for rows, out, expect in [(np.array([0, 600]), np.empty((2, 3, 6, 6), np.uint8), "[0, 599]"),
                              (np.array([-1]), np.empty((1, 3, 6, 6), np.uint8), "[0, 599]"),
                              (np.array([[1]]), np.empty((1, 3, 6, 6), np.uint8), "1-d integer"),
                              (np.array([0.5]), np.empty((1, 3, 6, 6), np.uint8), "1-d integer"),
                              (np.array([1, 2]), np.empty((3, 3, 6, 6), np.uint8), "C-contiguous uint8"),
                              (np.array([1, 2]), np.empty((2, 3, 6, 6), np.float32), "C-contiguous uint8"),
                              (np.array([1, 2]), np.empty((2, 3, 6, 12), np.uint8)[..., ::2], "C-contiguous")]:
        with pytest.raises(StoreError) as e:
            r.read_rows(rows, out)
        assert expect in one_line(e, path)
    with pytest.raises(StoreError):
        next(r.iter_chunks(0))
    r.close()
    with pytest.raises(StoreError, match="closed"):
        r.read_rows(np.array([0]), np.empty((1, 3, 6, 6), np.uint8))
    with pytest.raises(StoreError, match="closed"):
        next(r.iter_chunks(10))


def test_packed_reader_without_preadv(tmp_path, monkeypatch):
    images, labels = tiny(50, 4)
    write_packed(tmp_path / "p.h5", images, labels, CLASSES, {})
    monkeypatch.delattr(os, "preadv")  # as on macOS < 11: pread and a copy
    rows = np.array([49, 0, 1, 2, 7, 7])
    with PackedReader(tmp_path / "p.h5") as r:
        assert np.array_equal(r.read_rows(rows, np.empty((6, 3, 4, 4), np.uint8)), images[rows])


def test_packed_reader_from_4_threads(packed_file):
    from concurrent.futures import ThreadPoolExecutor
    path, images, _ = packed_file

    def work(seed: int) -> bool:
        rng, out = np.random.default_rng(seed), np.empty((64, 3, 6, 6), np.uint8)
        ok = True
        for _ in range(50):
            rows = rng.integers(0, 600, 64)
            ok &= np.array_equal(reader.read_rows(rows, out), images[rows])
        return ok

    with PackedReader(path) as reader, ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_packed_reader_bad_files(tmp_path):
    images, labels = tiny(20, 4)
    path = tmp_path / "p.h5"
    for content, expect in [(None, "no such file"), (b"text\n" * 100, "not an HDF5 file")]:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(StoreError) as e:
            PackedReader(path)
        assert expect in one_line(e, path)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "other"
    with pytest.raises(StoreError, match=PACKED_FORMAT):
        PackedReader(path)
    write_packed(path, images, labels, CLASSES, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(StoreError) as e:
        PackedReader(path)
    assert "truncated" in one_line(e, path)
