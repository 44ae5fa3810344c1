"""The GPU check (`pytest -m gpu`): training, local launch, visualization, placements and the sync count on
CUDA. Each test skips with the reason where no CUDA device is visible."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (the GPU check)")]

TINY = dict(data="builtin:20", image_size=16, arch="resnet20", epochs=2, batch_size=32, lr=0.05,
            eval_batch_size=64, log_every=1000)


def _cfg(tmp_path, name, **kw):
    from hpcviz.config import TrainConfig
    return TrainConfig(**{**TINY, "run_dir": str(tmp_path / name), "device": "cuda", **kw})


def test_train_on_cuda_bf16_channels_last_then_resume(tmp_path):
    from hpcviz.train import checkpoint
    from hpcviz.train.loop import train
    cfg = _cfg(tmp_path, "r", amp="bf16", channels_last=True, epochs=1)
    first = train(cfg)
    assert first["status"] == "done"
    done = train(dataclasses.replace(cfg, epochs=2, resume="auto"))
    assert done["status"] == "done" and 0 <= done["val_accuracy"] <= 1
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["train"]["device"].startswith("cuda")
    # the checkpoint holds CPU tensors: plain weights_only loading works where no GPU is visible
    path = checkpoint.find_checkpoint(tmp_path / "r" / "checkpoints")
    code = f"import torch; s = torch.load({str(path)!r}, weights_only=True); " \
           "assert all(t.device.type == 'cpu' for t in s['model'].values()); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_local_cluster_with_one_gpu(tmp_path):
    run = tmp_path / "local"
    args = ["--arch", "resnet20", "--data", "builtin:20", "--image-size", "16", "--batch-size", "32",
            "--epochs", "1", "--lr", "0.05", "--cluster", "local", "--gpus", "1", "--run", str(run)]
    r = run_job("launch_train.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "manifest.json").read_text())["train"]["device"].startswith("cuda")


def test_viz_on_cuda_matches_the_cpu(tmp_path):
    """Deconvnet on CUDA equals the CPU result within 1e-4 (relative, exact numerics: no TF32, deterministic
    unpooling); short inversions are finite with errors within 0.02 of the CPU's."""
    from hpcviz import dist
    from hpcviz.explain.deconv import PATHS, Deconvnet
    from hpcviz.explain.inversion import InversionConfig, invert
    from hpcviz.models import build_model
    torch.manual_seed(0)
    for arch, stem in (("resnet18", "imagenet"), ("resnet20", "")):
        model = build_model(arch, 10, stem).eval()
        x = torch.randn(4, 3, 32, 32)
        cpu = Deconvnet(model).reconstruct_all(x, None, PATHS)
        with dist.numerics(exact=True):
            gpu = Deconvnet(model.cuda()).reconstruct_all(x.cuda(), None, PATHS)
            again = Deconvnet(model).reconstruct_all(x.cuda(), None, PATHS)
        for k, ref in cpu.items():
            rel = float((gpu[k].cpu() - ref).norm() / ref.norm().clamp_min(1e-12))
            assert rel < 1e-4, (arch, k, rel)
            assert torch.equal(gpu[k], again[k]), k  # deterministic: bit-identical reruns
        blocks = ["conv1", "layer1.0", model_last(model)]
        icfg = InversionConfig(steps=60)
        ref_inv = invert(model.cpu(), images=x, blocks=blocks, cfg=icfg)
        with dist.numerics(exact=True):
            gpu_inv = invert(model.cuda(), images=x.cuda(), blocks=blocks, cfg=icfg)
        for b in blocks:
            assert torch.isfinite(gpu_inv[b]["x"]).all()
            assert (gpu_inv[b]["error"] - ref_inv[b]["error"]).abs().max() <= 0.02, b


def model_last(model) -> str:
    from hpcviz.models import block_names
    return block_names(model)[-1]


@pytest.mark.parametrize("where", ["device", "host", "stream"])
def test_every_placement_on_cuda(tmp_path, where):
    from hpcviz.data import placement
    from hpcviz.data.sources import fingerprint, load_images
    from hpcviz.data.transforms import split_indices
    from hpcviz.store import write_packed
    from hpcviz.train.loop import train
    ds = load_images("builtin:20", 16)
    path = tmp_path / "set.h5"
    write_packed(path, ds.images.numpy(), ds.labels.numpy(), ds.classes, {"fingerprint": fingerprint(ds)})
    cfg = _cfg(tmp_path, where, data=str(path), data_placement=where, epochs=1)
    src = placement.open_source(cfg)
    train_idx, val_idx = split_indices(src.labels, 0.1, 0)
    feed, _ = placement.make_feeds(src, where, train_idx, val_idx, torch.device("cuda"))
    lists = [torch.arange(k, k + 8) for k in range(0, 64, 8)]
    for idx, (x, y) in zip(lists, feed.batches(lists)):
        assert x.is_cuda and torch.equal(x.cpu(), ds.images[train_idx[idx]]) and torch.equal(y.cpu(), ds.labels[train_idx[idx]])
    assert train(cfg)["status"] == "done"


@pytest.mark.parametrize("where", ["device", "host", "stream"])
def test_the_training_step_never_syncs(tmp_path, where):
    """torch.cuda.set_sync_debug_mode('error') over a whole epoch: only the checks every N steps (marked
    dist.sync_allowed) may wait for the device."""
    from hpcviz import dist
    from hpcviz.data.sources import fingerprint, load_images
    from hpcviz.store import write_packed
    from hpcviz.train.loop import prepare_data, train_steps
    ds = load_images("builtin:40", 16)
    path = tmp_path / "set.h5"
    write_packed(path, ds.images.numpy(), ds.labels.numpy(), ds.classes, {"fingerprint": fingerprint(ds)})
    cfg = _cfg(tmp_path, "sync", data=str(path), data_placement=where, epochs=3, log_every=25, amp="bf16")
    device = torch.device("cuda", 0)
    split = prepare_data(cfg, device)
    steps = split.train.n // cfg.batch_size
    session = train_steps(cfg, split, steps)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_steps(cfg, split, steps, session, epoch=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert dist.is_main()
