"""The visualization array (jobs/launch_viz.py): dump every block's activations, deconvnet reconstructions
and inversions of a trained run's images into HDF5 shards, one array task per shard, then collate."""
from __future__ import annotations

import argparse

from ..cli import Parser, add_options, command, given
from ..config import ConfigError, LaunchConfig, VizConfig, config_from_dict
from ..errors import JobError
from ..launch.executors import check_launch, stage_launch
from ..log import setup_logging
from ..rundir import RunDir


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("launch_viz.py", add_help=add_help, description="Visualize a trained run with an array job.")
    add_options(p, VizConfig, title="visualization", required=("run_dir",))
    p.add_argument("--fresh", action="store_true", help="replace the shards of an earlier, different request")
    add_options(p, LaunchConfig, title="where to run")
    return p


def failures(out: dict) -> str:
    """The error of a visualization whose tasks failed or whose shards are missing ('' when complete)."""
    summary, failed = out["collation"], out["failed"]
    missing = sorted(summary["missing"]) if summary else []
    if not failed and not missing and (summary is None or summary["path"] is not None):
        return ""
    head = f"{len(failed)} of {len(out['todo'])} visualization task(s) failed" if failed else \
        f"{len(missing)} shard(s) missing: {', '.join(f'shard-{k:05d}.h5' for k in missing[:5])}"
    first = f"; first: {failed[0]}" if failed else ""
    return f"{head}{first}; hint: fix the cause, then rerun the same command (finished shards are kept)" + \
        "".join(f"\n{line}" for line in failed[1:8])


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = config_from_dict(VizConfig, given(args, VizConfig)).validate()
    launch = check_launch(config_from_dict(LaunchConfig, given(args, LaunchConfig)), cfg.device)
    cfg.device = stage_launch(launch, "viz").job_device(cfg.device)
    cfg = cfg.featviz_here(launch.cluster)
    run = RunDir(cfg.run_dir)
    if not run.checkpoints.is_dir():
        raise ConfigError(f"--run {run}: no checkpoints/ in it; hint: train first (jobs/launch_train.py), or check "
                       "the path")
    from ..launch.array import launch_viz  # torch: imported once the options are known to be good
    with run.lock() as lock:
        out = launch_viz(cfg, launch, fresh=args.fresh, lock=lock)
    if out["collation"] is None:
        proj = f"\n  projections (dataset examples): array job(s) {', '.join(out['projection_ids'])}, after it" \
            if out["projection_ids"] else ""
        proj += f"\n  feature visualization: array job(s) {', '.join(out['featviz_ids'])}, beside it" \
            if out["featviz_ids"] else ""
        print(f"submitted array job(s) {', '.join(out['ids'])}: {len(out['todo'])} task(s){proj}\n  run dir: {run}\n"
              f"  then:    python jobs/launch_viz.py --run {run} ... again collates (or add --wait)")
        return 0
    summary = out["collation"]
    n = summary["n_shards"]
    print(f"viz: {summary['n_images']} images in {n - len(summary['missing'])}/{n} shards -> {run.viz_file}")
    problem = failures(out)
    if problem:
        raise JobError(problem)
    failed = out["projection_failed"]
    if failed:  # the shards and viz.h5 are kept; the aggregation computes what the parts left undone
        raise JobError(f"{len(failed)} projection part(s) failed: {failed[0]}; the shards and viz.h5 are kept; "
                       f"hint: fix the cause, then python jobs/aggregate.py --run {run} computes them"
                       + "".join(f"\n{line}" for line in failed[1:8]))
    failed = out["featviz_failed"]
    if failed:  # the shards and viz.h5 are kept; the aggregation computes what the parts left undone
        raise JobError(f"{len(failed)} featviz part(s) failed: {failed[0]}; the shards and viz.h5 are kept; "
                       f"hint: fix the cause, then python jobs/aggregate.py --run {run} computes them"
                       + "".join(f"\n{line}" for line in failed[1:8]))
    if out["incomplete"]:
        raise JobError(f"the visualization is {out['incomplete']}")
    return 0
