"""hpcviz.data.packing and jobs/pack_data.py: any source packed in bounded chunks, streaming folders, progress, errors."""
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
    write_view,
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


from conftest import write_chunked, ROOT, CLASSES, one_line, tiny, ROOT_ATTRS, DIMS, shard_data, write_shard, make_shards


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
