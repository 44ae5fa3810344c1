import json
import math
import signal
from pathlib import Path

import pytest
import torch

from hpcviz.config import ConfigError, TrainConfig
from hpcviz.rundir import RunDir
from hpcviz.train import checkpoint
from hpcviz.train import loop as train_mod
from hpcviz.train.loop import TrainingError, lr_at, train


def test_lr_schedules_by_hand():
    cfg = TrainConfig(lr=1.0, warmup_epochs=1.0, schedule="onecycle")
    # 10 steps/epoch, 3 epochs: warm-up over 10 steps from 0.1 to 1, then linear to 0 over 20
    assert lr_at(0, 30, 10, cfg) == pytest.approx(0.1)
    assert lr_at(5, 30, 10, cfg) == pytest.approx(0.55)
    assert lr_at(10, 30, 10, cfg) == pytest.approx(1.0)
    assert lr_at(20, 30, 10, cfg) == pytest.approx(0.5)
    cfg.schedule = "cosine"
    assert lr_at(20, 30, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    cfg.schedule = "constant"
    assert lr_at(29, 30, 10, cfg) == 1.0


def test_run_files(tiny_cfg):
    cfg = tiny_cfg()
    result = train(cfg)
    run = Path(cfg.run_dir)
    metrics = RunDir(run).read_metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"} <= set(metrics[0])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n"] == 20 and sum(ev["per_class_n"]) == 20  # 10% of 200 images, each counted once
    assert ev["accuracy"] == pytest.approx(result["val_accuracy"])
    conf = torch.tensor(ev["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == 20
    assert ev["accuracy"] == pytest.approx(float(conf.diag().sum()) / 20)
    state = checkpoint.load_checkpoint(run / "checkpoints")
    assert state["config"]["arch"] == "resnet20" and state["epoch"] == 2 and state["step"] == 0
    assert ev["checkpoint_sha256"] == state["sha256"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train"]["status"] == "done"
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 32


class _StopAfter(train_mod.StopRequest):
    """Pretends SIGUSR2 arrived after `k` checks (one check per step on CPU)."""
    k = 3

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads = 0

    @property
    def signum(self):
        self.reads += 1
        return signal.SIGUSR2 if self.reads > self.k else None

    @signum.setter
    def signum(self, value):
        pass


@pytest.mark.parametrize("stop_after", [3, pytest.param(5 + 2, marks=pytest.mark.slow)])  # mid-epoch 1, and 2 (5 steps/epoch)
def test_stop_and_resume_is_bit_exact(tiny_cfg, tmp_path, monkeypatch, stop_after):
    whole = train(tiny_cfg(run_dir=str(tmp_path / "whole")))
    monkeypatch.setattr(_StopAfter, "k", stop_after)
    monkeypatch.setattr(train_mod, "StopRequest", _StopAfter)
    cut = tiny_cfg(run_dir=str(tmp_path / "cut"))
    stopped = train(cut)
    assert stopped["status"] == "stopped" and stopped["signal"] == signal.SIGUSR2
    assert (stopped["epoch"], stopped["step"]) == divmod(stop_after + 1, 5)  # stops at the check after k
    monkeypatch.undo()
    cut.resume = "auto"
    resumed = train(cut)
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    a = RunDir(tmp_path / "whole").read_metrics()
    b = RunDir(tmp_path / "cut").read_metrics()
    assert [m["epoch"] for m in b] == [1, 2]
    for ma, mb in zip(a, b):  # the resumed epoch reports the same numbers too
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-12)
        assert ma["val_acc"] == mb["val_acc"]


def test_existing_run_is_not_overwritten(tiny_cfg):
    cfg = tiny_cfg(epochs=1)
    train(cfg)
    before = checkpoint.sha256_file(checkpoint.Path(cfg.run_dir) / "checkpoints" / "last.pt")
    manifest = (checkpoint.Path(cfg.run_dir) / "manifest.json").read_text()
    with pytest.raises(checkpoint.CheckpointError, match="--resume"):
        train(tiny_cfg(epochs=1))
    assert (checkpoint.Path(cfg.run_dir) / "manifest.json").read_text() == manifest
    assert checkpoint.sha256_file(checkpoint.Path(cfg.run_dir) / "checkpoints" / "last.pt") == before


def test_resume_from_other_arch_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg(epochs=1))
    other = tiny_cfg(arch="resnet18", stem="cifar", run_dir=str(tmp_path / "other"),
                     resume=str(tmp_path / "run" / "checkpoints" / "last.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="arch resnet20 .* arch resnet18"):
        train(other)


def test_resume_with_other_class_count_is_refused(tiny_cfg, tmp_path):
    from PIL import Image
    train(tiny_cfg(epochs=1))
    for cls in ("a", "b"):  # an image folder of 2 classes
        (tmp_path / "two" / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (16, 16), (i * 10, 0, 0) if cls == "a" else (0, i * 10, 0)).save(
                tmp_path / "two" / cls / f"{i}.png")
    other = tiny_cfg(data=str(tmp_path / "two"), run_dir=str(tmp_path / "other"),
                     resume=str(tmp_path / "run" / "checkpoints" / "last.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="with 10 classes, this run .* with 2 classes"):
        train(other)


def test_nan_loss_stops_with_epoch_and_step(tiny_cfg):
    cfg = tiny_cfg(epochs=2, lr=1e30, schedule="constant")
    with pytest.raises(TrainingError, match=r"not finite at epoch 1, step \d+"):
        train(cfg)
    assert not (checkpoint.Path(cfg.run_dir) / "checkpoints" / "last.pt").exists()
    manifest = json.loads((checkpoint.Path(cfg.run_dir) / "manifest.json").read_text())["train"]
    assert manifest["status"] == "failed" and "not finite" in manifest["error"]


def test_batch_larger_than_data(tiny_cfg):
    with pytest.raises(ConfigError, match="--batch-size 4096"):
        train(tiny_cfg(batch_size=4096))


def test_gpu_ranks_share_the_cores_too(monkeypatch):
    """N local GPU ranks each used every core while decoding and gathering: the cap is for any device."""
    import os

    from hpcviz import dist
    _set_threads = dist.share_cores
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv(world_size=2, local_world_size=2))
    try:
        _set_threads()
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # what SLURM gave the task
        _set_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(dist, "_ENV", dist.DistEnv())  # one task per node: SLURM's count still holds
        torch.set_num_threads(cores)
        _set_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        monkeypatch.setenv(dist.THREADS_VAR, "1")  # local array tasks started together share the cores
        torch.set_num_threads(cores)
        assert _set_threads() == 1
    finally:
        torch.set_num_threads(before)
        monkeypatch.setattr(dist, "_ENV", dist.DistEnv())


@pytest.mark.slow
@pytest.mark.parametrize("minutes, saves", [(10.0, 1), (0.0, 3)])
def test_checkpoints_by_time_and_never_a_second_hash(tiny_cfg, monkeypatch, minutes, saves):
    """Epochs of a second save once, at the end, by default (every 10 minutes); with 0 every epoch. Keeping the
    previous checkpoint as prev.pt reads no file again: this process wrote it (only eval.json's hash is read,
    and that from memory)."""
    written, hashed = [], []
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda state, d: written.append(state["epoch"]) or save(state, d))
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or pytest.fail("a checkpoint re-hashed"))
    train(tiny_cfg(epochs=3, checkpoint_minutes=minutes))
    assert written == list(range(4 - saves, 4)) and not hashed
