import logging

import pytest
import torch

from hpcviz.train import checkpoint
from hpcviz.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint


def state(v: float) -> dict:
    return {"model": {"w": torch.full((3,), v)}, "epoch": int(v), "config": {"arch": "resnet20"}}


def test_round_trip_and_rotation(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256", "prev.pt", "prev.pt.sha256"]
    s = load_checkpoint(tmp_path)
    assert s["epoch"] == 2 and torch.equal(s["model"]["w"], torch.full((3,), 2.0))
    assert s["sha256"] == checkpoint.sha256_file(tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "prev.pt")["epoch"] == 1
    # plain torch can read it, without unpickling code
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_last_falls_back_to_prev_with_a_warning(tmp_path, caplog, damage):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    last = tmp_path / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    last.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="hpcviz"):
        s = load_checkpoint(tmp_path)
    assert s["epoch"] == 1 and s["path"].endswith("prev.pt")
    assert "does not match its sha256" in caplog.text
    # the next save replaces the corrupt file and keeps the good previous one
    save_checkpoint(state(3), tmp_path)
    assert load_checkpoint(tmp_path)["epoch"] == 3 and load_checkpoint(tmp_path / "prev.pt")["epoch"] == 1


def test_a_save_stopped_mid_rotation_still_resumes(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    # the instant between moving last.pt to prev.pt and moving its sidecar: prev.pt has the old sidecar
    import os
    os.replace(tmp_path / "last.pt", tmp_path / "prev.pt")
    s = load_checkpoint(tmp_path)
    assert s["epoch"] == 2 and s["path"].endswith("prev.pt")


def test_no_good_checkpoint_is_an_error(tmp_path):
    assert find_checkpoint(tmp_path) is None
    save_checkpoint(state(1), tmp_path)
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint matches its sha256"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(tmp_path / "last.pt")


def test_foreign_files_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an hpcviz checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path)
    before = (tmp_path / "last.pt").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(state(2), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["epoch"] in (1,)  # last or prev, never a half-written one
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert before in {(tmp_path / n).read_bytes() for n in ("last.pt", "prev.pt") if (tmp_path / n).exists()}


def test_to_cpu_reaches_every_tensor_of_nested_state():
    from hpcviz.train.checkpoint import to_cpu
    t = torch.ones(2, requires_grad=True)
    out = to_cpu({"model": {"w": t}, "optimizer": {"state": {0: {"momentum_buffer": t}}, "groups": [{"lr": 0.1}]},
                  "pair": (t, 3)})
    assert out["model"]["w"].device.type == "cpu" and not out["model"]["w"].requires_grad
    assert isinstance(out["pair"], tuple) and out["pair"][1] == 3 and out["optimizer"]["groups"] == [{"lr": 0.1}]
