"""Launching the visualization array: plan the request, submit the shards that are missing and wait; then the
projection array of the dataset examples, and the feature visualization array (per channel: it needs only the
checkpoint, so on SLURM without --wait it is submitted at once, beside the first array); then collate, once.

Everything about the request is checked before anything is written: the plan against the run's
checkpoint and data, the plan against the one already in the run (another request needs `fresh`), and
the executor (profile, GPUs). Only then are the old shards removed (`fresh`), the plan written and the
tasks submitted; each task receives the run directory and its shard number (hpcviz.viz.task.run_shard).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import submitit

from .. import dist
from ..config import LaunchConfig, VizConfig
from ..rundir import RunDir, RunLock
from ..viz.collation import collate
from ..viz.featviz_parts import featviz_part, stale_featviz
from ..viz.plan import VizError, make_plan, shard_problems
from ..viz.projection import plan_parts, project_part, project_parts, stale_parts
from ..viz.state import describe_problems, run_state
from ..viz.task import run_shard
from .executors import GPU_SLOTS_VAR, LaunchError, Worker, make_executor, stage_launch, submit_array, wait_result

log = logging.getLogger("hpcviz")


def launch_viz(cfg: VizConfig, launch: LaunchConfig, *, fresh: bool = False,
               lock: RunLock | None = None) -> dict[str, Any]:
    """Plan, run the missing shards (one array, or a few past MaxArraySize; locally a pool, or this process when
    one worker would take them all), then the projections of the dataset examples (the report draws every
    figure) and the feature visualizations (in this process on CPUs or one GPU, `here`; else arrays), then
    collate once. SLURM without --wait: the arrays are submitted with their dependencies and not collated.
    `launch` is a request check_launch resolved. Returns {"plan", "todo", "ids", "failed": [one line per failed
    task], "collation": collate's summary, or None when submitted and not waited for, "projection_ids",
    "projection_failed", "featviz_ids", "featviz_failed", "incomplete"}."""
    run = RunDir(cfg.run_dir)
    staged = stage_launch(launch, "viz")  # one process per task, one GPU where there are any
    plan = make_plan(cfg, gpu=bool(staged.gpus) and cfg.device != "cpu")
    old = run.plan()
    replace = old is not None and not old.same_request(plan)
    if replace and not fresh:
        raise VizError(f"{run.viz_dir} holds shards of another request (other images, blocks or checkpoint); "
                       "hint: pass --fresh to replace them, or repeat the earlier request")
    todo = list(range(len(plan.shards))) if replace else sorted(shard_problems(run, plan))
    launch = staged
    inline = here(launch) and len(_groups(todo, _pool_width(launch))) <= 1  # one worker: this process is it
    ex = make_executor(launch, run.logs, f"hpcviz-viz-{run.path.resolve().name}") if todo and not inline else None
    # ---- nothing was written before this line: the whole request has been checked
    if replace:
        log.info("--fresh: removed %d shard(s) of the earlier request", run.remove_shards())
    run.write_plan(plan)
    run.write_config("viz", plan.to_dict()["config"])
    log.info("%d images in %d shards; %d to do", plan.n_images, len(plan.shards), len(todo))
    out: dict[str, Any] = {"plan": plan, "todo": todo, "ids": [], "failed": [], "collation": None,
                           "projection_ids": [], "projection_failed": [], "incomplete": "", "featviz_ids": [],
                           "featviz_failed": []}
    run.update("viz", status="submitted", cluster=launch.cluster, n_shards=len(plan.shards),
               n_images=plan.n_images, planned=plan.planned, error="", missing_shards=[])
    if inline and todo:  # this process is the one worker
        pid = str(os.getpid())
        out["ids"] = [pid]
        run.update("viz", lambda rec: {"job_ids": [*rec.job_ids, pid],
                                       "tasks": {**rec.tasks, **{f"{pid}:{k}": k for k in todo}}})
        out["failed"] = run_here(run_shard, run, todo, "shard")
    elif ex is not None:
        out["ids"], jobs = submit_shards(run, ex, run_shard, todo, launch, lock)
        if launch.cluster == "slurm" and not launch.wait:
            parts = len(plan_parts(run, plan))
            if parts:  # the second array, after the first; aggregation computes what it leaves undone
                pex = stage_executor(launch, run, "project", "afterany:" + ":".join(out["ids"]))
                out["projection_ids"], _ = submit_projections(run, pex, list(range(parts)), launch, lock)
            out["featviz_ids"], _ = featviz_array(run, plan, launch, lock, wait=False)  # needs no shard: at once
            return out
        out["failed"] = wait_all(jobs, todo, launch)
    elif launch.cluster == "slurm" and not launch.wait:  # nothing to redo: collated now, the rest is the jobs'
        out["collation"] = finish(run, plan)
        out["featviz_ids"], _ = featviz_array(run, plan, launch, lock, wait=False)
        return out
    if plan.topk and len(shard_problems(run, plan)) < len(plan.shards):  # a shard to take examples from
        out["projection_ids"], out["projection_failed"] = _projections(run, plan, launch, lock)
    out["featviz_ids"], out["featviz_failed"] = featviz_array(run, plan, launch, lock, wait=True)
    out["collation"] = finish(run, plan)  # once, with everything this command made
    bad = run_state(run).problems(("viz",))  # shards, viz.h5 and parts, verified ('' when whole)
    out["incomplete"] = describe_problems(run, bad) if bad else ""
    return out


def _projections(run: RunDir, plan: Any, launch: LaunchConfig, lock: RunLock | None) -> tuple[list[str], list[str]]:
    """The projection parts that are not current against the shards' lists, in this process (`here`) or as an
    array waited for. Returns (array ids, one line per failed part)."""
    if here(launch):
        return [], project_here(run, plan)
    stale = stale_parts(run, plan, from_shards=True)
    if not stale:
        return [], []
    ids, jobs = submit_projections(run, stage_executor(launch, run, "project", ""), stale, launch, lock)
    return ids, wait_all(jobs, stale, launch, what="projection part")


def stage_executor(launch: LaunchConfig, run: RunDir, stage: str, dependency: str) -> submitit.Executor:
    """An executor for one stage of the run (its resources: launch.stage_launch), after `dependency`."""
    staged = stage_launch(launch, stage)
    ex = make_executor(staged, run.logs, f"hpcviz-{stage}-{run.path.resolve().name}")
    if dependency:
        ex.update_parameters(slurm_additional_parameters={**staged.extra, "dependency": dependency,
                                                          "kill_on_invalid_dep": "yes"})
    return ex


def submit_projections(run: RunDir, ex: submitit.Executor, parts: list[int], launch: LaunchConfig,
                       lock: RunLock | None) -> tuple[list[str], list[submitit.Job]]:
    """The projection array (hpcviz.viz.projection.project_part): one task per part; the manifest and the lock
    learn its ids."""
    ids, jobs = _submit(run, ex, project_part, parts, launch, lock)
    run.update("viz", lambda rec: {"projection_ids": [*rec.projection_ids, *ids]})
    log.info("projections: %d part(s) submitted (%s)", len(parts), ", ".join(ids))
    return ids, jobs


def submit_featviz(run: RunDir, ex: submitit.Executor, parts: list[int], launch: LaunchConfig,
                   lock: RunLock | None) -> tuple[list[str], list[submitit.Job]]:
    """The feature visualization array (hpcviz.viz.featviz_parts.featviz_part): one task per part; the manifest
    and the lock learn its ids."""
    ids, jobs = _submit(run, ex, featviz_part, parts, launch, lock)
    run.update("viz", lambda rec: {"featviz_ids": [*rec.featviz_ids, *ids]})
    log.info("feature visualization: %d part(s) submitted (%s)", len(parts), ", ".join(ids))
    return ids, jobs


def featviz_array(run: RunDir, plan: Any, launch: LaunchConfig, lock: RunLock | None,
                  wait: bool) -> tuple[list[str], list[str]]:
    """The featviz parts that are missing or stale, as an array of their own (no dependency: the checkpoint is
    there); waited for when `wait`. Returns (array ids, one line per failed part)."""
    stale = stale_featviz(run, plan)
    if not stale:
        return [], []
    if wait and here(launch):
        return [], run_here(featviz_part, run, stale, "featviz part")
    ids, jobs = submit_featviz(run, stage_executor(launch, run, "featviz", ""), stale, launch, lock)
    return ids, wait_all(jobs, stale, launch, what="featviz part") if wait else []


def submit_shards(run: RunDir, ex: submitit.Executor, fn: Any, shards: list[int], launch: LaunchConfig,
                  lock: RunLock | None) -> tuple[list[str], list[submitit.Job]]:
    """The shards' tasks (`_submit`: an array on SLURM, a pool of workers locally); the manifest learns which task
    has which shard, and the run's lock the jobs."""
    try:
        ids, jobs = _submit(run, ex, fn, shards, launch, lock)
    except Exception as e:  # sbatch's refusal, in one of several submitit types
        run.update("viz", status="failed", error=f"submission refused: {str(e).strip().splitlines()[-1:]}")
        raise LaunchError(f"submission of the visualization array refused: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]}; hint: check --gpus/"
                          "--partition/--time against `sinfo` and the profile") from None
    tasks = {str(j.job_id): s for j, s in zip(jobs, shards)} if launch.cluster != "local" else \
        {f"{j.job_id}:{s}": s for j, group in zip(jobs, _groups(shards, len(jobs))) for s in group}
    run.update("viz", lambda rec: {"status": "submitted", "cluster": launch.cluster, "job_ids": [*rec.job_ids, *ids],
                                   "tasks": {**rec.tasks, **tasks}})
    return ids, jobs


def _submit(run: RunDir, ex: submitit.Executor, fn: Any, items: list[int], launch: LaunchConfig,
            lock: RunLock | None) -> tuple[list[str], list[submitit.Job]]:
    """Submit `fn(run_dir, item)` for every item; the lock learns the jobs. Returns (array ids, jobs).

    SLURM: an array, one task per item. Local: a pool of as many workers as the machine runs at once (one per
    GPU this process sees, else one per core), each a process that takes its items in turn (Worker: one start-up
    for all, where a process per item imported torch again and all of them ran, and held memory, at once); the
    cores are shared among the workers (dist.share_cores reads it). Items i, i + w, i + 2w, ... go to worker i:
    the items of an array cost about the same. The jobs are in `_groups(items, len(jobs))` order."""
    if launch.cluster != "local":
        jobs = submit_array(ex, fn, str(run.path), items, launch.cluster, launch.throttle)
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs}, key=lambda i: int(i) if i.isdigit() else 0)
        if lock is not None:
            lock.add_jobs(ids, launch.cluster, array=launch.cluster == "slurm")
        return ids, jobs
    slots = dist.local_gpus() if launch.gpus else []
    cores = dist.cores()
    groups = _groups(items, _pool_width(launch))
    env = {GPU_SLOTS_VAR: ",".join(slots)} if slots else {}
    env[dist.THREADS_VAR] = str(max(1, cores // max(1, len(groups))))
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the local executor copies our environment
    try:
        jobs = ex.map_array(Worker(fn, str(run.logs)), [str(run.path)] * len(groups), groups)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ids = [str(j.job_id) for j in jobs]
    if lock is not None:
        lock.add_jobs(ids, "local")
    return ids, jobs


def _pool_width(launch: LaunchConfig) -> int:
    """The local pool's workers at most: one per GPU this process sees (where the request has GPUs), else one
    per core."""
    return len(dist.local_gpus() if launch.gpus else []) or dist.cores()


def _groups(items: list[int], workers: int) -> list[list[int]]:
    """The items of each of at most `workers` local workers (round robin)."""
    n = min(len(items), max(1, workers))
    return [items[j::n] for j in range(n)]


def here(launch: LaunchConfig) -> bool:
    """The per-channel work (projections, feature visualizations) runs in this process, not as an array of
    its own, when its tasks would share this machine's one device anyway: a local run on CPUs or on one GPU;
    so do the shards when the pool would have one worker (one shard, or one GPU). A task's start (~3-5 s:
    interpreter, torch, the checkpoint) would cost more than a small run's part, and torch already uses every
    core in one process. Several local GPUs, or SLURM: an array."""
    return launch.cluster == "local" and len(dist.local_gpus() if launch.gpus else []) <= 1


def run_here(fn: Any, run: RunDir, items: list[int], what: str) -> list[str]:
    """`fn(run_dir, item)` for each item in this process, as an array task would run it; one line per item that
    failed ('projection part K: why', as wait_all says it), the others still run."""
    failed = []
    for i in items:
        try:
            fn(str(run.path), i)
        except Exception as e:  # noqa: BLE001 (the part's own error, whatever it is, is its line)
            failed.append(f"{what} {i}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    return failed


def project_here(run: RunDir, plan: Any) -> list[str]:
    """The stale projection parts in this process (projection.project_parts: the checkpoint and the merged lists
    read once); one line per part that failed, every part's line if they could not start."""
    try:
        return project_parts(str(run.path))
    except Exception as e:  # noqa: BLE001 (a changed checkpoint, an unreadable shard: every part's cause)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        return [f"projection part {i}: {why}" for i in range(len(plan_parts(run, plan)))]


def wait_all(jobs: list[submitit.Job], items: list[int], launch: LaunchConfig, what: str = "shard") -> list[str]:
    """One line per item that failed: 'shard K: why' (the task's own error, first line). SLURM: a job per item;
    local: a pool worker per `_groups(items, len(jobs))`, which says which of its items failed (a worker that
    died fails the items it had)."""
    groups = [[i] for i in items] if launch.cluster != "local" else _groups(items, len(jobs))
    failed = []
    for job, group in zip(jobs, groups):
        try:
            result = wait_result(job, launch)
        except Exception as e:  # LaunchError, JobRefused: either way the items' cause, in one line
            failed += [f"{what} {i}: {str(e).splitlines()[0]}" for i in group]
            continue
        if isinstance(result, dict):  # a Worker's failed items
            failed += [f"{what} {i}: {why}" for i, why in sorted(result.items())]
    return failed


def finish(run: RunDir, plan: Any) -> dict[str, Any]:
    """Collate into viz/viz.h5 and record the outcome in the manifest."""
    t0 = time.perf_counter()
    summary = collate(run, plan)
    log.info("collation: %d of %d shards in %.1f s", summary["n_shards"] - len(summary["missing"]),
             summary["n_shards"], time.perf_counter() - t0)
    missing = [run.shard(k).name for k in sorted(summary["missing"])]
    whole = summary["path"] is not None and not missing and not summary.get("examples_error") \
        and not summary.get("featviz_error")
    status = "done" if whole else ("partial" if summary["path"] else "failed")
    run.update("viz", status=status, missing_shards=missing, n_images=summary["n_images"],
               error="; ".join(summary[k] for k in ("examples_error", "featviz_error") if summary.get(k))
               if summary["path"] else summary.get("reason", ""))
    return summary
