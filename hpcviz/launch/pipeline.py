"""The whole pipeline as one job graph: train -> visualization array (afterok) -> aggregation (afterany); the
feature visualization array (afterok on training too: it needs only the checkpoint) runs beside the visualization
array, and the aggregation waits for it as well (afterany).

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
from typing import Any

import submitit

from .. import dist
from ..config import AggregateConfig, ConfigError, LaunchConfig, TrainConfig, VizConfig
from ..errors import JobError
from ..log import setup_logging
from ..models import build_model
from ..report.aggregate import aggregate
from ..report.render import terminal_text
from ..rundir import Manifest, RunDir, RunLock, now
from ..scheduler import ACTIVE, latest_tasks, query_state, task_states
from ..train.job import TrainJob
from ..train.loop import evaluate_checkpoint
from ..train.request import check_train_request, prepare_run
from ..viz.featviz_parts import featviz_parts
from ..viz.plan import VizError, make_plan, resolve_request, shard_problems
from ..viz.projection import plan_parts, projection_parts
from ..viz.state import Item, StageFailed, check_outcome, describe_problems, run_state
from ..viz.task import run_shard
from .array import featviz_array, launch_viz, stage_executor, submit_featviz, submit_projections, submit_shards
from .executors import JobRefused, LaunchError, stage_launch, submit_train, wait_result

log = logging.getLogger("hpcviz")

STAGES = ("train", "viz", "aggregate")


class PlanFailed(JobError):
    """The training job trained, then could not plan the visualization (the array is removed)."""


class PipelineTrainJob(TrainJob):
    """Training, then (rank 0, once the final checkpoint is written) the visualization plan."""

    def __init__(self, viz_cfg: VizConfig, requeue_via_submitit: bool = True) -> None:
        super().__init__(requeue_via_submitit)
        self.viz_cfg = viz_cfg

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        result = super().__call__(cfg)  # SystemExit when stopped on a signal: no plan yet
        if dist.rank() == 0:
            run = RunDir(cfg.run_dir)
            try:
                plan = make_plan(dataclasses.replace(self.viz_cfg, run_dir=cfg.run_dir))
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
    setup_logging()
    return aggregate(cfg)


def check_pipeline_request(train_cfg: TrainConfig, viz_cfg: VizConfig, agg_cfg: AggregateConfig,
                           launch: LaunchConfig) -> int:
    """The whole request, before anything is queued or written: the visualization options against the
    architecture, where the aggregation computes, the training request (data, --init, --resume, sizes, memory).
    Returns the number of array tasks."""
    n_tasks = check_request(train_cfg, viz_cfg)
    check_report_device(agg_cfg, launch.cluster)
    check_train_request(train_cfg, launch)
    return n_tasks


def check_report_device(cfg: AggregateConfig, cluster: str) -> None:
    """--projection-device cuda against where the aggregation runs: here (local, debug), or a SLURM job of one CPU
    process (the projection array has the GPUs there)."""
    if not cfg.projections or cfg.projection_device != "cuda":
        return
    if cluster == "slurm":
        raise ConfigError("--projection-device cuda: the aggregation job has no GPU (the projection array runs on "
                          "the visualization's GPUs); hint: drop it (auto)")
    dist.check_device(cfg.projection_device, "--projection-device")


def check_request(train_cfg: TrainConfig, viz_cfg: VizConfig) -> int:
    """Check the visualization options against the architecture before anything is queued (a typo must
    not surface hours later in the array); returns the number of array tasks to submit."""
    viz_cfg.validate(prefix="viz-")
    resolve_request(build_model(train_cfg.arch, 10, train_cfg.resolved_stem()), viz_cfg)  # as make_plan will
    return viz_cfg.n_tasks()


def _submit_viz_and_aggregate(run: RunDir, shards: list[int], launch: LaunchConfig, agg_cfg: AggregateConfig,
                              after: str, lock: RunLock | None, parts: int = 0,
                              also: list[str] | None = None) -> dict[str, Any]:
    """The array (afterok on `after`, when given) over `shards`, the projection array of `parts` tasks
    afterany on it, then the aggregation afterany on the last array submitted (and on the jobs `also`)."""
    ids: list[str] = []
    if shards:
        ex = stage_executor(launch, run, "viz", f"afterok:{after}" if after else "")
        ids, _ = submit_shards(run, ex, run_shard, shards, launch, lock)
    pids: list[str] = []
    if parts:
        ex = stage_executor(launch, run, "project", "afterany:" + ":".join(ids) if ids else
                       (f"afterok:{after}" if after else ""))
        pids, _ = submit_projections(run, ex, list(range(parts)), stage_launch(launch, "viz"), lock)
    last = (pids or ids) + list(also or [])
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
    prepare_run(train_cfg, launch.cluster, "continue it (finished stages are skipped)")
    run = RunDir(train_cfg.run_dir)
    train_job = submit_train(train_cfg, launch, PipelineTrainJob(viz_cfg))
    if lock is not None:
        lock.add_jobs([str(train_job.job_id)], "slurm")
    run.update("viz", status="pending", cluster="slurm", job_ids=[], tasks={}, error="")
    try:
        stem = train_cfg.resolved_stem()
        blocks, _, _, featviz = resolve_request(build_model(train_cfg.arch, 10, stem), viz_cfg)
        parts = len(projection_parts(train_cfg.arch, stem, blocks, n_tasks, viz_cfg.topk, train_cfg.image_size))
        fparts = len(featviz_parts(train_cfg.arch, stem, featviz, n_tasks))
        fids = submit_featviz(run, stage_executor(launch, run, "featviz", f"afterok:{train_job.job_id}"),
                              list(range(fparts)), launch, lock)[0] if fparts else []
        ids = _submit_viz_and_aggregate(run, list(range(n_tasks)), launch, agg_cfg, str(train_job.job_id), lock,
                                        parts, also=fids)
        ids["featviz"] = fids
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
    prepare_run(train_cfg, launch.cluster, "continue it (finished stages are skipped)")
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
        run.mark_lost("train", str(e))
        aggregate(agg_cfg)  # the report says what failed, as on SLURM
        raise
    log.info("train: val accuracy %.2f%%", 100 * result.get("val_accuracy", float("nan")))
    out = launch_viz(viz_cfg, dataclasses.replace(launch, wait=True), lock=lock)
    return {**aggregate(agg_cfg), "viz_failed": out["failed"]}


def retry_failed(run: RunDir, launch: LaunchConfig, agg_cfg: AggregateConfig,
                 lock: RunLock | None = None) -> dict[str, Any]:
    """Redo what `run` lacks: the shards that are missing or not its plan's, the projections, the report. A
    checkpoint that changed since makes everything derived from it stale: eval.json is evaluated anew and the
    same request planned again from the run's checkpoint, so every shard and projection is redone too."""
    plan = run.read_plan()
    state = run_state(run)
    agg_cfg = dataclasses.replace(agg_cfg, run_dir=str(run.path))
    evaluation = state.item("eval")
    reeval = evaluation is not None and evaluation.state == "stale"
    if state.checkpoint_sha256 and plan.checkpoint_sha256 != state.checkpoint_sha256:
        plan = make_plan(dataclasses.replace(plan.config, run_dir=str(run.path)))
        run.write_plan(plan)
        run.write_config("viz", plan.to_dict()["config"])
        log.info("retry: the checkpoint changed since the plan: planned again from %s", plan.checkpoint)
    todo = sorted(shard_problems(run, plan))
    log.info("retry: %d of %d shards to redo: %s%s", len(todo), len(plan.shards), todo,
             "; eval.json too" if reeval else "")
    eval_job = None
    if reeval:
        ex = stage_executor(launch, run, "viz", "")  # one process, a GPU where the array has one
        eval_job = ex.submit(evaluate_checkpoint, str(run.path), plan.config.device)
        if lock is not None:
            lock.add_jobs([str(eval_job.job_id)], launch.cluster)
    if launch.cluster == "slurm":
        after = [str(eval_job.job_id)] if eval_job is not None else []
        fids = featviz_array(run, plan, launch, lock, wait=False)[0]
        return {**_submit_viz_and_aggregate(run, todo, launch, agg_cfg, "", lock, len(plan_parts(run, plan)),
                                            after + fids), "todo": todo, "featviz": fids}
    if eval_job is not None:
        wait_result(eval_job, launch)
    out = launch_viz(plan.config, dataclasses.replace(launch, wait=True), lock=lock)
    return {**aggregate(agg_cfg), "viz_failed": out["failed"], "todo": todo}


def retry_cluster(run: RunDir, requested: str) -> str:
    """--retry-failed without --cluster: where the pipeline ran (local/debug), else auto."""
    record = run.manifest()
    was = record.pipeline.cluster or record.viz.cluster
    return was if requested == "auto" and was in ("local", "debug") else requested


# ------------------------------------------------------------------------------------------ status
_MAX_PART_ROWS = 20  # above this, a kind of parts is one summary row plus a row per part not done
_PARTS = ("project", "featviz")  # the items of the per-channel arrays: project[i], featviz[i]


def _task_ids(manifest: Manifest, parts: list[Item]) -> dict[str, str]:
    """{item name: the newest array task id} of each shard and, on SLURM, each projection and featviz part."""
    out = {f"viz[{k}]": t for k, t in latest_tasks(manifest.viz.tasks).items()}
    for kind, arrays in (("project", manifest.viz.projection_ids), ("featviz", manifest.viz.featviz_ids)):
        if arrays and manifest.viz.cluster == "slurm":  # part i is task i of the newest array of its kind
            out.update({p.name: f"{arrays[-1]}_{p.name[len(kind) + 1:-1]}" for p in parts
                        if p.name.startswith(kind + "[")})
    return out


def _row(item: Item, job: str, live: dict[str, str]) -> tuple[str, str, str, str]:
    """(stage, job id, state, detail): a verified item is 'done (verified)' whatever the scheduler says; one that
    is not shows the scheduler's state while its job is queued, running or failed, else its own."""
    sched = live.get(job, "")
    if item.ok:
        state = "done (verified)"
    elif sched and sched != "COMPLETED":
        state = sched
    else:
        state = item.state
    detail = item.detail if state == item.state or item.ok else f"{item.state}: {item.detail}"
    return item.name, job, state, f"job {sched}; {detail}" if sched and item.name in ("train", "report") else detail


def pipeline_status(run: RunDir) -> list[tuple[str, str, str, str]]:
    """(stage, job id, state, detail) for train, eval, every array task (viz[k]), viz.h5, every projection part
    (project[i]) and feature visualization part (featviz[i]) and the aggregation: each state verified from the
    run's files (hpcviz.runstate), with the
    scheduler's state where a job is still queued or running."""
    if not run.manifest_file.exists():
        raise VizError(f"--run {run}: no manifest.json; hint: start it with jobs/launch_pipeline.py")
    manifest = run.manifest()
    state = run_state(run)
    slurm = (manifest.pipeline.cluster or manifest.train.cluster) == "slurm"
    groups = {kind: [i for i in state.items if i.name.startswith(kind + "[")] for kind in _PARTS}
    jobs = {"train": manifest.train.job_id, "report": manifest.aggregate.job_id,
            **_task_ids(manifest, [i for g in groups.values() for i in g])}
    live: dict[str, str] = {}
    if slurm:
        live = task_states([j for n, j in jobs.items() if n.startswith(("viz[", "project[", "featviz[")) and j])
        live.update({j: query_state(j)[0] for j in (jobs["train"], jobs["report"]) if j})
    rows = []
    for item in state.items:
        group = groups.get(item.name.split("[")[0], []) if "[" in item.name else []
        if len(group) > _MAX_PART_ROWS and item is group[0]:
            bad = [p.name for p in group if not p.ok]
            rows.append((item.name.split("[")[0], "", "done (verified)" if not bad else
                         f"{len(bad)} of {len(group)} not done",
                         f"{len(group)} parts" + (f"; not done: {', '.join(bad[:8])}" if bad else "")))
        if len(group) > _MAX_PART_ROWS and item.ok:
            continue
        rows.append(_row(item, jobs.get(item.name, ""), live))
    rec = manifest.aggregate
    name, job, st, detail = rows[-1]
    if rec.status == "running" and not live.get(job):
        detail += f" (the manifest says the aggregation is {rec.status}: killed?)"
    elif rec.status == "failed":
        detail += f" (the last aggregation failed: {rec.error})"
    rows[-1] = ("aggregate", job, st, detail)
    return rows


_BAD = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "missing", "failed", "stale", "incomplete", "foreign",
        "partial")


def render_status(rows: list[tuple[str, str, str, str]]) -> Any:
    """The status table; every cell is plain text (a run's names never reach rich's markup)."""
    from rich.table import Table
    from rich.text import Text
    table = Table(title="hpcviz pipeline")
    for col in ("stage", "job id", "state", "detail"):
        table.add_column(col)
    for row in rows:
        first = row[2].split()[0].rstrip(":") if row[2] else ""
        style = "green" if row[2].startswith(("COMPLETED", "done")) else ("red" if first in _BAD else "")
        table.add_row(*(Text(terminal_text(cell)) for cell in row), style=style)
    return table


def _finished(run: RunDir, rows: list[tuple[str, str, str, str]], gone: list[int]) -> bool:
    """The aggregation has ended: its result file exists, or the scheduler says it ended. 'GONE' (no
    source knows the job) counts only after 3 polls in a row: a controller restart must not end a wait."""
    job = rows[-1][1]
    if not job or (run.logs / f"{job}_0_result.pkl").exists():
        return True
    state = query_state(job)[0]
    gone[0] = gone[0] + 1 if state == "GONE" else 0
    return (state not in ACTIVE and state not in ("", "GONE")) or gone[0] >= 3


def _settled(run: RunDir, rows: list[tuple[str, str, str, str]], within_s: float = 15.0) -> list:
    """The final states: the aggregation's result file can come a few seconds before the scheduler calls
    the job ended; ask again until it does (at most `within_s`)."""
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


__all__ = ["PipelineTrainJob", "aggregate_job", "check_request", "check_pipeline_request", "check_report_device",
           "submit_pipeline", "run_local", "retry_failed", "retry_cluster", "pipeline_status", "render_status",
           "wait_pipeline", "check_outcome", "describe_problems", "StageFailed", "STAGES"]
