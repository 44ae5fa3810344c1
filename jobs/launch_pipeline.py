"""Train, visualize and report in one command: `python jobs/launch_pipeline.py --gpus 4 --run results/r18 --data data/cifar10-train.h5`

On SLURM it submits three jobs at once and returns: training; the visualization array with
`afterok` on training (activations, deconvnet and inversions into HDF5 shards); the aggregation with
`afterany` on the array, so it reports whatever failed (results/<run>/report/report.html). Job ids
and stages go to results/<run>/manifest.json. `--wait` follows the stages in a live table;
`--status` shows them once; `--retry-failed` resubmits only the missing or failed array tasks and
aggregates again. `--cluster local` (or debug) runs the same stages here, in order. Takes every
option of jobs/launch_train.py and of jobs/launch_viz.py (those both have are --viz-split,
--viz-batch-size, --viz-device, --viz-seed here) and of jobs/aggregate.py.
Exit code: 0 done (or submitted), 1 a stage failed or shards are missing, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aggregate as aggregate_job  # noqa: E402  (jobs/aggregate.py)
import launch_train  # noqa: E402
import launch_viz  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz pipeline", parents=[launch_train.get_args_parser()], add_help=add_help,
                                conflict_handler="error")
    launch_viz.add_viz_args(p, prefix="viz-")
    aggregate_job.add_report_args(p)
    g = p.add_argument_group("pipeline")
    g.add_argument("--status", action="store_true",
                   help="show each stage and array task of --run, then exit (with --wait: follow them to the end)")
    g.add_argument("--retry-failed", action="store_true",
                   help="resubmit only the missing/failed array tasks of --run, then aggregate again")
    return p


def _print_submitted(run: Path, ids: dict) -> None:
    print(f"submitted pipeline for {run}:\n"
          f"  train job {ids['train']}\n"
          f"  viz array {', '.join(ids['viz'])} ({ids['n_tasks']} tasks, afterok:{ids['train']})\n"
          f"  aggregate job {ids['aggregate']} (afterany on the array)\n"
          f"  status:  python jobs/launch_pipeline.py --run {run} --status   (or --wait to follow)\n"
          f"  report:  {run / 'report' / 'report.html'} when the aggregation has run\n"
          f"  retry:   python jobs/launch_pipeline.py --run {run} --retry-failed")


def _status(run: Path) -> int:
    from rich.console import Console

    from hpcviz.pipeline import pipeline_status, render_status
    Console().print(render_status(pipeline_status(run)))
    return 0


def _retry(args: argparse.Namespace, run: Path, launch) -> int:
    from hpcviz.pipeline import outcome, retry_failed, wait_pipeline
    result = retry_failed(run, launch, aggregate_job.build_config(args, str(run)), args.throttle)
    if "aggregate" in result:  # submitted to SLURM
        print(f"resubmitted {len(result['todo'])} shard(s) {result['todo']} as array {', '.join(result['viz']) or '-'}"
              f"; aggregate job {result['aggregate']}")
        return wait_pipeline(run) if args.wait else 0
    print(f"report: {result['report']}")
    return outcome(run)


def main(args: argparse.Namespace) -> int:
    from hpcviz.launch import LaunchError, detect_cluster, precheck_data, prepare_run
    from hpcviz.log import setup_logging
    from hpcviz.pipeline import outcome, run_local, submit_pipeline, wait_pipeline
    setup_logging()
    try:
        if (args.status or args.retry_failed) and not args.run:
            raise ValueError("--status/--retry-failed need --run RUN; hint: the run directory you launched")
        cfg, launch = launch_train.build_configs(args)
        run = Path(cfg.run_dir)
        if args.status:
            if args.wait:
                from hpcviz.pipeline import wait_pipeline
                return wait_pipeline(run)
            return _status(run)
        launch.cluster = detect_cluster(launch.cluster)
        if args.retry_failed:
            return _retry(args, run, launch)
        precheck_data(cfg.data, cfg.download)
        viz_cfg = launch_viz.build_viz_config(args, str(run), prefix="viz-")
        agg_cfg = aggregate_job.build_config(args, str(run))
        if launch.cluster == "inline":
            raise LaunchError("--cluster inline: the pipeline submits jobs; hint: --cluster slurm or local")
        prepare_run(cfg, launch.cluster, "continue it (finished stages are skipped)")
        if launch.cluster == "slurm":
            ids = submit_pipeline(cfg, viz_cfg, agg_cfg, launch, args.throttle)
            _print_submitted(run, ids)
            return wait_pipeline(run) if args.wait else 0
        summary = run_local(cfg, viz_cfg, agg_cfg, launch)
        print(f"report: {summary['report']}")
        return outcome(run)
    except (ValueError, LaunchError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:  # only the wait ends: submitted jobs keep running
        print("interrupted: submitted jobs keep running; --run RUN --status shows them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
