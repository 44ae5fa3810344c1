"""The whole pipeline as one job graph: train -> visualization array (afterok) -> aggregation (afterany).

On SLURM `submit_pipeline` submits the three stages at once, with dependencies, and returns. The
training job writes the visualization plan (viz/plan.json) when it has finished (rank 0), so the
array tasks, which receive only the run directory and their shard number, find it. If training fails,
SLURM removes the array (`--kill-on-invalid-dep=yes`) and the aggregation, which depends on the array
with `afterany`, still runs and reports what failed. Locally (`local`, `debug`) the same stages run in
order in the foreground. `pipeline_status` lists each stage and array task; `retry_failed` resubmits
only the shards that are missing or not the plan's, then aggregates again: always those of the run it
is given (the plan's paths are relative), so a copied run retries itself, never its source.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import submitit

from . import viz
from .aggregate import aggregate
from .array import launch_viz, stage_executor, submit_projections, submit_shards
from .collation import plan_parts, projection_parts
from .config import AggregateConfig, LaunchConfig, TrainConfig, VizConfig
from .errors import JobError
from .launch import JobRefused, LaunchError, TrainJob, stage_launch, submit_train, wait_result
from .rundir import Manifest, RunDir, RunLock, now

log = logging.getLogger("hpcviz")

STAGES = ("train", "viz", "aggregate")


class StageFailed(JobError):
    """A stage of the pipeline failed, or shards are missing from the report."""


class PlanFailed(JobError):
    """The training job trained, then could not plan the visualization (the array is removed)."""


class PipelineTrainJob(TrainJob):
    """Training, then (rank 0, once the final checkpoint is written) the visualization plan."""

    def __init__(self, viz_cfg: VizConfig, requeue_via_submitit: bool = True) -> None:
        super().__init__(requeue_via_submitit)
        self.viz_cfg = viz_cfg

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        from . import dist
        result = super().__call__(cfg)  # SystemExit when stopped on a signal: no plan yet
        if dist.rank() == 0:
            run = RunDir(cfg.run_dir)
            try:
                plan = viz.make_plan(dataclasses.replace(self.viz_cfg, run_dir=cfg.run_dir))
            except Exception as e:  # the array will be removed: the report and the launcher say why
                run.update("viz", status="failed", error=f"{type(e).__name__}: {e}")
                raise PlanFailed(f"{type(e).__name__}: {e}") from e
            run.write_plan(plan)
            run.write_config("viz", plan.to_dict()["config"])
            run.update("viz", n_shards=len(plan.shards), n_images=plan.n_images, planned=plan.planned)
        return result

    def checkpoint(self, cfg: TrainConfig) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(PipelineTrainJob(self.viz_cfg),
                                                  dataclasses.replace(cfg, resume="auto"))


def aggregate_job(cfg: AggregateConfig) -> dict[str, Any]:
    """The aggregation job (afterany on the array)."""
    from .log import setup_logging
    setup_logging()
    return aggregate(cfg)


def check_request(train_cfg: TrainConfig, viz_cfg: VizConfig) -> int:
    """Check the visualization options against the architecture before anything is queued (a typo must
    not surface hours later in the array); returns the number of array tasks to submit."""
    from .models import build_model
    viz_cfg.validate(prefix="viz-")
    viz.resolve_request(build_model(train_cfg.arch, 10, train_cfg.resolved_stem()), viz_cfg)  # as make_plan will
    return viz_cfg.n_tasks()


def _submit_viz_and_aggregate(run: RunDir, shards: list[int], launch: LaunchConfig, agg_cfg: AggregateConfig,
                              after: str, lock: RunLock | None, parts: int = 0) -> dict[str, Any]:
    """The array (afterok on `after`, when given) over `shards`, the projection array of `parts` tasks
    afterany on it, then the aggregation afterany on the last array submitted."""
    ids: list[str] = []
    if shards:
        ex = stage_executor(launch, run, "viz", f"afterok:{after}" if after else "")
        ids, _ = submit_shards(run, ex, viz.run_shard, shards, launch, lock)
    pids: list[str] = []
    if parts:
        ex = stage_executor(launch, run, "project", "afterany:" + ":".join(ids) if ids else
                       (f"afterok:{after}" if after else ""))
        pids, _ = submit_projections(run, ex, list(range(parts)), stage_launch(launch, "viz"), lock)
    last = pids or ids
    ex = stage_executor(launch, run, "aggregate", "afterany:" + ":".join(last) if last else "")
    run.update("aggregate", status="submitted", error="")  # before: the job may end at once
    agg = ex.submit(aggregate_job, dataclasses.replace(agg_cfg, run_dir=str(run.path)))
    run.update("aggregate", job_id=str(agg.job_id))
    if lock is not None:
        lock.add_jobs([str(agg.job_id)], "slurm")
    return {"viz": ids, "project": pids, "aggregate": str(agg.job_id), "n_tasks": len(shards)}


def submit_pipeline(train_cfg: TrainConfig, viz_cfg: VizConfig, agg_cfg: AggregateConfig,
                    launch: LaunchConfig, lock: RunLock | None = None) -> dict[str, Any]:
    """Submit the three stages with dependencies and return their job ids (SLURM only)."""
    n_tasks = check_request(train_cfg, viz_cfg)
    run = RunDir(train_cfg.run_dir)
    train_job = submit_train(train_cfg, launch, PipelineTrainJob(viz_cfg))
    if lock is not None:
        lock.add_jobs([str(train_job.job_id)], "slurm")
    run.update("viz", status="pending", cluster="slurm", job_ids=[], tasks={}, error="")
    try:
        from .models import build_model
        stem = train_cfg.resolved_stem()
        blocks = viz.resolve_request(build_model(train_cfg.arch, 10, stem), viz_cfg)[0]
        parts = len(projection_parts(train_cfg.arch, stem, blocks, n_tasks, viz_cfg.topk))
        ids = _submit_viz_and_aggregate(run, list(range(n_tasks)), launch, agg_cfg, str(train_job.job_id), lock,
                                        parts)
    except Exception as e:  # no half pipeline: without its array and report the training is cancelled
        train_job.cancel(check=False)
        first = [line for line in str(e).strip().splitlines() if line.strip()]
        run.update("train", status="cancelled", error="the rest of the pipeline could not be submitted")
        raise LaunchError(f"submission refused after the training job {train_job.job_id} (now cancelled): "
                          f"{first[-1] if first else type(e).__name__}; hint: check the array/aggregation "
                          "resources (--partition, --time, --gpus) against `sinfo` and the profile") from None
    ids["train"] = str(train_job.job_id)
    run.update("pipeline", cluster="slurm", jobs=ids, submitted=now())
    return ids


def run_local(train_cfg: TrainConfig, viz_cfg: VizConfig, agg_cfg: AggregateConfig, launch: LaunchConfig,
              lock: RunLock | None = None) -> dict[str, Any]:
    """The same stages in order, here (local subprocesses or this process): the local debug mode."""
    check_request(train_cfg, viz_cfg)
    run = RunDir(train_cfg.run_dir)
    job = submit_train(train_cfg, launch, PipelineTrainJob(viz_cfg))
    run.update("pipeline", cluster=launch.cluster, submitted=now())
    if lock is not None and launch.cluster == "local":
        lock.add_jobs([str(job.job_id)], "local")
    try:
        result = wait_result(job, launch)
    except JobRefused:
        raise  # refused before it started: the run is as it was, there is nothing new to report
    except LaunchError as e:
        mark_lost(run, "train", str(e))
        aggregate(agg_cfg)  # the report says what failed, as on SLURM
        raise
    log.info("train: val accuracy %.2f%%", 100 * result.get("val_accuracy", float("nan")))
    out = launch_viz(viz_cfg, dataclasses.replace(launch, wait=True), lock=lock, figures=False)
    return {**aggregate(agg_cfg), "viz_failed": out["failed"]}


def mark_lost(run: RunDir, stage: str, why: str) -> None:
    """A local job that ended without saying so (killed): its record must not stay 'running'."""
    record = run.manifest().record(stage)
    if record.status in ("running", "submitted"):
        run.update(stage, status="failed", error=why.splitlines()[0])


def retry_failed(run: RunDir, launch: LaunchConfig, agg_cfg: AggregateConfig,
                 lock: RunLock | None = None) -> dict[str, Any]:
    """Resubmit only the shards of `run` that are missing or not its plan's, then aggregate again."""
    plan = run.read_plan()
    todo = sorted(run.shard_problems(plan))
    log.info("retry: %d of %d shards to redo: %s", len(todo), len(plan.shards), todo)
    agg_cfg = dataclasses.replace(agg_cfg, run_dir=str(run.path))
    if launch.cluster == "slurm":
        return {**_submit_viz_and_aggregate(run, todo, launch, agg_cfg, "", lock, len(plan_parts(run, plan))),
                "todo": todo}
    out = launch_viz(plan.config, dataclasses.replace(launch, wait=True), lock=lock, figures=False)
    return {**aggregate(agg_cfg), "viz_failed": out["failed"], "todo": todo}


def retry_cluster(run: RunDir, requested: str) -> str:
    """--retry-failed without --cluster: where the pipeline ran (local/debug), else auto."""
    record = run.manifest()
    was = record.pipeline.cluster or record.viz.cluster
    return was if requested == "auto" and was in ("local", "debug") else requested


# ------------------------------------------------------------------------------------------ status

def _shard_states(run: RunDir, manifest: Manifest) -> list[tuple[int, str, str, str]]:
    """(shard, task id, state, detail) per planned (or, before the plan, submitted) shard; a shard that belongs
    to the plan is 'done (verified)' whatever the scheduler says, one that does not says why (in the detail
    too when the state is the scheduler's)."""
    from .jobstate import latest_tasks, task_states
    plan = run.plan()
    latest = latest_tasks(manifest.viz.tasks)  # the newest task of each shard
    live = task_states(latest.values()) if manifest.viz.cluster == "slurm" else {}
    n = len(plan.shards) if plan else (max(latest) + 1 if latest else 0)
    rows = []
    for s in range(n):
        tid = latest.get(s, "")
        problem = run.shard_problem(s, plan) if plan else "waiting for the plan"
        missing = "" if not problem or not plan else \
            "missing" if problem.startswith("no such file") else f"missing: {problem}"
        if not problem:
            state = "done (verified)"
        elif live.get(tid) and live[tid] != "COMPLETED" or not plan:
            state = live.get(tid) or problem
        else:
            state, missing = missing, ""
        rows.append((s, tid, state, missing))
    return rows


def pipeline_status(run: RunDir) -> list[tuple[str, str, str, str]]:
    """(stage, job id, state, detail) for train, every array task (viz[k]) and aggregate."""
    from .jobstate import query_state
    if not run.manifest_file.exists():
        raise viz.VizError(f"--run {run}: no manifest.json; hint: start it with jobs/launch_pipeline.py")
    manifest = run.manifest()
    slurm = (manifest.pipeline.cluster or manifest.train.cluster) == "slurm"
    rows = []
    for stage in ("train", "aggregate"):
        rec = manifest.record(stage)
        state = query_state(rec.job_id)[0] if slurm and rec.job_id else ""
        detail = rec.status or "not run"
        if stage == "train" and rec.val_accuracy is not None:
            detail += f", val accuracy {100 * rec.val_accuracy:.2f}%"
        if stage == "aggregate" and rec.missing_shards:
            detail += f", missing {', '.join(rec.missing_shards)}"
        rows.append((stage, rec.job_id, state or detail.split(",")[0], detail))
    shards = [(f"viz[{s}]", tid, state, detail) for s, tid, state, detail in _shard_states(run, manifest)]
    return [rows[0], *shards, rows[1]]


def render_status(rows: list[tuple[str, str, str, str]]) -> Any:
    from rich.table import Table
    table = Table(title="hpcviz pipeline")
    for col in ("stage", "job id", "state", "detail"):
        table.add_column(col)
    for row in rows:
        first = row[2].split()[0].rstrip(":") if row[2] else ""
        style = "green" if row[2].startswith(("COMPLETED", "done")) else (
            "red" if first in ("FAILED", "CANCELLED", "TIMEOUT", "missing", "OUT_OF_MEMORY", "failed") else "")
        table.add_row(*row, style=style)
    return table


def _finished(run: RunDir, rows: list[tuple[str, str, str, str]], gone: list[int]) -> bool:
    """The aggregation has ended: its result file exists, or the scheduler says it ended. 'GONE' (no
    source knows the job) counts only after 3 polls in a row: a controller restart must not end a wait."""
    from .jobstate import ACTIVE
    agg = rows[-1]
    if not agg[1] or (run.logs / f"{agg[1]}_0_result.pkl").exists():
        return True
    gone[0] = gone[0] + 1 if agg[2] == "GONE" else 0
    return (agg[2] not in ACTIVE and agg[2] not in ("", "submitted", "GONE")) or gone[0] >= 3


def _settled(run: RunDir, rows: list[tuple[str, str, str, str]], within_s: float = 15.0) -> list:
    """The final states: the aggregation's result file can come a few seconds before the scheduler calls
    the job ended; ask again until it does (at most `within_s`)."""
    from .jobstate import ACTIVE
    end = time.monotonic() + within_s
    while rows[-1][2] in ACTIVE and time.monotonic() < end:
        time.sleep(1)
        rows = pipeline_status(run)
    return rows


def wait_pipeline(run: RunDir, poll_s: float = 5.0, timeout_s: float | None = None) -> None:
    """Follow the stages until the aggregation has ended: a rich live table on a terminal, a line per
    change otherwise; then check_outcome (StageFailed when a stage failed or a shard is missing)."""
    from rich.console import Console
    from rich.live import Live
    console, start, last, gone = Console(), time.monotonic(), None, [0]
    live = Live(console=console, refresh_per_second=1) if console.is_terminal else None
    if live:
        live.start()
    try:
        while True:
            rows = pipeline_status(run)
            done = _finished(run, rows, gone) or (timeout_s is not None and time.monotonic() - start > timeout_s)
            if done:
                rows = _settled(run, rows)
            if live:
                live.update(render_status(rows))
            elif rows != last:
                print("  ".join(f"{r[0]}={r[2]}" for r in rows), flush=True)
            last = rows
            if done:
                break
            time.sleep(poll_s)
    finally:
        if live:
            live.stop()
    check_outcome(run)


def check_outcome(run: RunDir) -> None:
    """Nothing when training is done and the report complete; StageFailed saying what is not, otherwise."""
    manifest = run.manifest()
    train, v, agg = manifest.train, manifest.viz, manifest.aggregate
    where = Path(run.path)
    if train.status != "done":
        why = f" ({train.error.splitlines()[0]})" if train.error else ""
        raise StageFailed(f"training {train.status or 'did not run'}{why}; see {where / 'logs'} and "
                          f"{where / 'report' / 'report.html'}")
    if v.status == "failed":
        raise StageFailed(f"the visualization failed: {(v.error or '?').splitlines()[0]}; see {where / 'logs'}")
    if not run.plan_file.exists():
        raise StageFailed(f"no visualization plan: the array did not run; hint: python jobs/launch_viz.py --run {run}")
    if agg.status != "done":
        missing = ", ".join(agg.missing_shards) or f"the report (aggregate: {agg.status or 'not run'})"
        raise StageFailed(f"missing {missing}; hint: python jobs/launch_pipeline.py --run {run} --retry-failed")


__all__ = ["PipelineTrainJob", "aggregate_job", "check_request", "submit_pipeline", "run_local", "retry_failed",
           "retry_cluster", "pipeline_status", "render_status", "wait_pipeline", "check_outcome", "mark_lost",
           "StageFailed", "STAGES"]
