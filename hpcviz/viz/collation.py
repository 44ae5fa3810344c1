"""Collation, the reduce step of the visualization array: the shards of the plan presented as one virtual file
(viz/viz.h5), with their dataset-example summaries merged exactly and the current projection parts
(hpcviz.viz.projection) and feature visualization parts (hpcviz.viz.featviz_parts) attached."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from .. import store
from ..explain.dataset_examples import reduce_summaries
from ..rundir import Plan, RunDir
from .featviz_parts import current_featviz
from .plan import shard_problems
from .projection import current_parts

__all__ = ["collate"]

log = logging.getLogger("hpcviz")


def collate(run: RunDir, plan: Plan | None, project: bool = False, device: str = "auto",
            featviz: bool = False) -> dict[str, Any]:
    """Collate the shards that belong to the plan into viz/viz.h5 (the reduce step): their per-image datasets
    as one virtual view, their top-k lists and class means merged. A shard that is missing, incomplete or
    another plan's (another model, data set, request) is left out and named with its reason, and the merge
    says it is incomplete. The projection parts that are current are presented in viz.h5 too (below);
    `project`: those missing or stale are computed here first (on `device`). The parts of a block are presented
    when all of them are current (a block's channels whole, or not at all); "examples_error" says which blocks
    are not, and why. The feature visualization parts alike (hpcviz.viz.featviz_parts; `featviz`: those missing
    or stale are computed here first), "featviz_error" saying which blocks are not presented.
    Returns {"n_images", "n_shards", "sizes", "missing": {shard: reason}, "path": viz.h5, or None when no
    shard holds images (a stale viz.h5 is then removed), "reason": why not, when None, "examples": seconds
    spent projecting here (0.0: every part was current), None when not asked; "featviz": the same for the
    feature visualizations}."""
    if plan is None:
        return {"n_images": 0, "n_shards": 0, "sizes": [], "missing": {}, "path": None, "examples": None,
                "reason": "no visualization plan (viz/plan.json): the visualization array did not run"}
    sizes = [len(s) for s in plan.shards]
    missing = shard_problems(run, plan)
    good = [k for k in range(len(sizes)) if k not in missing]
    out = {"n_images": 0, "n_shards": len(sizes), "sizes": sizes, "missing": missing, "path": None, "examples": None,
           "featviz": None}
    if not good:
        run.viz_file.unlink(missing_ok=True)  # derived from shards that are gone: it would only mislead
        return {**out, "reason": f"none of the {len(sizes)} visualization shards is present and this plan's"}

    def write(attach: list[Path]) -> dict[str, Any]:
        return store.write_view([run.shard(k) for k in good], run.viz_file,
                             {"plan_checkpoint_sha256": plan.checkpoint_sha256}, sizes=[sizes[k] for k in good],
                             excluded={run.shard(k): why for k, why in missing.items()}, attach=attach,
                             reduce=(lambda parts, gone: reduce_summaries(parts, plan.blocks, plan.topk, gone))
                             if plan.topk else None)
    # Computing parts here reads viz.h5 (its images and merged lists): the shards' view is written first, then
    # again with the parts. Otherwise the parts are judged against the lists merged from the shards (what viz.h5
    # will hold) and viz.h5 is written once (0.3 s a write for 8 images).
    once = not (project or featviz)
    attach: dict[str, list[Path]] = {}
    if once:
        try:
            attach = _current(run, plan, out, False, False, device, good)
        except Exception:  # noqa: BLE001 (an unreadable summary or part): judged as below, once viz.h5 is written
            once = False
    try:
        summary = _write_first(write, attach, out)
    except store.StoreError as e:  # shards that disagree among themselves, or viz.h5 cannot be written
        return {**out, "reason": f"the shards could not be collated: {e}"}
    out.update(n_images=summary["n_images"], path=run.viz_file)
    if not once:
        attach = _current(run, plan, out, project, featviz, device, None)
        if any(attach.values()):
            try:
                write([p for files in attach.values() for p in files])
            except store.StoreError as e:  # viz.h5 is as write([]) left it: each write is atomic
                _not_presented(out, attach, e)
    return out


def _current(run: RunDir, plan: Plan, out: dict[str, Any], project: bool, featviz: bool, device: str,
             shards: list[int] | None) -> dict[str, list[Path]]:
    """The current parts of each kind, those stale computed here first where asked; their errors and times into
    `out`. `shards`: the projections judged against those shards' merged lists (viz.h5 not written yet)."""
    attach: dict[str, list[Path]] = {}
    for key, wanted, made, compute in (
            ("examples", plan.topk, functools.partial(current_parts, shards=shards), project),
            ("featviz", plan.featviz_blocks, current_featviz, featviz)):
        if not wanted:
            continue
        t0 = time.perf_counter()
        attach[key], error = made(run, plan, compute, device)
        if error:
            out[f"{key}_error"] = error
            if compute:
                log.warning("%s", error)
        out[key] = time.perf_counter() - t0 if compute else None
    return attach


def _write_first(write: Any, attach: dict[str, list[Path]], out: dict[str, Any]) -> dict[str, Any]:
    """viz.h5 with the parts `attach`; where they cannot be presented, without them (they take nothing from a
    good collation), saying why in `out`. A StoreError of the shards themselves is raised."""
    files = [p for files in attach.values() for p in files]
    try:
        return write(files)
    except store.StoreError as e:
        if not files:
            raise
        summary = write([])  # raises where the shards are the cause
        _not_presented(out, attach, e)
        return summary


def _not_presented(out: dict[str, Any], attach: dict[str, list[Path]], e: Exception) -> None:
    for key in (k for k, files in attach.items() if files):
        out[f"{key}_error"] = f"the {_WHAT[key]} could not be presented: {e}"
        log.warning("%s", out[f"{key}_error"])


_WHAT = {"examples": "projections", "featviz": "feature visualizations"}
