"""Collation, the reduce step of the visualization array: the shards of the plan presented as one virtual file
(viz/viz.h5), with their dataset-example summaries merged exactly and the current projection parts attached
(hpcviz.viz.projection)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import store
from ..explain.dataset_examples import reduce_summaries
from ..rundir import Plan, RunDir
from .plan import shard_problems
from .projection import current_parts

__all__ = ["collate"]

log = logging.getLogger("hpcviz")


def collate(run: RunDir, plan: Plan | None, project: bool = False, device: str = "auto") -> dict[str, Any]:
    """Collate the shards that belong to the plan into viz/viz.h5 (the reduce step): their per-image datasets
    as one virtual view, their top-k lists and class means merged. A shard that is missing, incomplete or
    another plan's (another model, data set, request) is left out and named with its reason, and the merge
    says it is incomplete. The projection parts that are current are presented in viz.h5 too (below);
    `project`: those missing or stale are computed here first (on `device`). The parts of a block are presented
    when all of them are current (a block's channels whole, or not at all); "examples_error" says which blocks
    are not, and why.
    Returns {"n_images", "n_shards", "sizes", "missing": {shard: reason}, "path": viz.h5, or None when no
    shard holds images (a stale viz.h5 is then removed), "reason": why not, when None, "examples": seconds
    spent projecting here (0.0: every part was current), None when not asked}."""
    if plan is None:
        return {"n_images": 0, "n_shards": 0, "sizes": [], "missing": {}, "path": None, "examples": None,
                "reason": "no visualization plan (viz/plan.json): the visualization array did not run"}
    sizes = [len(s) for s in plan.shards]
    missing = shard_problems(run, plan)
    good = [k for k in range(len(sizes)) if k not in missing]
    out = {"n_images": 0, "n_shards": len(sizes), "sizes": sizes, "missing": missing, "path": None, "examples": None}
    if not good:
        run.viz_file.unlink(missing_ok=True)  # derived from shards that are gone: it would only mislead
        return {**out, "reason": f"none of the {len(sizes)} visualization shards is present and this plan's"}

    def write(attach: list[Path]) -> dict[str, Any]:
        return store.write_view([run.shard(k) for k in good], run.viz_file,
                             {"plan_checkpoint_sha256": plan.checkpoint_sha256}, sizes=[sizes[k] for k in good],
                             excluded={run.shard(k): why for k, why in missing.items()}, attach=attach,
                             reduce=(lambda parts, gone: reduce_summaries(parts, plan.blocks, plan.topk, gone))
                             if plan.topk else None)
    try:
        summary = write([])
    except store.StoreError as e:  # shards that disagree among themselves, or viz.h5 cannot be written
        return {**out, "reason": f"the shards could not be collated: {e}"}
    out.update(n_images=summary["n_images"], path=run.viz_file)
    if plan.topk:
        t0 = time.perf_counter()
        files, error = current_parts(run, plan, project, device)
        if error:
            out["examples_error"] = error
            if project:
                log.warning("%s", error)
        if files:  # the projections add to a good collation: failing, they take nothing from it
            try:
                write(files)
            except store.StoreError as e:  # viz.h5 is as write([]) left it: each write is atomic
                out["examples_error"] = f"the projections could not be presented: {e}"
                log.warning("%s", out["examples_error"])
        out["examples"] = time.perf_counter() - t0 if project else None
    return out
