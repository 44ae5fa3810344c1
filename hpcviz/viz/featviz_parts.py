"""Feature visualization in the array: every channel of the plan's featviz blocks (hpcviz.explain.featviz), in
parts (viz/featviz/part-NNNNN.h5) that viz.h5 presents as /featviz/<block>, /featviz_value/<block> and
/featviz_steps/<block>.

The work is per channel, not per image, and needs only the checkpoint: ResNet-20 has 352 channels (~204 s on
one CPU thread at 32 px, benchmark.py featviz), ResNet-18 1984, ResNet-50 15,168 at 224 px. So the channels
are split into parts of similar cost, about one per task of the visualization array, and run as an array of
their own (`featviz_part`), on SLURM afterok on training beside the visualization array, locally after it.
A part is consecutive whole blocks, or a range of one block's channels: a block whose parts are all current
is presented whole, whatever happened to the other blocks' parts. A part is current while its digest holds:
the checkpoint, the numerics, the featviz config and its channels. Aggregation computes what is missing or
stale, so a report rerun costs nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist, store
from ..data.placement import available_host_bytes
from ..explain.dataset_examples import block_channels
from ..explain.featviz import FeatvizConfig, row_bytes, visualize
from ..log import TaskProgress, setup_logging
from ..models import build_model, from_checkpoint
from ..rundir import Plan, RunDir, now
from ..train import checkpoint
from .plan import VizError, plan_arch

__all__ = ["Part", "split_featviz", "featviz_parts", "plan_featviz_parts", "featviz_config", "featviz_states",
           "stale_featviz", "current_featviz", "featviz_part", "compute_part", "PART_FORMAT"]

log = logging.getLogger("hpcviz")
Part = tuple[tuple[str, int, int], ...]  # (block, first channel, end) segments, in forward order
PART_FORMAT = "hpcviz-featviz-part-v1"
_MEMORY_SHARE = 0.5   # of the free memory the rows may take (the rest: the model, the allocator's slack)
_ROW_OVERHEAD = 1.5   # a row's peak over what autograd saves for it (the backward's gradients, Adam's state)


def split_featviz(channels: Mapping[str, int], parts: int) -> list[Part]:
    """About `parts` parts of similar cost over the blocks' channels (in forward order): a channel of the i-th
    block costs about i + 1 (each step runs forward to its block and back; a ResNet's blocks cost about the same
    after the stem, as the projections measured). Consecutive blocks share a part while they fit in an even
    share; a block above it is split into ranges of its own."""
    cost = {b: c * (i + 1) for i, (b, c) in enumerate(channels.items())}
    share = sum(cost.values()) / max(1, parts)
    out: list[Part] = []
    group: list[tuple[str, int, int]] = []
    held = 0.0
    for b, c in channels.items():
        if cost[b] > share:
            out += [tuple(group)] if group else []
            group, held = [], 0.0
            n = max(1, min(c, round(cost[b] / share)))
            edges = np.linspace(0, c, n + 1).round().astype(int)
            out += [((b, int(lo), int(hi)),) for lo, hi in zip(edges, edges[1:])]
            continue
        if group and held + cost[b] > share:
            out.append(tuple(group))
            group, held = [], 0.0
        group.append((b, 0, c))
        held += cost[b]
    return out + ([tuple(group)] if group else [])


def featviz_parts(arch: str, stem: str, blocks: list[str], tasks: int) -> list[Part]:
    """The featviz tasks of a request, from the architecture alone (a pipeline sizes its array before training)."""
    if not blocks:
        return []
    channels = block_channels(build_model(arch, 10, stem))
    return split_featviz({b: channels[b] for b in blocks}, tasks)


def plan_featviz_parts(run: RunDir, plan: Plan) -> list[Part]:
    """The plan's featviz parts, for the model it was made for."""
    if not plan.featviz_blocks:
        return []
    return featviz_parts(*plan_arch(run, plan)[:2], plan.featviz_blocks, len(plan.shards))


def featviz_config(plan: Plan) -> FeatvizConfig:
    """The optimisation of the plan's request (featviz's defaults but the steps and rows at once it sets)."""
    cfg = FeatvizConfig(exact=not plan.fast, batch=plan.featviz_batch_size,
                        precision="exact" if plan.exact else "auto")
    return dataclasses.replace(cfg, steps=plan.featviz_steps) if plan.featviz_steps else cfg


def _digest(plan: Plan, part: Part) -> str:
    """What a part depends on: the checkpoint, the numerics, the optimisation (not how many rows run at once:
    a row's path is its own) and its channels."""
    cfg = {k: v for k, v in dataclasses.asdict(featviz_config(plan)).items() if k != "batch"}
    text = json.dumps([plan.checkpoint_sha256, plan.fast, cfg, [list(s) for s in part]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_current(path: Path, digest: str) -> bool:
    try:
        return path.is_file() and store.read_attrs(path).get("digest") == digest
    except store.StoreError:
        return False


def _what(part: Part) -> str:
    return ", ".join(f"{b} channels {lo}-{hi - 1}" for b, lo, hi in part)


def featviz_states(run: RunDir, plan: Plan) -> list[tuple[int, str, str]]:
    """(part, state, detail) of every featviz part of the plan: done, missing or stale (made from another
    checkpoint, config or channels, or another run's)."""
    out = []
    for i, part in enumerate(plan_featviz_parts(run, plan)):
        path = run.featviz_part(i)
        if not path.is_file():
            out.append((i, "missing", f"{_what(part)}: no {run.rel(path)}"))
        elif not _is_current(path, _digest(plan, part)):
            out.append((i, "stale", f"{_what(part)}: not this plan's (another checkpoint, featviz config or run)"))
        else:
            out.append((i, "done", _what(part)))
    return out


def stale_featviz(run: RunDir, plan: Plan) -> list[int]:
    """The parts whose file is missing or not current."""
    return [i for i, state, _ in featviz_states(run, plan) if state != "done"]


def _checkpoint(run: RunDir, plan: Plan) -> dict[str, Any]:
    """The plan's checkpoint, refused when it changed since the plan (the parts would show other weights)."""
    state = checkpoint.load_checkpoint(run.path / plan.checkpoint)
    if state["sha256"] != plan.checkpoint_sha256:
        raise VizError(f"{run.path / plan.checkpoint}: changed since the plan was made (sha256 differs): the "
                       "feature visualizations would show other weights; hint: launch the visualization again")
    return state


def current_featviz(run: RunDir, plan: Plan, compute: bool, device: str) -> tuple[list[Path], str]:
    """(the part files of the blocks whose every part is current, in order; why the other blocks' are not
    presented, '' when all are). `compute`: the stale parts are computed here first (on `device`); a part
    that fails stops the computing (the same cause would fail the next) but takes nothing away."""
    parts = plan_featviz_parts(run, plan)
    stale = stale_featviz(run, plan)
    error = ""
    if stale and compute:
        try:
            state = _checkpoint(run, plan)
            log.info("feature visualization: %d of %d parts to compute here", len(stale), len(parts))
            for i in list(stale):
                with dist.numerics(exact=not plan.fast):
                    compute_part(run, plan, state, i, parts[i], device)
                stale.remove(i)
        except Exception as e:  # noqa: BLE001 (a full disk, out of memory, a changed checkpoint, ...)
            error = " ".join(str(e).split())[:300] or type(e).__name__
    gone = {b for i in stale for b, _, _ in parts[i]}
    if gone:
        why = f"the feature visualizations failed: {error}" if error else "the feature visualizations are not " \
            "computed yet"
        error = f"{why}; not shown for {', '.join(b for b in plan.featviz_blocks if b in gone)}"
    return [run.featviz_part(i) for i, p in enumerate(parts) if not {b for b, _, _ in p} & gone], error


def featviz_part(run_dir: str, part: int) -> str:
    """One task of the featviz array: part `part` of the plan's feature visualizations; skipped when its file
    is current. Returns the part file ('' when there is no such part)."""
    setup_logging()
    run = RunDir(run_dir)
    plan = run.read_plan()
    parts = plan_featviz_parts(run, plan)
    if part >= len(parts):
        log.info("featviz part %d: the plan has %d parts, nothing to do", part, len(parts))
        return ""
    if _is_current(run.featviz_part(part), _digest(plan, parts[part])):
        log.info("featviz part %d: %s is current, skipped", part, run.featviz_part(part))
        return str(run.featviz_part(part))
    state = _checkpoint(run, plan)
    dist.share_cores()
    with dist.numerics(exact=not plan.fast):
        return str(compute_part(run, plan, state, part, parts[part], plan.config.device))


def rows_at_once(plan: Plan, state: dict[str, Any], part: Part, device: torch.device) -> int:
    """Channels optimised together: --featviz-batch-size, else as many rows of the part's deepest block as fit
    in half the free memory (the device's, or this machine's available memory on a CPU), by what autograd
    saves for one row's step, counted on the meta device."""
    n = sum(hi - lo for _, lo, hi in part)
    if plan.featviz_batch_size:
        return min(n, plan.featviz_batch_size)
    tcfg = state["config"]
    with torch.device("meta"):
        model = build_model(tcfg["arch"], len(state["classes"]), tcfg.get("stem", "")).eval()
    return rows_that_fit(n, max(row_bytes(model, [part[-1][0]], int(tcfg["image_size"])).values()), device)


def rows_that_fit(n: int, per_row: float, device: torch.device) -> int:
    """At most n rows of `per_row` bytes each (what autograd keeps for one, see featviz.row_bytes) that fit in
    _MEMORY_SHARE of the free memory: the device's, or this machine's available memory on a CPU."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_bytes()
    return max(1, min(n, int(_MEMORY_SHARE * free // max(per_row * _ROW_OVERHEAD, 1))))


def compute_part(run: RunDir, plan: Plan, state: dict[str, Any], i: int, part: Part, device: str) -> Path:
    """Part i: every channel of its segments optimised as rows of one batched optimisation (in groups of
    `rows_at_once`), written atomically with the config that made it."""
    t0 = time.perf_counter()
    dev = dist.pick_device(device)
    model = from_checkpoint(state, dev)
    cfg = dataclasses.replace(featviz_config(plan), batch=rows_at_once(plan, state, part, dev))
    n = sum(hi - lo for _, lo, hi in part)
    progress = TaskProgress(n, f"featviz part {i}")
    request = {b: list(range(lo, hi)) for b, lo, hi in part}

    def step(k: int, steps: int, running: int, rows: int) -> None:
        progress.update(n * k / steps, f"step {k} of at most {steps}, {running} of {rows} channels still running")
    size = int(state["config"]["image_size"])
    out = visualize(model, request, cfg, state["mean"], state["std"], size, progress=step)
    progress.close()
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {}
    settings = {"seed": cfg.seed, "max_steps": cfg.steps, "priors": PRIORS, "config": dataclasses.asdict(cfg)}
    for b, r in out.items():
        arrays[f"featviz/{b}"] = (r["x"].numpy().astype(np.float32), ("channel", "rgb", "y", "x"),
                                  {"block": b, "what": _X_WHAT, **settings})
        arrays[f"featviz_value/{b}"] = (r["value"].numpy().astype(np.float32), ("channel",),
                                        {"block": b, "what": _VALUE_WHAT})
        arrays[f"featviz_steps/{b}"] = (r["steps"].numpy().astype(np.int32), ("channel",),
                                        {"block": b, "what": f"optimisation steps taken (at most {cfg.steps})"})
    path = run.featviz_part(i)
    took = time.perf_counter() - t0
    store.write_arrays(path, arrays, {"format": PART_FORMAT, "digest": _digest(plan, part),
                                      "segments": [list(s) for s in part], "checkpoint_sha256": plan.checkpoint_sha256,
                                      "config": dataclasses.asdict(cfg), "image_size": size,
                                      "mean": list(state["mean"]), "std": list(state["std"]),
                                      "device": dist.describe_device(dev), "seconds": took, "created": now()})
    log.info("featviz part %d: %s, %d channels in %.1f s (%.3f s per channel) on %s", i, _what(part), n, took,
             took / max(n, 1), dist.describe_device(dev))
    return path


PRIORS = ["Fourier spectrum scaled by 1/frequency^decay_power (Lucid)", "colour decorrelation (Lucid's ImageNet "
          "colour correlation)", "sigmoid to the pixel box [0, 1], then the data's normalisation",
          "a random translation, zoom and rotation every step (transformation robustness)",
          "redirected ReLU gradient for a channel that is off everywhere"]
_X_WHAT = ("feature visualization: the input optimised to maximise the channel's spatial mean activation at the "
           "block's output, in the network's normalised input space ((x * std + mean) are pixels in [0, 1])")
_VALUE_WHAT = "the channel's spatial mean activation at the block's output for that input, untransformed"
