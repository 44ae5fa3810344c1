"""Train, visualize and report in one command (jobs/launch_pipeline.py), follow it, retry what failed."""
from __future__ import annotations

import argparse
import sys
from types import ModuleType

from rich.console import Console

from ..cli import Parser, add_options, command, given
from ..config import AggregateConfig, ConfigError, LaunchConfig, VizConfig, config_from_dict
from ..errors import Interrupted
from ..launch.executors import check_launch, stage_launch
from ..log import setup_logging
from ..rundir import RunDir
from . import train


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("launch_pipeline.py", add_help=add_help, parents=[train.get_args_parser()],
               description="Train, visualize and report in one command.")
    add_options(p, VizConfig, title="visualization", prefix="viz-", skip=("run_dir",))
    add_options(p, AggregateConfig, title="report", skip=("run_dir",))
    g = p.add_argument_group("pipeline")
    g.add_argument("--status", action="store_true",
                   help="show each stage and array task of --run, then exit (with --wait: follow them to the end)")
    g.add_argument("--retry-failed", action="store_true",
                   help="resubmit only the missing/failed array tasks of --run, then aggregate again")
    return p


def _report_config(args: argparse.Namespace, run: str) -> AggregateConfig:
    return AggregateConfig(**given(args, AggregateConfig, skip=("run_dir",)), run_dir=run).validate()


def _print_submitted(run: RunDir, ids: dict) -> None:
    print(f"submitted pipeline for {run}:\n"
          f"  train job {ids['train']}\n"
          f"  viz array {', '.join(ids['viz'])} ({ids['n_tasks']} tasks, afterok:{ids['train']})\n"
          + (f"  project array {', '.join(ids['project'])} (the dataset examples' projections, afterany on the "
             "viz array)\n" if ids.get("project") else "")
          + (f"  featviz array {', '.join(ids['featviz'])} (feature visualization of every channel, afterok:"
             f"{ids['train']})\n" if ids.get("featviz") else "")
          + f"  aggregate job {ids['aggregate']} (afterany on the last array)\n"
          f"  status:  python jobs/launch_pipeline.py --run {run} --status   (or --wait to follow)\n"
          f"  report:  {run.report_dir / 'report.html'} when the aggregation has run\n"
          f"  retry:   python jobs/launch_pipeline.py --run {run} --retry-failed")


def _status(args: argparse.Namespace, run: RunDir, pl: ModuleType) -> int:
    if args.wait:
        pl.wait_pipeline(run)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs and pipes: wide, no wrapping
    console.print(pl.render_status(pl.pipeline_status(run)))
    return 0


def _retry(args: argparse.Namespace, run: RunDir, pl: ModuleType) -> int:
    if not run.manifest_file.exists():
        raise ConfigError(f"--run {run}: no manifest.json; hint: start it with jobs/launch_pipeline.py")
    run.read_plan()  # a run that never planned has nothing to retry: refused before anything else
    requested = given(args, LaunchConfig)
    requested["cluster"] = pl.retry_cluster(run, requested.get("cluster", "auto"))
    launch = check_launch(config_from_dict(LaunchConfig, requested), getattr(args, "viz_device", None) or "auto")
    agg_cfg = _report_config(args, str(run.path))
    pl.check_report_device(agg_cfg, launch.cluster)
    with run.lock() as lock:
        result = pl.retry_failed(run, launch, agg_cfg, lock)
    if launch.cluster == "slurm":
        print(f"resubmitted {len(result['todo'])} shard(s) {result['todo']} as array "
              f"{', '.join(result['viz']) or '-'}; projection array {', '.join(result['project']) or '-'}; "
              f"featviz array {', '.join(result['featviz']) or '-'}; "
              f"aggregate job {result['aggregate']}")
        if launch.wait:
            pl.wait_pipeline(run)
        return 0
    print(f"report: {result['report']}")
    pl.check_outcome(run)
    return 0


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    if args.status and args.retry_failed:
        raise ConfigError("--status and --retry-failed together: one at a time; hint: --status to look, "
                          "--retry-failed to redo what failed")
    if (args.status or args.retry_failed) and not args.run:
        raise ConfigError("--status/--retry-failed need --run RUN; hint: the run directory you launched")
    from ..launch import pipeline as pl  # torch: once the options are known to be good
    try:
        if args.status:
            return _status(args, RunDir(args.run), pl)
        if args.retry_failed:
            return _retry(args, RunDir(args.run), pl)
        return _launch(args, pl)
    except KeyboardInterrupt:  # only the wait ends: submitted jobs keep running
        raise Interrupted(f"interrupted: submitted jobs keep running; python jobs/launch_pipeline.py --run "
                          f"{args.run} --status shows them") from None


def _launch(args: argparse.Namespace, pl: ModuleType) -> int:
    cfg, launch = train.build_configs(args)
    if launch.cluster == "inline":
        raise ConfigError("--cluster inline: the pipeline submits jobs; hint: --cluster slurm or local")
    viz_cfg = config_from_dict(VizConfig, {**given(args, VizConfig, prefix="viz-", skip=("run_dir",)),
                                           "run_dir": cfg.run_dir})
    staged = stage_launch(launch, "viz")
    viz_cfg.device = staged.job_device(viz_cfg.device)
    viz_cfg = viz_cfg.featviz_here(launch.cluster)
    viz_cfg = viz_cfg.sized(bool(staged.gpus) and viz_cfg.device != "cpu", cfg.image_size)  # as the plan will be
    agg_cfg = _report_config(args, cfg.run_dir)
    pl.check_pipeline_request(cfg, viz_cfg, agg_cfg, launch)
    run = RunDir(cfg.run_dir)
    with run.lock() as lock:
        if launch.cluster == "slurm":
            ids = pl.submit_pipeline(cfg, viz_cfg, agg_cfg, launch, lock)
            _print_submitted(run, ids)
            if launch.wait:
                pl.wait_pipeline(run)
            return 0
        summary = pl.run_local(cfg, viz_cfg, agg_cfg, launch, lock)
    print(f"report: {summary['report']}")
    pl.check_outcome(run)
    return 0
