"""One task of the visualization array: a shard of the plan's images, written to viz/shards/shard-NNNNN.h5.

Each array task receives only the run directory and its shard number (hpcviz.viz.plan), reads the plan,
loads the checkpoint (`weights_only=True`), runs its images forward once in batches (activations, logits, the
dataset examples' map), reconstructs them with the deconvnet and inverts them, and writes the shard through a
background writer. A shard that exists and belongs to the plan is skipped, so a rerun redoes only what is
missing.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import __version__, dist, store
from ..config import default_stem
from ..data.transforms import normalize
from ..explain.activations import dump_activations
from ..explain.cuda_graphs import StepCache
from ..explain.dataset_examples import TopK
from ..explain.deconv import Deconvnet
from ..explain.inversion import InversionConfig, invert, resolve_precision
from ..explain.invmem import batch_images, footprint
from ..log import TaskProgress, setup_logging
from ..models import from_checkpoint
from ..rundir import Plan, RunDir, now
from ..train import checkpoint
from .plan import VizError, load_split, shard_problem

__all__ = ["run_shard", "visualize_shard", "inversion_batch"]

log = logging.getLogger("hpcviz")


def _write_deconv(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan, start: int) -> None:
    """deconv/<block>/<path>: raw reconstructions in the network's (normalised) input space, float32."""
    if not plan.deconv_blocks:
        return
    recs = Deconvnet(model, exact=not plan.fast).reconstruct_all(x, plan.deconv_blocks, plan.paths)
    for (block, path), r in recs.items():  # r: (b, 3, H, W)
        w.write(f"deconv/{block}/{path}", start, r.float().cpu().numpy(), dims=("image", "channel", "y", "x"),
                attrs={"block": block, "path": path, "seed": "all",
                       "what": "deconvnet reconstruction, raw, in the network's normalised input space"})


def _write_inversions(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan,
                      state: dict[str, Any], start: int, progress: Any = None, fast_forward: bool = True,
                      cache: Any = None) -> None:
    """invert/<block> (raw, normalised input space, float32), invert_error/<block> (relative feature error)
    and invert_steps/<block> (the optimiser steps each image took before it stopped). cache: the task's
    explain.cuda_graphs.StepCache (its captured steps serve every batch)."""
    icfg = InversionConfig(prior=plan.prior, exact=not plan.fast, target=plan.invert_target,
                           solver=plan.invert_solver, fast_forward=fast_forward,
                           precision="exact" if plan.exact else "auto")
    if plan.invert_steps:
        icfg.steps = plan.invert_steps
    if not plan.invert_target:  # 0: every step, as before stopping rules existed
        icfg.window = 0
    out = invert(model, images=x, blocks=plan.invert_blocks, cfg=icfg, mean=state["mean"], std=state["std"],
                 progress=progress, cache=cache)
    for block, r in out.items():
        w.write(f"invert/{block}", start, r["x"].float().cpu().numpy(), dims=("image", "channel", "y", "x"),
                attrs={"block": block, "max_steps": icfg.steps, "target": icfg.target, "prior": icfg.prior,
                       "solver": icfg.solver,
                       "what": "inversion of the block's activation, raw, in the network's normalised input space"})
        w.write(f"invert_error/{block}", start, r["error"].float().cpu().numpy(), dims=("image",),
                attrs={"block": block, "what": "relative feature error ||phi(x) - phi0|| / ||phi0||"})
        w.write(f"invert_steps/{block}", start, r["steps"].to(torch.int32).numpy(), dims=("image",),
                attrs={"block": block, "what": f"optimiser steps taken (at most {icfg.steps}; fewer once the "
                       f"error reached {icfg.target:g} or stopped improving)"})


def _root_attrs(run: RunDir, plan: Plan, state: dict[str, Any], shard: int) -> dict[str, Any]:
    tcfg = state["config"]
    return {"run": run.path.resolve().name, **plan.shard_attrs(), "arch": tcfg["arch"],
            "stem": tcfg.get("stem") or default_stem(tcfg["arch"]), "image_size": tcfg["image_size"],
            "class_names": list(state["classes"]), "mean": list(state["mean"]), "std": list(state["std"]),
            "shard": shard, "n_shards": len(plan.shards), "config": {"viz": plan.to_dict()["config"], "train": tcfg},
            "versions": {"hpcviz": __version__, "torch": str(torch.__version__), "numpy": np.__version__},
            "created": now()}


def run_shard(run_dir: str, shard: int) -> str:
    """One array task: write (or, if it verifies already, skip) shard `shard` of the run's plan."""
    setup_logging()  # progress and timing lines in the task's own log
    run = RunDir(run_dir)
    plan = run.read_plan()
    if shard >= len(plan.shards):  # the pipeline's array is sized before the plan: a smaller split
        log.info("shard %d: the plan has %d shards, nothing to do", shard, len(plan.shards))
        return ""
    path = run.shard(shard)
    if shard_problem(run, shard, plan) is None:
        log.info("shard %d: %s exists and verifies, skipped", shard, path)
        return str(path)
    state = checkpoint.load_checkpoint(run.path / plan.checkpoint)
    if state["sha256"] != plan.checkpoint_sha256:
        raise VizError(f"{run.path / plan.checkpoint}: changed since the plan was made (sha256 differs); "
                       "hint: launch the visualization again")
    dist.share_cores()
    device = dist.pick_device(plan.config.device)
    where = dist.describe_device(device)
    log.info("shard %d: %d images on %s (%s numerics)", shard, len(plan.shards[shard]), where,
             "fast" if plan.fast else "exact")
    run.update("viz", lambda rec: {"devices": {**rec.devices, str(shard): where}})
    with dist.numerics(exact=not plan.fast):
        seconds = visualize_shard(run, shard, plan, state, device)
    log.info("shard %d done: %d images in %.1f s (%s s) -> %s", shard, len(plan.shards[shard]), seconds["total"],
             ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total"), path)
    return str(path)


_FORWARD_SHARE = 0.02  # measured: forward + deconvnet ~0.011 s per image, the default inversion ~1.1 s


def inversion_batch(plan: Plan, device: torch.device, model: torch.nn.Module | None = None,
                    hw: tuple[int, int] = (32, 32), free_bytes: int | None = None) -> int:
    """Images inverted together: --invert-batch-size, else on a GPU the largest power of two (at most 1024)
    whose inversion fits the free device memory (`free_bytes`, default: what CUDA reports) by the per-row
    memory model of explain.invmem (the architecture, the blocks, the image size hw); 64 on a CPU (the late
    steps, when few rows are left, use the cores better than with 32: ~10% faster per image measured)."""
    if plan.config.invert_batch_size:
        return plan.config.invert_batch_size
    if device.type != "cuda" or model is None:
        return 64
    icfg = InversionConfig()
    free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    fp = footprint(model, plan.invert_blocks, hw, plan.invert_steps or icfg.steps, icfg.history,
                   plan.invert_solver, "exact" if plan.exact else resolve_precision("auto", device), graphs=True)
    return batch_images(fp, free, most=1024)


class _Clock:
    """Seconds per part of a task; on a GPU each part is synchronised first, so the parts are its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {"load": 0.0, "forward": 0.0, "topk": 0.0, "deconv": 0.0, "inversion": 0.0}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - t0


def visualize_shard(run: RunDir, shard: int, plan: Plan, state: dict[str, Any], device: torch.device,
                    baseline: bool = False) -> dict[str, float]:
    """Forward (activations, logits), deconvnet and inversions of the shard's images, written by a thread
    while the next batch is computed, progress lines in the log; returns the seconds per part and in total.
    baseline: the way of before, for the benchmark: the whole split loaded to take the shard's images from it,
    the inversions batched like the forward, with the plain (unfolded) functional forward."""
    cfg, path, clock, t0 = plan.config, run.shard(shard), _Clock(device), time.perf_counter()
    with clock.part("load"):
        model = from_checkpoint(state, device)
        if baseline:
            images, labels, _ = load_split(state["config"], plan.split)
            images, labels = images[plan.shards[shard]], labels[plan.shards[shard]]
        else:
            images, labels, _ = load_split(state["config"], plan.split, plan.shards[shard])  # (n, 3, H, W), (n,)
    n, pos = len(images), torch.as_tensor(plan.shards[shard], dtype=torch.int64)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    inv = cfg.batch_size if baseline else inversion_batch(plan, device, model, size)
    # progress in image-units: the forward and deconvnet of an image weigh _FORWARD_SHARE of its inversion
    fw = _FORWARD_SHARE if plan.invert_blocks else 1.0
    progress = TaskProgress(fw * n + (n if plan.invert_blocks else 0), f"shard {shard}")
    attrs = {**_root_attrs(run, plan, state, shard), "device": dist.describe_device(device)}
    topk = TopK(plan.topk, len(state["classes"])) if plan.topk else None
    pos_dev, labels_dev = pos.to(device), labels.to(device)
    cache = StepCache()  # one per task: each padded shape's step is captured once and serves every batch
    with store.ShardWriter(path, n, attrs, compression=cfg.compression or None) as sw:
        with store.BackgroundWriter(sw) as w:
            w.write("index", 0, pos.numpy(), dims=("image",), attrs={"what": f"position in the {plan.split} split"})
            w.write("images", 0, images.numpy(), dims=("image", "channel", "y", "x"),
                    attrs={"what": "the exact uint8 pixels fed to the network (before normalisation)"})
            w.write("label", 0, labels.numpy(), dims=("image",))
            for start in range(0, n, cfg.batch_size):
                x = normalize(images[start:start + cfg.batch_size].to(device), state["mean"], state["std"])
                _forward_batch(w, model, x, plan, start, clock, topk, pos_dev, labels_dev)
                with clock.part("deconv"):
                    _write_deconv(w, model, x, plan, start)
                progress.update(fw * (start + len(x)), f"forward and deconvnet, images {start + len(x)}/{n}",
                                "forward")
            for start in range(0, n if plan.invert_blocks else 0, inv):
                x = normalize(images[start:start + inv].to(device), state["mean"], state["std"])

                def step(k: int, steps: int, running: int, rows: int, start: int = start, b: int = len(x)) -> None:
                    # rows leave fast at first (shallow blocks) while the deep ones cost the most: halfway
                    # between the share of rows done and of the step limit reached
                    progress.update(fw * n + start + b * (1 - running / rows + k / steps) / 2,
                                    f"inversion of images {start}-{start + b - 1} of {n}: step {k} of at most "
                                    f"{steps}, {running} of {rows} inversions still running", "inversion")
                with clock.part("inversion"):
                    _write_inversions(w, model, x, plan, state, start, step, fast_forward=not baseline, cache=cache)
        for name, (array, dims, a) in (topk.results() if topk is not None else {}).items():
            sw.write_summary(name, array, dims=dims, attrs={**a, "k": plan.topk})
    progress.close()
    return {**clock.seconds, "write": w.seconds, "total": time.perf_counter() - t0}


def _forward_batch(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan, start: int,
                   clock: _Clock, topk: TopK | None, pos: torch.Tensor, labels: torch.Tensor) -> None:
    """logits, pred and act/<block> of one batch; the dataset-examples map reads the activations as stored."""
    with clock.part("forward"):
        logits, acts = dump_activations(model, x, plan.blocks)  # (b, K), {block: (b, C, h, w)}
        # to float16 on the device: half the bytes to copy, and torch converts ~5x faster than numpy
        halves = {b: a.half() for b, a in acts.items()}
    if topk is not None:
        with clock.part("topk"):
            for block, h in halves.items():
                topk.update(block, h, pos[start:start + len(x)], labels[start:start + len(x)], acts[block])
    with clock.part("forward"):
        maps = {b: h.cpu().numpy() for b, h in halves.items()}
    w.write("logits", start, logits.cpu().numpy(), dims=("image", "class"))
    w.write("pred", start, logits.argmax(1).cpu().numpy(), dims=("image",))
    for block, a in maps.items():  # the writer counts the values that overflowed to inf (fp16_overflow)
        w.write(f"act/{block}", start, a, dims=("image", "channel", "y", "x"), dtype=np.float16,
                attrs={"block": block, "what": "output of the block (after its ReLU)"})
