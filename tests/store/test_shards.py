"""hpcviz.store: shards (ShardWriter, verify_shard, read_shard), chunks of whole images, the background writer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcviz.store import (
    SHARD_FORMAT,
    ShardWriter,
    StoreError,
    describe,
    list_datasets,
    read_shard,
    verify_shard,
)

from conftest import DIMS, ROOT, ROOT_ATTRS, one_line, shard_data, write_shard


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
