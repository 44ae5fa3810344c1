"""The projections of the dataset examples: every channel's top images projected by the deconvnet from that
channel's strongest activation alone, beside the input patch under its receptive field, in parts
(viz/examples/part-NNNNN.h5) that viz.h5 presents too.

The projections cost channels x k deconvnet passes, whatever the number of images: ResNet-18 (CIFAR stem) has
1984 channels, 17,856 passes, 113 s on 2 CPU cores (benchmark.py examples), but ResNet-50 at 224 px has 15,168
channels and ~7x the FLOPs per pass: ~1.7 h there (estimated). So they run as a second, small array
(`project_part`, one task per range of channels, the viz array's resources), after the first and before the
report; each task merges the shards' lists itself (a few MB, seconds). Aggregation then computes only what is
missing or stale: a part is current while the checkpoint and its channels' merged lists are the same (its
`digest`), so a report rerun, or a `--retry-failed` that changes no list, costs nothing.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist, store
from ..data.placement import available_host_bytes
from ..data.transforms import normalize
from ..explain.dataset_examples import (
    block_channels,
    crop,
    field_box,
    merge_topk,
    project,
    projection_footprint,
    receptive_field,
    shrink,
    split_channels,
)
from ..explain.deconv import Deconvnet
from ..explain.tiles import montage
from ..explain.window import project_field, projection_macs
from ..log import setup_logging
from ..models import from_checkpoint, shape_model
from ..rundir import Plan, RunDir, now
from ..train import checkpoint
from .plan import VizError, plan_arch, usable_shards

__all__ = ["Part", "projection_parts", "plan_parts", "stale_parts", "part_states", "current_parts", "project_part",
           "project_parts", "projection_batch", "project_range", "merged_lists", "shard_lists"]

log = logging.getLogger("hpcviz")
Part = tuple[str, int, int]  # (block, first channel, end)
_LISTS = ("index", "y", "x")


_PART_MACS = 2e12  # a projection part's work, about: ~50 s on 2 CPU cores (~40 GMAC/s measured), ~2 s on one H200
_ROW_MACS = 4e7    # a row's fixed costs (seeding, cropping, the patch), as multiply-adds: ~1 ms on 2 cores


def projection_parts(arch: str, stem: str, blocks: list[str], tasks: int, topk: int,
                     image_size: int = 32) -> list[Part]:
    """The projection tasks of a request: (block, channels) ranges of similar cost (window.projection_macs per
    row), as many as the work is worth at `_PART_MACS` each, at most one per array task of the first array and
    at least one per block; known from the architecture alone, so a pipeline sizes the array before training.
    ResNet-18 at 32 px, k = 9: 10 parts, not one per task (100 for 10,000 images on CPUs)."""
    if not topk:
        return []
    channels, macs = _architecture_costs(arch, stem, image_size)
    cost = {b: topk * (macs[b] + _ROW_MACS) for b in blocks}  # a channel's k projections
    work = sum(channels[b] * cost[b] for b in blocks)
    return split_channels({b: channels[b] for b in blocks}, max(1, min(tasks, math.ceil(work / _PART_MACS))), cost)


@functools.lru_cache(maxsize=16)
def _architecture_costs(arch: str, stem: str, image_size: int) -> tuple[dict[str, int], dict[str, float]]:
    """(channels, a row's multiply-adds) of every block, from the shape model's empty forward: asked for by
    every staleness check and part, the same for the same architecture."""
    model = shape_model(arch, 10, stem)
    return block_channels(model), projection_macs(model, (image_size, image_size))


def plan_parts(run: RunDir, plan: Plan) -> list[Part]:
    """The plan's parts, for the model it was made for: its architecture from viz.h5's root attrs once this
    plan is collated (no checkpoint to read), else from the checkpoint."""
    arch, stem, size = plan_arch(run, plan)
    return projection_parts(arch, stem, plan.blocks, len(plan.shards), plan.topk, size)


def stale_parts(run: RunDir, plan: Plan, from_shards: bool = False) -> list[int]:
    """The parts whose file does not match viz.h5's merged lists (all of them without viz.h5); `from_shards`:
    the lists merged from the shards present now, as the parts are made (a launcher that collates after them)."""
    good = usable_shards(run, plan) if from_shards else None
    return _staleness(run, plan, good)[2]


def part_states(run: RunDir, plan: Plan) -> list[tuple[int, str, str]]:
    """(part, state, detail) of every projection part of the plan: done, missing or stale (its lists are not
    viz.h5's merged lists: made from other shards, another checkpoint or another run)."""
    parts, _, stale = _staleness(run, plan)
    out = []
    for i, (block, lo, hi) in enumerate(parts):
        what = f"{block} channels {lo}-{hi - 1}"
        if not run.examples_part(i).is_file():
            out.append((i, "missing", f"{what}: no {run.rel(run.examples_part(i))}"))
        else:
            out.append((i, "stale" if i in stale else "done", what + (": not the lists of viz.h5 (other shards, "
                                                                      "checkpoint or run)" if i in stale else "")))
    return out


def _staleness(run: RunDir, plan: Plan, shards: list[int] | None = None
               ) -> tuple[list[Part], dict[str, dict[str, np.ndarray]], list[int]]:
    """(the plan's parts, viz.h5's merged lists, the parts whose file does not match them); `shards`: the lists
    merged from those shards instead (what collating them will write to viz.h5), viz.h5 not read."""
    parts = plan_parts(run, plan)
    nothing_merged = not run.viz_file.is_file() if shards is None else not shards
    if not parts or nothing_merged:
        return parts, {}, list(range(len(parts)))
    lists = merged_lists(run, plan) if shards is None else shard_lists(run, plan, shards)
    return parts, lists, [i for i, p in enumerate(parts)
                          if not _is_current(run.examples_part(i), _digest(plan, p, lists[p[0]]))]


def shard_lists(run: RunDir, plan: Plan, good: list[int]) -> dict[str, dict[str, np.ndarray]]:
    """Every block's top-k lists ({index,y,x} (C, k)) merged over the shards `good`: what collation will merge
    into viz.h5 (exactly: explain.dataset_examples.merge_topk), without viz.h5."""
    summaries = [store.read_summaries(run.shard(k)) for k in good]
    return {b: merge_topk([{f: s[f"topk/{b}/{f}"] for f in ("value", *_LISTS)} for s in summaries], plan.topk)
            for b in plan.blocks}


def merged_lists(run: RunDir, plan: Plan) -> dict[str, dict[str, np.ndarray]]:
    merged = store.read_shard(run.viz_file, [f"topk/{b}/{f}" for b in plan.blocks for f in _LISTS])
    return {b: {f: merged[f"topk/{b}/{f}"] for f in _LISTS} for b in plan.blocks}


def _checkpoint(run: RunDir, plan: Plan) -> dict[str, Any]:
    """The plan's checkpoint, refused when it changed since the plan (the shards' lists are of the old one)."""
    state = checkpoint.load_checkpoint(run.path / plan.checkpoint)
    if state["sha256"] != plan.checkpoint_sha256:
        raise VizError(f"{run.path / plan.checkpoint}: changed since the plan was made (sha256 differs): the "
                       "projections would show other weights; hint: launch the visualization again")
    return state


def _digest(plan: Plan, part: Part, lists: Mapping[str, np.ndarray]) -> str:
    """What a part depends on: the checkpoint, the numerics, the images (split, data) and its channels' merged
    lists ({index,y,x} (C, k))."""
    block, lo, hi = part
    h = hashlib.sha256(f"{plan.checkpoint_sha256} {plan.fast} {plan.split} {plan.dataset_fingerprint} "
                       f"{plan.config.example_size} {block} {lo} {hi}".encode())
    for f in _LISTS:
        h.update(np.ascontiguousarray(lists[f][lo:hi], dtype=np.int64).tobytes())
    return h.hexdigest()


def _is_current(path: Path, digest: str) -> bool:
    try:
        return path.is_file() and store.read_attrs(path).get("digest") == digest
    except store.StoreError:
        return False


def current_parts(run: RunDir, plan: Plan, project: bool, device: str,
                  shards: list[int] | None = None) -> tuple[list[Path], str]:
    """(the part files of the blocks whose every part matches viz.h5's merged lists, in order; why the other
    blocks' are not presented, '' when all are). `project`: the stale parts are computed here first (on
    `device`, from viz.h5's images); a part that fails stops the computing (the same cause would fail the next)
    but takes nothing away: the blocks whose parts are all current are still presented. `shards` (without
    `project`): judged against the lists merged from those shards, before viz.h5 is written."""
    assert not (project and shards is not None), "computing reads viz.h5"
    parts, lists, stale = _staleness(run, plan, shards)
    error = ""
    if stale and project:
        try:
            state = _checkpoint(run, plan)
            log.info("projections: %d of %d parts to compute here", len(stale), len(parts))
            rows = {int(p): r for r, p in enumerate(store.read_shard(run.viz_file, ["index"])["index"])}

            def images(positions: np.ndarray) -> np.ndarray:
                return store.read_shard(run.viz_file, ["images"], rows=[rows[int(p)] for p in positions])["images"]
            for i in list(stale):
                project_range(run, plan, state, i, parts[i], lists[parts[i][0]], images, device)
                stale.remove(i)
        except Exception as e:  # noqa: BLE001 (a full disk, out of memory, a changed checkpoint, ...)
            error = " ".join(str(e).split())[:300] or type(e).__name__
    gone = sorted({parts[i][0] for i in stale}, key=plan.blocks.index)
    if gone:
        why = f"the projections failed: {error}" if error else "the projections are not computed yet"
        error = f"{why}; not shown for {', '.join(gone)}"
    return [run.examples_part(i) for i, p in enumerate(parts) if p[0] not in gone], error


def project_part(run_dir: str, part: int) -> str:
    """One task of the projection array: part `part` of the plan's projections, from the lists merged over the
    shards present now; skipped when its file is current. Returns the part file ('' when there is no such part)."""
    done = _project(run_dir, [part], keep_going=False)[0]
    return str(RunDir(run_dir).examples_part(part)) if done else ""


def project_parts(run_dir: str, which: list[int] | None = None, keep_going: bool = True) -> list[str]:
    """Parts `which` (None: every one) of the plan's projections in this process, one after another, the
    checkpoint read and each block's lists merged over the shards present once for all (a local run's
    projections, where a task each would start an interpreter and read them again); a current part is skipped.
    Returns one line per part that failed ('projection part K: why'); the others still run (keep_going=False:
    the first failure is raised)."""
    return _project(run_dir, which, keep_going)[1]


def _project(run_dir: str, which: list[int] | None, keep_going: bool) -> tuple[list[int], list[str]]:
    """(the parts of `which` the plan has, one line per failed part): project_parts."""
    setup_logging()
    run = RunDir(run_dir)
    plan = run.read_plan()
    state = _checkpoint(run, plan)
    tcfg = state["config"]
    parts = projection_parts(tcfg["arch"], tcfg.get("stem", ""), plan.blocks, len(plan.shards), plan.topk,
                             int(tcfg.get("image_size", 32)))
    if which is None:
        which = list(range(len(parts)))
    if any(i >= len(parts) for i in which):
        log.info("projection parts %s: the plan has %d parts, nothing to do for those", which, len(parts))
    which = [i for i in which if i < len(parts)]
    good = usable_shards(run, plan)
    if which and not good:
        why = "no shard of the plan is present; hint: run the visualization array first"
        if not keep_going:
            raise store.StoreError(f"projection part {which[0]}: {why}")
        return which, [f"projection part {i}: {why}" for i in which]
    lists = shard_lists(run, plan, good) if which else {}
    where = {int(p): (k, r) for k in good for r, p in enumerate(plan.shards[k])}

    def images(positions: np.ndarray) -> np.ndarray:  # (R, 3, H, W), read shard by shard
        out: list[Any] = [None] * len(positions)
        for k in sorted({where[int(p)][0] for p in positions}):
            mine = [i for i, p in enumerate(positions) if where[int(p)][0] == k]
            got = store.read_shard(run.shard(k), ["images"], rows=[where[int(positions[i])][1] for i in mine])
            for i, img in zip(mine, got["images"]):
                out[i] = img
        return np.stack(out)
    failed = []
    dist.share_cores()
    for i in which:
        block = parts[i][0]
        try:
            if _is_current(run.examples_part(i), _digest(plan, parts[i], lists[block])):
                log.info("projection part %d: %s is current, skipped", i, run.examples_part(i))
                continue
            with dist.numerics(exact=not plan.fast):
                project_range(run, plan, state, i, parts[i], lists[block], images, plan.config.device)
        except Exception as e:  # noqa: BLE001 (the part's own error, whatever it is, is its line)
            if not keep_going:
                raise
            log.exception("projection part %d failed", i)
            failed.append(f"projection part {i}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    return which, failed


_HEADROOM = 0.5  # of the free memory for a projection call: on a CPU the host's memory is everyone's
_MOST_ROWS = {"cuda": 1024, "cpu": 256}  # beyond these a call is no faster per row, only larger
# on a CPU a call over this many bytes of rows is slower per row (its maps leave the caches): ResNet-18 at 224 px
# (22.8 MB a row), 2 cores, ms per row at 32 / 256 rows: layer4.1 35.0 / 53.1, layer3.0 11.2 / 24.4
_CPU_CALL_BYTES = 1 << 30


def projection_batch(state: dict[str, Any], block: str, device: torch.device, free_bytes: int | None = None) -> int:
    """Rows (a channel's image, each going forward and back once) projected together from `block`: the largest
    power of two whose call fits in half the free memory (`free_bytes`, default: what CUDA reports, or the
    host's MemAvailable) by the projection's memory model (dataset_examples.projection_footprint), and on a CPU
    in _CPU_CALL_BYTES."""
    cfg = state["config"]
    fixed, per_row = _footprint(cfg["arch"], len(state["classes"]), cfg["stem"], block, int(cfg["image_size"]))
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_bytes()
    fit = max(int(_HEADROOM * free_bytes) - fixed, 0) // max(per_row, 1)
    if device.type == "cpu":
        fit = min(fit, _CPU_CALL_BYTES // max(per_row, 1))
    return max(1, min(_MOST_ROWS.get(device.type, 256), 1 << max(fit.bit_length() - 1, 0)))


@functools.lru_cache(maxsize=64)
def _footprint(arch: str, classes: int, stem: str, block: str, size: int) -> tuple[int, int]:
    return projection_footprint(shape_model(arch, classes, stem), block, (size, size))


def project_range(run: RunDir, plan: Plan, state: dict[str, Any], i: int, part: Part,
                  lists: Mapping[str, np.ndarray], images: Callable[[np.ndarray], np.ndarray], device: str,
                  window: bool = True) -> Path:
    """Part i: each channel's top images projected by the deconvnet from that channel's strongest activation
    alone, beside the input patch under its receptive field (see hpcviz.examples); written atomically.
    window=False: the whole image projected, then cropped (the way before explain.window; benchmark.py
    examples compares them)."""
    t0 = time.perf_counter()
    block, lo, hi = part
    dev = dist.pick_device(device)
    model = from_checkpoint(state, dev)
    deconvnet = Deconvnet(model, exact=not plan.fast)
    index, ys, xs = (np.asarray(lists[f][lo:hi]) for f in _LISTS)  # (c, k)
    c, k = index.shape
    field = receptive_field(model, block)
    boxes = field_box(field, ys.reshape(-1), xs.reshape(-1))
    fill = [round(255 * m) for m in state["mean"]]  # off-image pixels: what zero padding is in the input space
    patches, projections, seeds = [], [], []
    batch = projection_batch(state, block, dev)
    for start in range(0, c * k, batch):
        sel = slice(start, start + batch)
        unique, rows = np.unique(index.reshape(-1)[sel], return_inverse=True)  # each image forward once
        pixels = torch.from_numpy(images(unique))  # (u, 3, H, W) uint8
        x = normalize(pixels.to(dev), state["mean"], state["std"])
        rows_t = torch.from_numpy(rows.reshape(-1)).long()
        ch = lo + torch.arange(start, start + len(rows_t)) // k
        yy, xx = torch.from_numpy(ys.reshape(-1)[sel]).long(), torch.from_numpy(xs.reshape(-1)[sel]).long()
        if window:
            tiles, value = project_field(deconvnet, x, block, ch, yy, xx, rows_t)
        else:
            rec, value = project(deconvnet, x, block, ch, yy, xx, rows_t)
            tiles = crop(rec.cpu(), boxes[sel], 0.0)
        size = plan.config.example_size
        patches.append(shrink(crop(pixels[rows_t], boxes[sel], fill), size))
        projections.append(shrink(tiles.cpu(), size))
        seeds.append(value.cpu())
    patch = torch.cat(patches).numpy().reshape(c, k, *patches[0].shape[1:])  # (c, k, 3, P, Q)
    deconv = torch.cat(projections).numpy().reshape(c, k, *projections[0].shape[1:])
    what: dict[str, Any] = {"block": block, "receptive_field": list(field)}
    dims = ("channel", "rank", "rgb", "y", "x")
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {
        f"examples/{block}/patch": (patch, dims, {**what, "what": _PATCH_WHAT}),
        f"examples/{block}/deconv": (deconv, dims, {**what, "what": _DECONV_WHAT}),
        f"examples/{block}/index": (index, ("channel", "rank"), {"what": "the image's position in the split"}),
        f"examples/{block}/channel": (np.arange(lo, hi, dtype=np.int32), ("channel",), {"what": "channel number"}),
        f"examples/{block}/box": (boxes.reshape(c, k, 4), ("channel", "rank", "corner"),
                                  {"what": "receptive field (y0, x0, y1, x1), ends exclusive; may leave the image"}),
        f"examples/{block}/seed": (torch.cat(seeds).numpy().reshape(c, k), ("channel", "rank"),
                                   {"what": "the activation the projection starts from (recomputed)"}),
        f"examples/{block}/grid": (montage(patch, deconv), ("y", "x", "rgb"),
                                   {"what": "rows: channels; left: the k patches, right: their projections"})}
    path = run.examples_part(i)
    store.write_arrays(path, arrays, {"format": "hpcviz-examples-part-v1", "digest": _digest(plan, part, lists),
                                      "block": block, "channels": [lo, hi], "k": k, "path": "both",
                                      "checkpoint_sha256": plan.checkpoint_sha256, "created": now()})
    took = time.perf_counter() - t0
    log.info("projection part %d: %s channels %d-%d, %d projections in %.1f s (%.3f s per channel)", i, block, lo,
             hi - 1, c * k, took, took / max(c, 1))
    return path


_PATCH_WHAT = ("the input patch (uint8) under the receptive field of the channel's maximum, off-image: the mean "
               "colour; at most example_size pixels a side (area-averaged)")
_DECONV_WHAT = ("deconvnet projection (path both) seeded with the channel's strongest activation only, raw, in the "
                "network's normalised input space, cropped and sized like the patch")
