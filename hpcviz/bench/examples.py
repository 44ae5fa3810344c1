"""`benchmark.py examples`: the dataset examples at scale, every ratio against a baseline of the same run.

A scratch run of an untrained model (random weights, imported like a model trained elsewhere: the speed and
the exactness do not depend on the weights) visualizes `images` images of the training split in `tasks` array
tasks, dumping every block and nothing else (no deconvnet, no inversion: the task at its cheapest, so the
map's share is the largest it can be). Measured:
- the map: shard 0 run without and with it (the same images, the same process), and the map's own clock in
  every shard;
- the merge: collation of all the shards (virtual view + exact merge), and the reduce alone;
- the exactness: the merged lists against a brute-force top-k over the stored activations of viz.h5, read
  back in blocks of images;
- the projections: every block's first `project_channels` channels, in seconds per channel, computed in the
  receptive field only (explain.window) and, the baseline, on the whole image then cropped.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist, store
from ..config import ImportConfig, VizConfig
from ..data.sources import peek
from ..explain.dataset_examples import reduce_summaries
from ..models import block_names, build_model
from ..rundir import RunDir
from ..train import checkpoint
from ..train.weights import prepare_import, write_import
from ..viz.collation import collate
from ..viz.plan import make_plan
from ..viz.projection import merged_lists, project_range
from ..viz.task import visualize_shard

__all__ = ["bench_examples", "brute_force_topk"]


def brute_force_topk(act: np.ndarray, index: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The oracle of this benchmark and of the tests: the top-k of stored activations (N, C, h, w) with their
    positions (N,), by sorting all (one pass, no merge)."""
    n, c, h, w = act.shape
    flat = np.asarray(act).reshape(n, c, h * w)
    where = flat.argmax(axis=2)  # the first maximum, as the map
    value = np.nan_to_num(flat.max(axis=2).astype(np.float32), nan=-np.inf)  # (N, C)
    order = np.stack([np.lexsort((index, -value[:, j].astype(np.float64)))[:k] for j in range(c)])  # (C, k)
    return {"value": value.T[np.arange(c)[:, None], order], "index": np.asarray(index)[order],
            "y": (where.T[np.arange(c)[:, None], order] // w).astype(np.int32),
            "x": (where.T[np.arange(c)[:, None], order] % w).astype(np.int32)}


def make_scratch_run(scratch: Path, arch: str, stem: str, data: str, image_size: int) -> RunDir:
    """A run of an untrained `arch` over `data`, made by importing its random weights (no evaluation)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    classes = peek(data, image_size).classes
    torch.manual_seed(0)
    weights = scratch / "weights.pt"
    torch.save(build_model(arch, len(classes) if classes else 10, stem).state_dict(), weights)
    cfg = ImportConfig(weights=str(weights), arch=arch, stem=stem, data=data, image_size=image_size, normalize="data",
                       evaluate=False, run_dir=str(scratch / "run"))
    write_import(prepare_import(cfg))
    return RunDir(scratch / "run")


def _peaks(path: Path, block: str, rows: int) -> np.ndarray:
    """Spatial maxima (N, C) of act/<block> in viz.h5, read `rows` images at a time."""
    n = len(store.read_shard(path, ["index"])["index"])
    out = []
    for lo in range(0, n, rows):
        a = store.read_shard(path, [f"act/{block}"], rows=slice(lo, lo + rows))[f"act/{block}"]  # (b, C, h, w)
        out.append(a.reshape(a.shape[0], a.shape[1], -1).max(axis=2).astype(np.float32))
    return np.concatenate(out)


def check_exact(path: Path, blocks: list[str], k: int) -> dict[str, Any]:
    """The merged top-k values and positions against a brute-force sort of every image's spatial maximum."""
    index = store.read_shard(path, ["index"])["index"]
    wrong = {}
    for block in blocks:
        ref = brute_force_topk(_peaks(path, block, 512)[:, :, None, None], index, k)  # each map read as its maximum
        got = store.read_shard(path, [f"topk/{block}/value", f"topk/{block}/index"])
        if not all(np.array_equal(got[f"topk/{block}/{f}"], ref[f]) for f in ("value", "index")):
            wrong[block] = "differs"
    return {"exact": not wrong, "blocks_checked": len(blocks), "wrong": wrong}


def time_projection(run: RunDir, blocks: list[str], channels: int, device: str) -> dict[str, dict[str, float]]:
    """Seconds per channel (its k projections, patches, grid and part file) of each block, over its first
    `channels` channels, by the projection array's own code (`projection.project_range`): {"windowed": {block:
    s}, "full": {block: s}} (the receptive field only, explain.window; the whole image, then cropped)."""
    plan = run.read_plan()
    state = checkpoint.load_checkpoint(run.checkpoints)
    lists = merged_lists(run, plan)
    rows = {int(p): r for r, p in enumerate(store.read_shard(run.viz_file, ["index"])["index"])}

    def images(positions: np.ndarray) -> np.ndarray:
        return store.read_shard(run.viz_file, ["images"], rows=[rows[int(p)] for p in positions])["images"]
    out: dict[str, dict[str, float]] = {"windowed": {}, "full": {}}
    for i, block in enumerate(blocks):
        c = min(channels, len(lists[block]["index"]))
        for way in ("full", "windowed"):
            t0 = time.perf_counter()
            project_range(run, plan, state, 1000 + i, (block, 0, c), lists[block], images, device,
                          window=way == "windowed")
            out[way][block] = (time.perf_counter() - t0) / c
    return out


def bench_examples(scratch: Path, data: str, images: int = 10000, tasks: int = 4, k: int = 9,
                   arch: str = "resnet18", stem: str = "cifar", image_size: int = 32, batch_size: int = 256,
                   device: str = "auto", project_channels: int = 16) -> dict[str, Any]:
    run = make_scratch_run(scratch, arch, stem, data, image_size)
    dev = dist.pick_device(device)
    dist.share_cores()
    cfg = VizConfig(run_dir=str(run.path), split="train", images=images, tasks=tasks, batch_size=batch_size, topk=k,
                    deconv_blocks=[], invert_blocks=[], device=device)
    plan = make_plan(cfg)
    run.write_plan(plan)
    state = checkpoint.load_checkpoint(run.checkpoints)
    out: dict[str, Any] = {"arch": arch, "stem": stem, "images": plan.n_images, "tasks": tasks, "k": k,
                           "device": str(dev), "blocks": len(plan.blocks)}
    with dist.numerics(exact=True):
        # the same shard without the map, then with it (twice each, alternating; the faster of each counts)
        bare, mapped = [], []
        for _ in range(2):
            bare.append(visualize_shard(run, 0, dataclasses.replace(plan, topk=0), state, dev)["total"])
            mapped.append(visualize_shard(run, 0, plan, state, dev))
        shards = [min(mapped, key=lambda s: s["total"])]
        for s in range(1, len(plan.shards)):
            shards.append(visualize_shard(run, s, plan, state, dev))
    out["map"] = {"shard0_without_s": min(bare), "shard0_with_s": shards[0]["total"],
                  "added": shards[0]["total"] / min(bare) - 1,
                  "topk_share_of_tasks": sum(s["topk"] for s in shards) / sum(s["total"] for s in shards),
                  "task_seconds": [s["total"] for s in shards]}
    t0 = time.perf_counter()
    summary = collate(run, plan)
    out["merge"] = {"collate_s": time.perf_counter() - t0, "n_images": summary["n_images"]}
    t0 = time.perf_counter()
    parts = [store.read_summaries(run.shard(s)) for s in range(len(plan.shards))]
    reduce_summaries(parts, plan.blocks, k, {})
    out["merge"]["reduce_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["exactness"] = {**check_exact(run.viz_file, plan.blocks, k), "seconds": time.perf_counter() - t0}
    per = time_projection(run, plan.blocks, project_channels, device)
    channels = {b: int(store.read_shard(run.viz_file, [f"topk/{b}/index"])[f"topk/{b}/index"].shape[0])
                for b in block_names(build_model(arch, 10, stem))}
    out["projection"] = {"seconds_per_channel": per["windowed"], "full_seconds_per_channel": per["full"],
                         "channels": channels,
                         "all_channels_s": sum(per["windowed"][b] * channels[b] for b in per["windowed"]),
                         "full_all_channels_s": sum(per["full"][b] * channels[b] for b in per["full"])}
    return out
