"""hpcviz.store (packed image sets, atomic writes, shards, collation, inspection) and jobs/pack_data.py."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcviz.store import (
    PACKED_FORMAT,
    SHARD_FORMAT,
    VIZ_FORMAT,
    PackedReader,
    PackedWriter,
    ShardWriter,
    StoreError,
    atomic_path,
    collate,
    contents,
    dataset_stats,
    describe,
    list_datasets,
    read_attrs,
    read_image,
    read_packed,
    read_shard,
    verify_shard,
    write_packed,
)

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c"]


def tiny(n: int = 300, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 3, n)


def one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "hint" in msg
    return msg


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


# ----------------------------------------------------------------------------- jobs/pack_data.py
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it: the installed package
    return subprocess.run([sys.executable, "jobs/pack_data.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_pack_data_cli(tmp_path):
    out = tmp_path / "sub" / "b.h5"
    r = run_cli("--data", "builtin:3", "--image-size", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "30 images" in r.stdout and "circle" in r.stdout
    images, labels, classes, attrs = read_packed(out)
    assert images.shape == (30, 3, 8, 8) and len(classes) == 10
    assert attrs["source"] == "builtin:3" and len(attrs["fingerprint"]) == 64
    before = out.read_bytes()
    r = run_cli("--data", "builtin:2", "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--force" in r.stderr
    assert r.stderr.count("\n") == 1 and out.read_bytes() == before


def load_pack_data():
    from hpcviz.commands import pack
    return pack


def test_pack_data_main_in_process(tmp_path, capsys):
    pack_data = load_pack_data()
    parser = pack_data.get_args_parser(add_help=True)
    out = tmp_path / "b.h5"
    out.write_bytes(b"old")
    assert pack_data.main(parser.parse_args(["--data", "builtin:1", "--out", str(out), "--force"])) == 0
    assert read_packed(out)[0].shape == (10, 3, 32, 32)
    capsys.readouterr()
    assert pack_data.main(parser.parse_args(["--data", str(tmp_path / "nope"), "--out",
                                             str(tmp_path / "c.h5")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "no such directory" in err
    assert not (tmp_path / "c.h5").exists()


def pack_in_process(monkeypatch, tmp_path: Path, *args: str, chunk_bytes: int = 400) -> tuple[int, str]:
    """pack_data.main with tiny chunks (many batches, resize flushes); (exit code, stderr + hpcviz log)."""
    import logging

    from hpcviz.data import packing, sources
    pack_data = load_pack_data()
    monkeypatch.setattr(packing, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(sources, "_STREAM_BYTES", chunk_bytes)
    err = tmp_path / "stderr.txt"
    logger, records = logging.getLogger("hpcviz"), []
    handler = logging.Handler()
    handler.emit = records.append  # the 'hpcviz' logger may not propagate (hpcviz.log), so listen directly
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also clears the logger's level cache
    try:
        with open(err, "w") as f:
            monkeypatch.setattr(sys, "stderr", f)  # no terminal: plain progress lines, no rich bar
            code = pack_data.main(pack_data.get_args_parser().parse_args(list(args)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        monkeypatch.undo()
    return code, err.read_text() + "".join(r.getMessage() + "\n" for r in records)


def assert_same_set(path: Path, spec: str, **load_kw) -> None:
    """The packed file holds exactly what the old whole-set path (load_images + fingerprint) gives."""
    from hpcviz.data.sources import fingerprint, load_images
    ds = load_images(spec, **load_kw)
    images, labels, classes, attrs = read_packed(path)
    assert np.array_equal(images, ds.images.numpy()) and np.array_equal(labels, ds.labels.numpy())
    assert tuple(classes) == ds.classes and attrs["fingerprint"] == fingerprint(ds) and attrs["source"] == spec
    with h5py.File(path, "r") as f:
        assert f["images"].chunks is None  # contiguous
    assert not list(path.parent.glob("*.tmp-*"))


@pytest.mark.parametrize("skip", [False, True])
def test_pack_data_streams_a_folder_like_the_whole_set(tmp_path, monkeypatch, skip):
    from conftest import write_mixed_folder
    bad = write_mixed_folder(tmp_path / "folder")
    if not skip:
        for path in bad:
            path.unlink()
    out, folder = tmp_path / "out" / "f.h5", str(tmp_path / "folder")
    code, err = pack_in_process(monkeypatch, tmp_path, "--data", folder, "--image-size", "6", "--out", str(out),
                                *(["--skip-bad"] if skip else []))
    assert code == 0, err
    assert_same_set(out, folder, image_size=6, skip_bad=skip)  # skip: 11 of 13 planned, copied to fit
    assert read_packed(out)[0].shape == (11, 3, 6, 6)
    lines = [line for line in err.splitlines() if "packing f.h5" in line]
    files = 13 if skip else 11  # progress counts files, read or skipped
    assert 2 <= len(lines) <= 11 and f"{files}/{files} (100 %)" in lines[-1]  # stderr is no terminal: plain lines


def test_pack_data_progress_lines_every_10_percent(caplog):
    from hpcviz.data.packing import Progress
    progress = Progress(1000, "packing x")
    assert progress.bar is None  # pytest's stderr is no terminal
    with caplog.at_level("INFO", "hpcviz"):
        for done in range(1, 1001, 3):
            progress.update(min(done, 1000))
        progress.update(1000)
    progress.close()
    lines = [r.getMessage() for r in caplog.records if "packing x" in r.getMessage()]
    assert len(lines) == 10 and "1000/1000 (100 %)" in lines[-1] and "(10 %)" in lines[0]


def test_pack_data_stream_errors_leave_nothing(tmp_path, monkeypatch):
    from conftest import write_mixed_folder
    bad = write_mixed_folder(tmp_path / "folder")
    out = tmp_path / "f.h5"
    code, err = pack_in_process(monkeypatch, tmp_path, "--data", str(tmp_path / "folder"), "--image-size", "6",
                                "--out", str(out))
    assert code == 2 and "cannot decode" in err and "--skip-bad" in err
    for path in bad:
        path.unlink()
    code, err = pack_in_process(monkeypatch, tmp_path, "--data", str(tmp_path / "folder"), "--out", str(out))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "different sizes" in errors[0] and "--image-size S" in errors[0]
    assert sorted(os.listdir(tmp_path)) == ["folder", "stderr.txt"]  # no output, no temp


@pytest.mark.parametrize("source", ["builtin", "cifar10", "packed-chunked"])
def test_pack_data_other_sources_in_chunks(tmp_path, monkeypatch, source):
    from conftest import write_fake_cifar
    if source == "builtin":
        spec, kw = "builtin:3", {"image_size": 8}
    elif source == "cifar10":
        write_fake_cifar(tmp_path / "c", n=7)
        spec, kw = f"cifar10:{tmp_path / 'c'}", {"image_size": 20}
    else:  # an older, chunked packed file, repacked (contiguous) and resized chunk by chunk
        spec, kw = str(tmp_path / "old.h5"), {"image_size": 5}
        write_chunked(Path(spec), *tiny(50, 8))
    out = tmp_path / "new.h5"
    code, err = pack_in_process(monkeypatch, tmp_path, "--data", spec, "--image-size", str(kw["image_size"]),
                                "--out", str(out), chunk_bytes=2000)
    assert code == 0, err
    assert_same_set(out, spec, **kw)


# ----------------------------------------------------------------------------- PackedWriter
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
def write_chunked(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A packed file in the layout written before /images became contiguous (chunked by 256 images)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(256, len(images)), *images.shape[1:]))
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.attrs.update({"format": PACKED_FORMAT, "classes": '["a", "b", "c"]', "n": len(images),
                        "image_size": images.shape[2], "height": images.shape[2], "width": images.shape[3]})


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


# ----------------------------------------------------------------------------- shards
ROOT_ATTRS = {"run": "r1", "checkpoint_sha256": "ab" * 32, "arch": "resnet20", "image_size": 4, "lr": 0.1,
              "flag": True, "class_names": ["cat", "dog"], "mean": [0.5, 0.25, 0.125],
              "config": {"viz": {"split": "val", "blocks": ["layer1.0"]}, "epochs": 2}}
DIMS = {"index": ("image",), "images": ("image", "channel", "y", "x"), "label": ("image",),
        "logits": ("image", "class"), "act/layer1.0": ("image", "channel", "y", "x"),
        "deconv/layer1.0/residual": ("image", "channel", "y", "x")}


def shard_data(n: int, seed: int = 0, offset: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"index": np.arange(offset, offset + n, dtype=np.int64),
            "images": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
            "label": rng.integers(0, 2, n),
            "logits": rng.standard_normal((n, 2)).astype(np.float32),
            "act/layer1.0": rng.standard_normal((n, 5, 2, 2)).astype(np.float32),
            "deconv/layer1.0/residual": rng.standard_normal((n, 3, 4, 4)).astype(np.float32)}


def write_shard(path: Path, data: dict[str, np.ndarray], batch: int = 4, compression: str | None = None,
                **attrs) -> dict[str, np.ndarray]:
    """Write `data` in batches like an array task (act/* as float16); returns what should read back."""
    n = len(data["index"])
    with ShardWriter(path, n, {**ROOT_ATTRS, **attrs}, compression=compression) as w:
        for name, array in data.items():
            act = name.startswith("act/")
            for start in range(0, n, batch):
                w.write(name, start, array[start:start + batch], dims=DIMS[name],
                        dtype=np.float16 if act else None, attrs={"block": "layer1.0"} if act else None)
    with np.errstate(over="ignore"):  # planted overflows
        return {k: v.astype(np.float16) if k.startswith("act/") else v for k, v in data.items()}


def make_shards(folder: Path, sizes: list[int], **kw) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    paths, datas, offset = [], [], 0
    for k, n in enumerate(sizes):
        paths.append(folder / f"shard-{k:05d}.h5")
        datas.append(write_shard(paths[-1], shard_data(n, seed=k, offset=offset), shard=k, **kw))
        offset += n
    return paths, datas


def test_shard_round_trip(tmp_path):
    data = shard_data(6)
    act = data["act/layer1.0"]
    act[1, 0, 0, 0], act[5, 1, 1, 1] = 1e6, -7e4  # overflow float16, in two different batches
    act[2, 0, 0, 0], act[3, 0, 0, 0] = 65504.0, np.inf  # the largest float16; an inf that was already inf
    path = tmp_path / "s.h5"
    want = write_shard(path, data)
    assert os.listdir(tmp_path) == ["s.h5"]  # no temp left behind
    assert verify_shard(path, 6) == {**ROOT_ATTRS, "format": SHARD_FORMAT, "n": 6, "complete": True}
    assert list_datasets(path) == sorted(DIMS)
    got = read_shard(path)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    assert got["act/layer1.0"][2, 0, 0, 0] == 65504.0 and np.isinf(got["act/layer1.0"][1, 0, 0, 0])
    assert got["images"].dtype == np.uint8 and got["logits"].dtype == np.float32
    with h5py.File(path, "r") as f:
        for name in ("images", "act/layer1.0", "deconv/layer1.0/residual", "index", "logits"):
            assert f[name].chunks == f[name].shape and f[name].compression is None  # whole images, up to 1 MiB
        for name, dims in DIMS.items():
            assert tuple(d.label for d in f[name].dims) == dims
            assert name == "index" or list(f[name].dims[0].keys()) == ["index"]
        assert f["index"].is_scale
        assert f["act/layer1.0"].attrs["fp16_overflow"] == 2 and f["act/layer1.0"].attrs["block"] == "layer1.0"
    rows = read_shard(path, ["index", "images"], [4, 0, 4, -1])
    assert np.array_equal(rows["index"], [4, 0, 4, 5]) and np.array_equal(rows["images"], want["images"][[4, 0, 4, 5]])
    assert np.array_equal(read_shard(path, ["label"], slice(1, 6, 2))["label"], want["label"][1:6:2])
    with pytest.raises(StoreError, match=r"out of range; valid: 0\.\.5"):
        read_shard(path, ["label"], [6])


def test_fp16_conversion_same_with_and_without_torch(tmp_path, monkeypatch):
    pytest.importorskip("torch")  # the writer uses torch's fast cast when torch is imported
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32) * 3e4  # some overflow
    x[0, 0, 0, :6] = [65504, 65519.9, 65520, np.nan, 6e-8, 2.9e-8]  # rounding edges, NaN, subnormals

    def write(path: Path) -> tuple[np.ndarray, int]:
        with ShardWriter(path, 4, {}) as w:
            w.write("act/a", 0, x, dims=("image", "channel", "y", "x"), dtype=np.float16)
        with h5py.File(path, "r") as f:
            return f["act/a"][()], int(f["act/a"].attrs["fp16_overflow"])

    fast, fast_count = write(tmp_path / "fast.h5")
    monkeypatch.setitem(sys.modules, "torch", None)
    slow, slow_count = write(tmp_path / "slow.h5")
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    assert np.array_equal(fast.view(np.uint16), slow.view(np.uint16))
    assert np.array_equal(slow.view(np.uint16), ref.view(np.uint16))
    assert fast_count == slow_count == int(np.isinf(ref).sum()) > 0


def test_writer_exception_removes_temp_and_keeps_old_shard(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, 4, ROOT_ATTRS) as w:
            w.write("index", 0, np.arange(2), dims=("image",))
            assert w.tmp.exists() and not path.exists()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(StoreError, match="no such file"):
        verify_shard(path)
    want = write_shard(path, shard_data(5))
    with pytest.raises(KeyboardInterrupt):  # a rewrite that dies leaves the earlier complete shard alone
        with ShardWriter(path, 5, ROOT_ATTRS) as w:
            w.write("index", 0, np.arange(5) + 100, dims=("image",))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["s.h5"] and np.array_equal(read_shard(path, ["index"])["index"], want["index"])


def test_writer_killed_by_sigkill(tmp_path):
    path = tmp_path / "shard-00000.h5"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from hpcviz.store import ShardWriter
w = ShardWriter({str(path)!r}, 8, {{"run": "r"}})
w.write("index", 0, np.arange(8), dims=("image",))
w.write("act/a", 0, np.ones((4, 2, 3, 3), np.float32), dims=("image", "channel", "y", "x"), dtype=np.float16)
w._f.flush()  # half a shard really on disk
print(w.tmp, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    tmp = Path(r.stdout.strip())
    assert tmp.exists() and not path.exists()
    with pytest.raises(StoreError) as e:
        verify_shard(path, 8)
    msg = one_line(e, path)
    assert "no such file" in msg and tmp.name in msg and "killed" in msg
    with pytest.raises(StoreError, match="incomplete|truncated"):
        verify_shard(tmp)  # the temp itself is never accepted either
    w = ShardWriter(path, 3, ROOT_ATTRS)
    assert not tmp.exists()  # the stale temp of the killed writer is gone
    w.write("index", 0, np.arange(3), dims=("image",))
    assert w.close() == path and verify_shard(path, 3)["n"] == 3
    assert os.listdir(tmp_path) == [path.name]


def test_close_detects_gap(tmp_path):
    path = tmp_path / "s.h5"
    w = ShardWriter(path, 8, ROOT_ATTRS)
    w.write("index", 0, np.arange(8), dims=("image",))
    for start, stop in [(0, 3), (4, 8), (1, 2)]:  # row 3 never written
        w.write("act/a", start, np.zeros((stop - start, 2), np.float32), dims=("image", "channel"))
    with pytest.raises(StoreError) as e:
        w.close()
    assert "'act/a' rows [3, 4) of 8" in one_line(e, path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["compression", "reserved", "n", "dims", "shape", "rows", "attr"])
def test_writer_validates_inputs(tmp_path, bad):
    path = tmp_path / "s.h5"
    kw = {"compression": "zstd"} if bad == "compression" else {}
    attrs = {**ROOT_ATTRS, "complete": True} if bad == "reserved" else ROOT_ATTRS
    with pytest.raises(StoreError) as e:
        with ShardWriter(path, -1 if bad == "n" else 4, attrs, **kw) as w:
            w.write("act/a", 0, np.zeros((2, 3)), dims=("image",) if bad == "dims" else ("image", "c"),
                    attrs={"x": object()} if bad == "attr" else None)
            w.write("act/a", 3 if bad == "rows" else 2, np.zeros((2, 4 if bad == "shape" else 3)), dims=("image", "c"))
    msg = one_line(e, path)
    if bad == "compression":
        assert "'zstd'" in msg and "'gzip', 'lzf'" in msg
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compression(tmp_path, compression):
    path = tmp_path / "s.h5"
    data = shard_data(5)
    data["act/layer1.0"][:, :, 0] = 0  # something to compress
    want = write_shard(path, data, compression=compression)
    got = read_shard(path)
    assert all(np.array_equal(got[k], v) for k, v in want.items())
    desc = {o["name"]: o for o in describe(path)["objects"]}
    assert desc["act/layer1.0"]["compression"] == compression and desc["act/layer1.0"]["shuffle"]


# ----------------------------------------------------------------------------- collate
def test_collate_is_the_concatenation_and_survives_a_move(tmp_path, monkeypatch):
    run = tmp_path / "run"
    paths, datas = make_shards(run / "viz" / "shards", [5, 3, 4])
    viz = run / "viz" / "viz.h5"
    names = [f"shards/shard-{k:05d}.h5" for k in range(3)]
    assert collate(paths, viz) == {"n_images": 12, "present": names, "missing": {}}
    assert sorted(os.listdir(viz.parent)) == ["shards", "viz.h5"]
    want = {name: np.concatenate([d[name] for d in datas]) for name in DIMS}

    def check(path: Path) -> None:
        got = read_shard(path)
        assert set(got) == set(want) and all(np.array_equal(got[k], v) for k, v in want.items())

    check(viz)
    attrs = read_attrs(viz)
    assert attrs["format"] == VIZ_FORMAT and attrs["complete"] is True and attrs["n_images"] == attrs["n"] == 12
    assert attrs["shards"] == names and attrs["missing_shards"] == [] and attrs["missing_reasons"] == {}
    assert attrs["config"] == ROOT_ATTRS["config"] and attrs["class_names"] == ["cat", "dog"]
    assert "shard" not in attrs and attrs["varying_attrs"] == ["shard"]
    with h5py.File(viz, "r") as f:
        ds = f["act/layer1.0"]
        assert ds.is_virtual and [m.file_name for m in ds.virtual_sources()] == names  # relative names
        assert [d.label for d in ds.dims] == list(DIMS["act/layer1.0"]) and list(ds.dims[0].keys()) == ["index"]
        assert f["index"].is_scale
    moved = tmp_path / "elsewhere" / "run2"
    shutil.move(run, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the old place nor the cwd holds the shards
    check(moved / "viz" / "viz.h5")
    check(Path("run2/viz/viz.h5"))


def test_collate_leaves_out_missing_and_incomplete_shards(tmp_path):
    folder = tmp_path / "viz" / "shards"
    paths, datas = make_shards(folder, [3, 2, 4, 2, 3])
    paths[1].unlink()  # never written
    shutil.move(paths[2], folder / f"{paths[2].name}.tmp-99999")  # a killed writer's temp file
    with h5py.File(paths[3], "r+") as f:
        del f.attrs["complete"]  # finished writing data but never marked complete
    result = collate(paths, tmp_path / "viz" / "viz.h5")
    assert result["n_images"] == 6 and result["present"] == ["shards/shard-00000.h5", "shards/shard-00004.h5"]
    reasons = result["missing"]
    assert list(reasons) == [f"shards/shard-0000{k}.h5" for k in (1, 2, 3)]
    assert reasons["shards/shard-00001.h5"] == "no such file"
    assert "shard-00002.h5.tmp-99999" in reasons["shards/shard-00002.h5"]
    assert "incomplete" in reasons["shards/shard-00003.h5"]
    got = read_shard(tmp_path / "viz" / "viz.h5")
    for name in DIMS:  # exactly shards 0 and 4: no fill rows in between
        assert np.array_equal(got[name], np.concatenate([datas[0][name], datas[4][name]])), name
    attrs = read_attrs(tmp_path / "viz" / "viz.h5")
    assert attrs["complete"] is False and attrs["missing_shards"] == list(reasons)
    assert attrs["missing_reasons"] == reasons and attrs["n_images"] == 6


@pytest.mark.parametrize("odd", ["dtype", "shape", "names", "checkpoint"])
def test_collate_refuses_mismatched_shards(tmp_path, odd):
    paths, _ = make_shards(tmp_path / "shards", [3])
    data = shard_data(2, seed=1)
    if odd == "dtype":
        data["logits"] = data["logits"].astype(np.float64)
    elif odd == "shape":
        data["act/layer1.0"] = data["act/layer1.0"][:, :4]
    elif odd == "names":
        del data["label"]
    odd_path = tmp_path / "shards" / "shard-00001.h5"
    write_shard(odd_path, data, **({"checkpoint_sha256": "cd" * 32} if odd == "checkpoint" else {}))
    with pytest.raises(StoreError) as e:
        collate([*paths, odd_path], tmp_path / "viz.h5")
    assert "shard shards/shard-00001.h5 does not match" in one_line(e, tmp_path / "viz.h5")
    assert not (tmp_path / "viz.h5").exists()
    with pytest.raises(StoreError, match="no complete shard"):
        collate([tmp_path / "nope.h5"], tmp_path / "viz.h5")


def test_collate_checks_planned_sizes_and_skips_empty_shards(tmp_path):
    paths, datas = make_shards(tmp_path / "shards", [3, 2, 4])
    empty = tmp_path / "shards" / "empty.h5"
    with ShardWriter(empty, 0, {**ROOT_ATTRS, "shard": 9}) as w:  # a task with no images still verifies
        for name, array in shard_data(0).items():
            w.write(name, 0, array, dims=DIMS[name], dtype=np.float16 if name.startswith("act/") else None)
    assert verify_shard(empty, 0)["n"] == 0
    result = collate([*paths, empty], tmp_path / "viz.h5", sizes=[3, 5, 4, 0])
    assert result["n_images"] == 7 and list(result["missing"]) == ["shards/shard-00001.h5"]
    assert "expected 5 rows" in result["missing"]["shards/shard-00001.h5"]
    got = read_shard(tmp_path / "viz.h5", ["index"])["index"]
    assert np.array_equal(got, np.concatenate([datas[0]["index"], datas[2]["index"]]))


def test_virtual_file_with_a_deleted_source(tmp_path, monkeypatch):
    paths, _ = make_shards(tmp_path / "shards", [2, 3])
    viz = tmp_path / "viz.h5"
    collate(paths, viz)
    paths[1].unlink()
    for read in (lambda: read_shard(viz, ["images"]), lambda: dataset_stats(viz, "act/layer1.0"),
                 lambda: read_image(viz, "images", 0)):
        with pytest.raises(StoreError, match="shards/shard-00001.h5, which is missing"):
            read()  # rather than handing back fill values as if they were data

    def no_reading(*args, **kwargs):
        raise AssertionError("describe read dataset values")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    desc = describe(viz)
    objects = {o["name"]: o for o in desc["objects"]}
    assert objects["act/layer1.0"]["shape"] == (5, 5, 2, 2) and objects["act/layer1.0"]["is_virtual"]
    assert objects["act/layer1.0"]["sources"] == 2 and objects["act"]["kind"] == "group"
    assert desc["attrs"]["n_images"] == 5


# ----------------------------------------------------------------------------- inspection
def test_describe_shard(tmp_path):
    path = tmp_path / "s.h5"
    write_shard(path, shard_data(3), notes="x" * 1000, classes=[f"c{k}" for k in range(100)])
    desc = describe(path)
    assert desc["path"] == str(path) and desc["file_bytes"] == path.stat().st_size
    assert desc["attrs"]["notes"].endswith("(1000 chars)") and len(desc["attrs"]["notes"]) < 200
    assert desc["attrs"]["classes"][-1] == "... (100 items)" and len(desc["attrs"]["classes"]) == 9
    act = {o["name"]: o for o in desc["objects"]}["act/layer1.0"]
    assert act["shape"] == (3, 5, 2, 2) and act["dtype"] == "float16" and act["chunks"] == (3, 5, 2, 2)
    assert act["dims"] == list(DIMS["act/layer1.0"]) and act["scales"][0] == ["index"]
    assert act["attrs"] == {"block": "layer1.0", "fp16_overflow": 0} and not act["is_virtual"]
    assert [o["name"] for o in desc["objects"]] == ["act", "act/layer1.0", "deconv", "deconv/layer1.0",
                                                    "deconv/layer1.0/residual", "images", "index", "label", "logits"]


@pytest.mark.parametrize("reader", [verify_shard, describe, list_datasets, read_shard, read_attrs,
                                    lambda p: dataset_stats(p, "images")])
def test_readers_on_bad_files(tmp_path, reader):
    path = tmp_path / "s.h5"
    write_shard(path, shard_data(40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as e:
        reader(path)
    assert "truncated" in one_line(e, path)
    path.write_bytes(b"not hdf5 at all\n" * 50)
    with pytest.raises(StoreError) as e:
        reader(path)
    assert "not an HDF5 file" in one_line(e, path)


def test_dataset_stats_and_read_image(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    data = shard_data(7)
    deconv = data["deconv/layer1.0/residual"]
    deconv[2, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    deconv[4, 1] = 0.0
    write_shard(path, data)
    monkeypatch.setattr(contents, "_STATS_ELEMS", 100)  # 2 images per block: exercises the merge
    stats = dataset_stats(path, "deconv/layer1.0/residual")
    finite = deconv[np.isfinite(deconv)].astype(np.float64)
    assert stats["shape"] == (7, 3, 4, 4) and stats["count"] == deconv.size and stats["finite"] == finite.size
    assert (stats["nan"], stats["inf"], stats["zeros"]) == (1, 2, 16)
    assert stats["min"] == finite.min() and stats["max"] == finite.max()
    assert np.isclose(stats["mean"], finite.mean(), rtol=1e-12) and np.isclose(stats["std"], finite.std(), rtol=1e-12)
    one = dataset_stats(path, "images", 3)
    assert one["shape"] == (3, 4, 4) and one["max"] == data["images"][3].max() and one["index"] == 3
    assert np.array_equal(read_image(path, "images", 6), data["images"][6])
    with pytest.raises(StoreError, match=r"index 7 out of range .* valid: 0\.\.6"):
        read_image(path, "images", 7)
    with pytest.raises(StoreError, match=r"no dataset 'act/layer9'; valid: act/layer1\.0;"):
        dataset_stats(path, "act/layer9")
    with pytest.raises(StoreError, match=r"no dataset 'nope'; valid: act/, deconv/, images, index, label, logits;"):
        read_shard(path, ["nope"])


def test_h5_tools_read_shard_and_viz(tmp_path):
    if not shutil.which("h5ls") or not shutil.which("h5dump"):
        pytest.skip("h5ls/h5dump not on PATH (apt-get install -y hdf5-tools)")
    paths, _ = make_shards(tmp_path / "shards", [3, 2])
    viz = tmp_path / "viz.h5"
    collate(paths, viz)
    for path, n in [(paths[0], 3), (viz, 5)]:
        r = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"/act/layer1.0            Dataset {{{n}, 5, 2, 2}}" in r.stdout and "/index" in r.stdout
        r = subprocess.run(["h5dump", "-H", "-p", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "DIMENSION_LIST" in r.stdout and "H5T_IEEE_F32LE" in r.stdout, r.stderr
    assert "VIRTUAL" in r.stdout and "shards/shard-00001.h5" in r.stdout


def test_chunks_hold_whole_images_of_about_one_mebibyte(tmp_path, monkeypatch):
    from hpcviz.store import shards
    monkeypatch.setattr(shards, "CHUNK_BYTES", 1000)
    with ShardWriter(tmp_path / "s.h5", 10, {}) as w:
        w.write("act/big", 0, np.zeros((10, 8, 8, 8), np.float16), dims=("image", "channel", "y", "x"))  # 1 KiB/image
        w.write("act/small", 0, np.zeros((10, 4, 2, 2), np.float32), dims=("image", "channel", "y", "x"))  # 64 B
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["act/big"].chunks == (1, 8, 8, 8)  # never less than one image
        assert f["act/small"].chunks == (10, 4, 2, 2)  # as many whole images as fit, at most the shard


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_chunks_assembled_from_any_batches_read_back_exactly(tmp_path, monkeypatch, compression):
    """Batches that split chunks, out of order, a rewrite of rows already on disk, a last partial chunk:
    the file holds exactly the last value written to every row (uncompressed: chunks written whole)."""
    from hpcviz.store import shards
    monkeypatch.setattr(shards, "CHUNK_BYTES", 4 * 48)  # 4 images of 48 B per chunk
    rng = np.random.default_rng(0)
    data = rng.standard_normal((11, 3, 2, 2)).astype(np.float32)  # chunks: rows 0-3, 4-7, 8-10
    expect = data.copy()
    with ShardWriter(tmp_path / "s.h5", 11, {}, compression=compression) as w:
        for a, b in ((6, 9), (0, 4), (9, 11), (4, 6), (1, 2)):  # the last rewrites row 1 of a chunk on disk
            part = data[a:b] * (2 if (a, b) == (1, 2) else 1)
            expect[a:b] = part
            w.write("act/x", a, part, dims=("image", "channel", "y", "x"))
        if compression is None:
            assert not any(w._pending.values()) and w._flushed["act/x"] == {0, 1, 2}
    got = read_shard(tmp_path / "s.h5", ["act/x"])["act/x"]
    assert np.array_equal(got, expect)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["act/x"].chunks == (4, 3, 2, 2) and np.array_equal(f["act/x"][8:11], expect[8:11])


def test_background_writer_overlaps_and_hands_errors_back(tmp_path):
    from hpcviz.store import BackgroundWriter
    path = tmp_path / "s.h5"
    with ShardWriter(path, 4, {}) as w, BackgroundWriter(w, depth=2) as bw:
        for k in range(4):
            bw.write("index", k, np.array([k]), dims=("image",))
    assert read_shard(path, ["index"])["index"].tolist() == [0, 1, 2, 3] and bw.seconds > 0
    with pytest.raises(StoreError, match="rows"):  # an error of the thread comes back, and nothing is left
        with ShardWriter(tmp_path / "t.h5", 2, {}) as w, BackgroundWriter(w) as bw:
            bw.write("index", 5, np.array([1]), dims=("image",))
            bw.close()
    assert not (tmp_path / "t.h5").exists() and not list(tmp_path.glob("t.h5.tmp-*"))
