"""hpcviz.store: what a file holds (describe, dataset_stats, read_image) and HDF5's own tools."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from hpcviz.store import (
    StoreError,
    contents,
    dataset_stats,
    describe,
    list_datasets,
    read_attrs,
    read_image,
    read_shard,
    verify_shard,
    write_view,
)

from conftest import DIMS, make_shards, one_line, shard_data, write_shard


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
    write_view(paths, viz)
    for path, n in [(paths[0], 3), (viz, 5)]:
        r = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"/act/layer1.0            Dataset {{{n}, 5, 2, 2}}" in r.stdout and "/index" in r.stdout
        r = subprocess.run(["h5dump", "-H", "-p", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "DIMENSION_LIST" in r.stdout and "H5T_IEEE_F32LE" in r.stdout, r.stderr
    assert "VIRTUAL" in r.stdout and "shards/shard-00001.h5" in r.stdout
