"""Data placements: device, host and stream feed the same batches, so runs end bit-identical (CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hpcviz import dist
from hpcviz.data import placement
from hpcviz.config import TrainConfig
from hpcviz.data.sources import fingerprint, load_images
from hpcviz.data.transforms import channel_stats, split_indices


@pytest.fixture
def packed(tmp_path):
    """builtin:12 at 16 px packed into one file (the stream placement's input)."""
    from hpcviz.store import write_packed
    ds = load_images("builtin:12", 16)
    path = tmp_path / "set.h5"
    write_packed(path, ds.images.numpy(), ds.labels.numpy(), ds.classes, {"fingerprint": fingerprint(ds)})
    return path, ds


def _cfg(data, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), image_size=16, device="cpu", **kw)


def test_every_placement_yields_the_same_batches(packed):
    path, ds = packed
    src = placement.open_source(_cfg(path))
    assert src.reader is not None and src.images is None  # a packed file at the run's size is never loaded whole
    train_idx, val_idx = split_indices(src.labels, 0.1, seed=0)
    lists = [torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(k))[:7] for k in range(9)]
    lists.append(torch.tensor([3, 3, 0]))  # a short last batch, a repeated image
    got = {}
    for where in ("device", "host", "stream"):
        train, _ = placement.make_feeds(src, where, train_idx, val_idx, torch.device("cpu"), workers=3)
        assert train.placement == where
        got[where] = [(x.clone(), y.clone()) for x, y in train.batches(lists)]
    for k, idx in enumerate(lists):
        want = ds.images[train_idx[idx]], ds.labels[train_idx[idx]]
        for where in got:
            assert torch.equal(got[where][k][0], want[0]) and torch.equal(got[where][k][1], want[1]), (where, k)


def test_one_pass_statistics_and_fingerprint_equal_the_whole_set_ones(packed):
    path, ds = packed
    src = placement.open_source(_cfg(path))
    train_idx, _ = split_indices(src.labels, 0.1, seed=0)
    assert placement.train_stats(src, train_idx) == channel_stats(ds.images[train_idx])
    assert placement.source_fingerprint(dataclasses.replace(src, fingerprint="")) == fingerprint(ds)


def test_stream_needs_a_packed_file_at_the_run_size(packed, tmp_path):
    path, _ = packed
    with pytest.raises(placement.PlacementError, match="pack_data"):
        placement.open_source(_cfg("builtin:12"), "stream")
    with pytest.raises(placement.PlacementError, match="pack_data"):  # 16 px file, 24 px run: needs a resize
        placement.open_source(dataclasses.replace(_cfg(path), image_size=24), "stream")


def test_auto_picks_by_size(packed, monkeypatch):
    path, _ = packed
    src = placement.open_source(_cfg(path))
    dev = torch.device("cpu")
    assert placement.choose("auto", src, dev) == "device"
    monkeypatch.setattr(placement, "_free_device_bytes", lambda d: src.nbytes)  # does not fit 40% of the device
    assert placement.choose("auto", src, dev) == "host"
    monkeypatch.setattr(placement, "available_host_bytes", lambda: src.nbytes)  # nor half the node's memory
    assert placement.choose("auto", src, dev) == "stream"
    with pytest.raises(placement.PlacementError, match="not one of"):
        placement.choose("disk", src, dev)


@pytest.mark.parametrize("where", ["host", "stream"])
def test_a_run_ends_bit_identical_whatever_the_placement(tiny_cfg, packed, tmp_path, where):
    from hpcviz.train.loop import train
    path, _ = packed
    ref = train(tiny_cfg(data=str(path), data_placement="device", run_dir=str(tmp_path / "dev")))
    other = train(tiny_cfg(data=str(path), data_placement=where, run_dir=str(tmp_path / where)))
    assert other["weights_sha256"] == ref["weights_sha256"]
    assert other["val_accuracy"] == ref["val_accuracy"]


def test_a_stream_run_resumes_bit_exactly(tiny_cfg, packed, tmp_path, monkeypatch):
    from hpcviz.train import loop as train_mod
    path, _ = packed
    whole = train_mod.train(tiny_cfg(data=str(path), data_placement="stream", run_dir=str(tmp_path / "whole")))
    cfg = tiny_cfg(data=str(path), data_placement="stream", run_dir=str(tmp_path / "cut"))
    real = train_mod.train_one_epoch

    def stop_in_epoch_2(model, opt, split, c, pos, steps, meters, stop, save):
        if pos.epoch == 1 and pos.step == 0:
            stop.signum = 15  # as the SIGTERM handler would: stop at the next check
        return real(model, opt, split, c, pos, steps, meters, stop, save)
    monkeypatch.setattr(train_mod, "train_one_epoch", stop_in_epoch_2)
    assert train_mod.train(cfg)["status"] == "stopped"
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    resumed = train_mod.train(dataclasses.replace(cfg, resume="auto"))
    assert resumed["weights_sha256"] == whole["weights_sha256"]


def test_download_happens_once_on_rank_0(monkeypatch, tmp_path):
    calls = []

    def fake_load(spec, size, download=False, skip_bad=False):
        calls.append(("load", download))
        return load_images("builtin:2", 8)
    monkeypatch.setattr("hpcviz.data.placement.load_images", fake_load)  # as placement calls it
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier", None)))
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    cfg = TrainConfig(data=f"cifar10:{tmp_path}", image_size=8, download=True)
    for rank, want in ((0, [("load", True), ("barrier", None)]), (1, [("barrier", None), ("load", False)])):
        calls.clear()
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        placement.open_source(cfg)
        assert calls == want, rank


def test_node_shared_copy_is_mapped_once_and_removed(monkeypatch, tmp_path):
    """Two local ranks: rank 0 writes the mapped file, rank 1 maps it; once both have it, it is unlinked."""
    monkeypatch.setenv("HPCVIZ_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    cfg = TrainConfig(data="builtin:3", image_size=8)
    ds = load_images("builtin:3", 8)
    monkeypatch.setattr(dist, "local_rank", lambda: 0)
    leader = placement._share_on_node(cfg, None)
    assert not list(tmp_path.iterdir())  # unlinked after the (here: fake) barrier: the pages stay mapped
    assert torch.equal(leader.images, ds.images) and torch.equal(leader.labels, ds.labels)
    assert leader.fingerprint == fingerprint(ds)
