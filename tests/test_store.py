"""hpcviz.store (packed image sets, atomic writes) and the jobs/pack_data.py command."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcviz.store import PACKED_FORMAT, StoreError, atomic_path, read_packed, write_packed

ROOT = Path(__file__).resolve().parents[1]
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
        assert f["images"].chunks == (256, 3, 4, 4) and f["images"].compression is None
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # must work without installing
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
    spec = importlib.util.spec_from_file_location("pack_data", ROOT / "jobs" / "pack_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_data_main_in_process(tmp_path, capsys):
    pack_data = load_pack_data()
    parser = pack_data.get_args_parser(add_help=True)
    out = tmp_path / "b.h5"
    out.write_bytes(b"old")
    assert pack_data.main(parser.parse_args(["--data", "builtin:1", "--out", str(out), "--force"])) == 0
    assert read_packed(out)[0].shape == (10, 3, 32, 32)
    assert pack_data.main(parser.parse_args(["--data", str(tmp_path / "nope"), "--out",
                                             str(tmp_path / "c.h5")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "no such directory" in err
    assert not (tmp_path / "c.h5").exists()
