"""The whole pipeline as one job graph: train -> visualization array (afterok) -> aggregation (afterany).

On SLURM `submit_pipeline` submits the three stages at once, with dependencies, and returns. The
training job writes the visualization plan (viz/plan.json) when it has finished (rank 0), so the
array tasks, which receive only the run directory and their shard number, find it. If training fails,
SLURM removes the array (`--kill-on-invalid-dep=yes`) and the aggregation, which depends on the array
with `afterany`, still runs and reports what failed. Locally (`local`, `debug`) the same stages run in
order in the foreground. `pipeline_status` lists each stage and array task; `retry_failed` resubmits
only the shards that are missing or do not verify, then aggregates again.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from . import checkpoint, viz
from .aggregate import AggregateConfig, aggregate
from .config import LaunchConfig, TrainConfig, config_from_dict
from .launch import (LaunchError, TrainJob, detect_cluster, launch_viz, make_executor, submit_array, submit_train,
                     viz_gpus, wait_result)

log = logging.getLogger("hpcviz")

STAGES = ("train", "viz", "aggregate")


class PipelineTrainJob(TrainJob):
    """Training, then (rank 0, once the final checkpoint is written) the visualization plan."""

    def __init__(self, viz_cfg: viz.VizConfig, requeue_via_submitit: bool = True) -> None:
        super().__init__(requeue_via_submitit)
        self.viz_cfg = viz_cfg

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        from . import dist
        result = super().__call__(cfg)  # SystemExit when stopped on a signal: no plan yet
        if dist.rank() == 0:
            try:
                plan = viz.make_plan(self.viz_cfg)
            except Exception as e:  # the array will be removed: the report and the launcher say why
                checkpoint.update_manifest(cfg.run_dir, "viz", status="failed", error=f"{type(e).__name__}: {e}")
                raise
            viz.write_plan(cfg.run_dir, plan)
            checkpoint.update_manifest(cfg.run_dir, "viz", n_shards=len(plan["shards"]),
                                       n_images=plan["n_images"], planned=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return result

    def checkpoint(self, cfg: TrainConfig) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(PipelineTrainJob(self.viz_cfg), dataclasses.replace(cfg, resume="auto"))


def run_planned_shard(run_dir: str, shard: int) -> str:
    """An array task of the pipeline: its shard of the plan the training job wrote ('' when the plan
    has fewer shards than the array has tasks, e.g. a validation split smaller than requested)."""
    plan = viz.read_plan(run_dir)
    if shard >= len(plan["shards"]):
        log.info("shard %d: the plan has %d shards, nothing to do", shard, len(plan["shards"]))
        return ""
    return viz.run_shard(run_dir, shard)


def aggregate_job(cfg: AggregateConfig) -> dict[str, Any]:
    """The aggregation job (afterany on the array)."""
    from .log import setup_logging
    setup_logging()
    return aggregate(cfg)


def check_request(train_cfg: TrainConfig, viz_cfg: viz.VizConfig) -> int:
    """Check the visualization options against the architecture before anything is queued (a typo must
    not surface hours later in the array); returns the number of array tasks to submit."""
    from .models import build_model
    viz.resolve_request(build_model(train_cfg.arch, 10, train_cfg.resolved_stem()), viz_cfg)  # as make_plan will
    if viz_cfg.split not in viz.SPLITS:
        raise viz.VizError(f"--viz-split {viz_cfg.split!r}: not one of {', '.join(viz.SPLITS)}; hint: --viz-split val")
    for flag, value, low in (("--viz-batch-size", viz_cfg.batch_size, 1), ("--invert-steps", viz_cfg.invert_steps, 0),
                             ("--images", viz_cfg.images, 1), ("--tasks", viz_cfg.tasks, 1)):
        if value < low:
            raise viz.VizError(f"{flag} {value}: must be at least {low}; hint: drop it for the default")
    if any(i < 0 for i in viz_cfg.indices):
        raise viz.VizError(f"--indices {min(viz_cfg.indices)}: positions start at 0; hint: --indices 0,1,2")
    return min(viz_cfg.tasks, len(viz_cfg.indices) or viz_cfg.images)


def _stage_launch(launch: LaunchConfig, stage: str) -> LaunchConfig:
    """Array tasks: one process (one GPU if training had GPUs); aggregation: one CPU process."""
    gpus = viz_gpus(launch) if stage == "viz" else 0
    return dataclasses.replace(launch, nproc=1, nodes=1, gpus=gpus, extra=dict(launch.extra))


def _executor(launch: LaunchConfig, run: Path, stage: str, dependency: str) -> submitit.Executor:
    stage_launch = _stage_launch(launch, stage)
    ex = make_executor(stage_launch, run / "logs", f"hpcviz-{stage}-{run.name}")
    if dependency:
        ex.update_parameters(slurm_additional_parameters={**stage_launch.extra, "dependency": dependency,
                                                          "kill_on_invalid_dep": "yes"})
    return ex


def _submit_viz_and_aggregate(run: Path, fn: Any, shards: list[int], launch: LaunchConfig,
                              agg_cfg: AggregateConfig, after: str, throttle: int) -> dict[str, Any]:
    """The array (afterok on `after`, when given) over `shards`, then the aggregation afterany on it."""
    ids: list[str] = []
    if shards:
        ex = _executor(launch, run, "viz", f"afterok:{after}" if after else "")
        jobs = submit_array(ex, fn, str(run), shards, "slurm", throttle)
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs}, key=int)
        tasks = {str(j.job_id): s for j, s in zip(jobs, shards)}
        checkpoint.update_json(run / "manifest.json", "viz", lambda old: {  # one lock: concurrent launchers
            "status": "submitted", "cluster": "slurm", "job_ids": [*old.get("job_ids", []), *ids],
            "tasks": {**old.get("tasks", {}), **tasks}, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    ex = _executor(launch, run, "aggregate", "afterany:" + ":".join(ids) if ids else "")
    checkpoint.update_manifest(run, "aggregate", status="submitted")  # before: the job may end at once
    agg = ex.submit(aggregate_job, agg_cfg)
    checkpoint.update_manifest(run, "aggregate", job_id=str(agg.job_id))
    return {"viz": ids, "aggregate": str(agg.job_id), "n_tasks": len(shards)}


def submit_pipeline(train_cfg: TrainConfig, viz_cfg: viz.VizConfig, agg_cfg: AggregateConfig,
                    launch: LaunchConfig, throttle: int = 0) -> dict[str, Any]:
    """Submit the three stages with dependencies and return their job ids (SLURM only)."""
    n_tasks = check_request(train_cfg, viz_cfg)
    run = Path(train_cfg.run_dir)
    train_job = submit_train(train_cfg, launch, PipelineTrainJob(viz_cfg))
    checkpoint.update_manifest(run, "train", status="submitted", cluster="slurm", job_id=str(train_job.job_id))
    checkpoint.update_manifest(run, "viz", status="pending", cluster="slurm", job_ids=[], tasks={})
    try:
        ids = _submit_viz_and_aggregate(run, run_planned_shard, list(range(n_tasks)), launch, agg_cfg,
                                        str(train_job.job_id), throttle)
    except Exception as e:  # no half pipeline: without its array and report the training is cancelled
        train_job.cancel(check=False)
        first = [line for line in str(e).strip().splitlines() if line.strip()]
        checkpoint.update_manifest(run, "train", status="cancelled")
        raise LaunchError(f"submission refused after the training job {train_job.job_id} (now cancelled): "
                          f"{first[-1] if first else type(e).__name__}; hint: check the array/aggregation "
                          "resources (--partition, --time, --gpus) against `sinfo` and the profile") from None
    ids["train"] = str(train_job.job_id)
    checkpoint.update_manifest(run, "pipeline", cluster="slurm", jobs=ids,
                               submitted=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return ids


def run_local(train_cfg: TrainConfig, viz_cfg: viz.VizConfig, agg_cfg: AggregateConfig,
              launch: LaunchConfig) -> dict[str, Any]:
    """The same stages in order, here (local subprocesses or this process): the local debug mode."""
    check_request(train_cfg, viz_cfg)
    run = Path(train_cfg.run_dir)
    checkpoint.update_manifest(run, "pipeline", cluster=launch.cluster, submitted=time.strftime("%Y-%m-%dT%H:%M:%S"))
    checkpoint.update_manifest(run, "train", status="submitted", cluster=launch.cluster)
    job = submit_train(train_cfg, launch, PipelineTrainJob(viz_cfg))
    checkpoint.update_manifest(run, "train", job_id=str(job.job_id))
    try:
        result = wait_result(job, launch)
    except LaunchError:
        aggregate(agg_cfg)  # the report says what failed, as on SLURM
        raise
    log.info("train: val accuracy %.2f%%", 100 * result.get("val_accuracy", float("nan")))
    rc = launch_viz(viz_cfg, dataclasses.replace(_stage_launch(launch, "viz"), wait=True), figures=False)
    return {**aggregate(agg_cfg), "viz_rc": rc}


def retry_failed(run: Path, launch: LaunchConfig, agg_cfg: AggregateConfig, throttle: int = 0) -> dict[str, Any]:
    """Resubmit only the shards that are missing or do not verify, then aggregate again."""
    plan = viz.read_plan(run)
    manifest = checkpoint.read_json(run / "manifest.json", {})
    was = manifest.get("pipeline", {}).get("cluster") or manifest.get("viz", {}).get("cluster")
    cluster = detect_cluster(was if launch.cluster == "auto" and was in ("local", "debug") else launch.cluster)
    if cluster == "slurm":
        _refuse_while_active(run, manifest)
    todo = [s for s in range(len(plan["shards"])) if not viz.shard_done(run, s, plan)]
    log.info("retry: %d of %d shards to redo: %s", len(todo), len(plan["shards"]), todo)
    if cluster == "slurm":
        return {**_submit_viz_and_aggregate(run, viz.run_shard, todo, launch, agg_cfg, "", throttle), "todo": todo}
    cfg = config_from_dict(viz.VizConfig, plan["config"])
    rc = launch_viz(cfg, dataclasses.replace(_stage_launch(launch, "viz"), cluster=cluster, wait=True),
                    figures=False)
    return {**aggregate(agg_cfg), "viz_rc": rc, "todo": todo}


def _refuse_while_active(run: Path, manifest: dict[str, Any]) -> None:
    """A retry while tasks or the aggregation still run would redo them twice and race on the report."""
    from .jobstate import ACTIVE, array_states, query_state
    active = [f"{arr}_{k}" for arr in manifest.get("viz", {}).get("job_ids", [])
              for k, state in array_states(str(arr)).items() if state in ACTIVE]
    agg = str(manifest.get("aggregate", {}).get("job_id", ""))
    if agg and query_state(agg)[0] in ACTIVE:
        active.append(agg)
    if active:
        raise LaunchError(f"--retry-failed: jobs of {run} are still running or pending ({', '.join(active[:5])}); "
                          f"hint: wait for them (--status --wait), or scancel them first")


# ------------------------------------------------------------------------------------------ status

def _shard_states(run: Path, manifest: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(shard, task id, state) per planned (or, before the plan, submitted) shard; a shard that
    verifies on disk is 'done' whatever the scheduler says."""
    from .jobstate import latest_tasks, task_states
    v = manifest.get("viz", {})
    plan = checkpoint.read_json(run / "viz" / "plan.json")
    latest = latest_tasks(v.get("tasks", {}))  # the newest task of each shard
    live = task_states(latest.values()) if v.get("cluster") == "slurm" else {}
    n = len(plan["shards"]) if plan else (max(latest) + 1 if latest else 0)
    rows = []
    for s in range(n):
        tid = latest.get(s, "")
        state = live.get(tid, "")
        if plan and viz.shard_done(run, s, plan):
            state = "done (verified)"
        rows.append((s, tid, state or ("missing" if plan else "waiting for the plan")))
    return rows


def pipeline_status(run: Path) -> list[tuple[str, str, str, str]]:
    """(stage, job id, state, detail) for train, every array task (viz[k]) and aggregate."""
    from .jobstate import query_state
    manifest = checkpoint.read_json(run / "manifest.json")
    if manifest is None:
        raise viz.VizError(f"--run {run}: no manifest.json; hint: start it with jobs/launch_pipeline.py")
    slurm = manifest.get("pipeline", {}).get("cluster", manifest.get("train", {}).get("cluster")) == "slurm"
    rows = []
    for stage in ("train", "aggregate"):
        s = manifest.get(stage, {})
        jid = str(s.get("job_id", ""))
        state = query_state(jid)[0] if slurm and jid else ""
        detail = s.get("status", "not run")
        if stage == "train" and "val_accuracy" in s:
            detail += f", val accuracy {100 * s['val_accuracy']:.2f}%"
        if stage == "aggregate" and s.get("missing_shards"):
            detail += f", missing {', '.join(s['missing_shards'])}"
        rows.append((stage, jid, state or detail.split(",")[0], detail))
    shards = [(f"viz[{s}]", tid, state, "") for s, tid, state in _shard_states(run, manifest)]
    return [rows[0], *shards, rows[1]]


def render_status(rows: list[tuple[str, str, str, str]]) -> Any:
    from rich.table import Table
    table = Table(title="hpcviz pipeline")
    for col in ("stage", "job id", "state", "detail"):
        table.add_column(col)
    for row in rows:
        style = "green" if row[2].startswith(("COMPLETED", "done")) else (
            "red" if row[2].split()[0] in ("FAILED", "CANCELLED", "TIMEOUT", "missing", "OUT_OF_MEMORY") else "")
        table.add_row(*row, style=style)
    return table


def _finished(run: Path, rows: list[tuple[str, str, str, str]], gone: list[int]) -> bool:
    """The aggregation has ended: its result file exists, or the scheduler says it ended. 'GONE' (no
    source knows the job) counts only after 3 polls in a row: a controller restart must not end a wait."""
    from .jobstate import ACTIVE
    agg = rows[-1]
    if not agg[1] or (run / "logs" / f"{agg[1]}_0_result.pkl").exists():
        return True
    gone[0] = gone[0] + 1 if agg[2] == "GONE" else 0
    return (agg[2] not in ACTIVE and agg[2] not in ("", "submitted", "GONE")) or gone[0] >= 3


def wait_pipeline(run: Path, poll_s: float = 5.0, timeout_s: float | None = None) -> int:
    """Follow the stages until the aggregation has ended: a rich live table on a terminal, a line per
    change otherwise. 0 when the report is complete, 1 when a stage failed or a shard is missing."""
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
                time.sleep(0 if live else 1)
                rows = pipeline_status(run)  # the final states
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
    return outcome(run)


def outcome(run: Path) -> int:
    """0: training done and the report complete; 1 otherwise (one error line says what is missing)."""
    manifest = checkpoint.read_json(run / "manifest.json", {})
    agg = manifest.get("aggregate", {})
    train = manifest.get("train", {})
    if train.get("status") != "done":
        why = f" ({train['error'].splitlines()[0]})" if train.get("error") else ""
        print(f"error: training {train.get('status', 'did not run')}{why}; see {run}/logs and "
              f"{run}/report/report.html", file=sys.stderr)
        return 1
    v = manifest.get("viz", {})
    if v.get("status") == "failed":
        print(f"error: the visualization failed: {v.get('error', '?').splitlines()[0]}; see {run}/logs", file=sys.stderr)
        return 1
    if not (run / "viz" / "plan.json").exists():
        print(f"error: no visualization plan: the array did not run; hint: python jobs/launch_viz.py --run {run}",
              file=sys.stderr)
        return 1
    if agg.get("status") != "done":
        missing = ", ".join(agg.get("missing_shards", [])) or f"the report (aggregate: {agg.get('status', 'not run')})"
        print(f"error: missing {missing}; hint: python jobs/launch_pipeline.py --run {run} --retry-failed",
              file=sys.stderr)
        return 1
    return 0


__all__ = ["PipelineTrainJob", "run_planned_shard", "aggregate_job", "check_request", "submit_pipeline",
           "run_local", "retry_failed", "pipeline_status", "render_status", "wait_pipeline", "outcome",
           "LaunchError", "STAGES"]
