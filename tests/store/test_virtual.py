"""hpcviz.store: write_view, the virtual view viz.h5 over the shards."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcviz.store import (
    VIZ_FORMAT,
    ShardWriter,
    StoreError,
    dataset_stats,
    describe,
    read_attrs,
    read_image,
    read_shard,
    verify_shard,
    write_view,
)

from conftest import DIMS, ROOT_ATTRS, make_shards, one_line, shard_data, write_shard


def test_collate_is_the_concatenation_and_survives_a_move(tmp_path, monkeypatch):
    run = tmp_path / "run"
    paths, datas = make_shards(run / "viz" / "shards", [5, 3, 4])
    viz = run / "viz" / "viz.h5"
    names = [f"shards/shard-{k:05d}.h5" for k in range(3)]
    assert write_view(paths, viz) == {"n_images": 12, "present": names, "missing": {}}
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
    result = write_view(paths, tmp_path / "viz" / "viz.h5")
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
        write_view([*paths, odd_path], tmp_path / "viz.h5")
    assert "shard shards/shard-00001.h5 does not match" in one_line(e, tmp_path / "viz.h5")
    assert not (tmp_path / "viz.h5").exists()
    with pytest.raises(StoreError, match="no complete shard"):
        write_view([tmp_path / "nope.h5"], tmp_path / "viz.h5")


def test_collate_checks_planned_sizes_and_skips_empty_shards(tmp_path):
    paths, datas = make_shards(tmp_path / "shards", [3, 2, 4])
    empty = tmp_path / "shards" / "empty.h5"
    with ShardWriter(empty, 0, {**ROOT_ATTRS, "shard": 9}) as w:  # a task with no images still verifies
        for name, array in shard_data(0).items():
            w.write(name, 0, array, dims=DIMS[name], dtype=np.float16 if name.startswith("act/") else None)
    assert verify_shard(empty, 0)["n"] == 0
    result = write_view([*paths, empty], tmp_path / "viz.h5", sizes=[3, 5, 4, 0])
    assert result["n_images"] == 7 and list(result["missing"]) == ["shards/shard-00001.h5"]
    assert "expected 5 rows" in result["missing"]["shards/shard-00001.h5"]
    got = read_shard(tmp_path / "viz.h5", ["index"])["index"]
    assert np.array_equal(got, np.concatenate([datas[0]["index"], datas[2]["index"]]))


def test_virtual_file_with_a_deleted_source(tmp_path, monkeypatch):
    paths, _ = make_shards(tmp_path / "shards", [2, 3])
    viz = tmp_path / "viz.h5"
    write_view(paths, viz)
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
