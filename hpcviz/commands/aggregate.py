"""Collate a run into one report (jobs/aggregate.py): viz/viz.h5, then report/ (figures, tables, md, html)."""
from __future__ import annotations

import argparse

from ..cli import Parser, add_options, command, given
from ..config import AggregateConfig, ConfigError, config_from_dict
from ..errors import JobError
from ..log import setup_logging
from ..rundir import RunDir


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("aggregate.py", add_help=add_help, description="Collate a run into one report.")
    add_options(p, AggregateConfig, title="report", required=("run_dir",))
    return p


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = config_from_dict(AggregateConfig, given(args, AggregateConfig)).validate()
    run = RunDir(cfg.run_dir)
    if not run.is_run():
        raise ConfigError(f"--run {run}: not a run directory (no config.json, manifest.json or checkpoints/); "
                          "hint: train first (jobs/launch_train.py or jobs/launch_pipeline.py)")
    from ..report import aggregate  # matplotlib and torch: once the request is known to be good
    aggregate.check_request(cfg)
    with run.lock():
        summary = aggregate.aggregate(cfg)
    missing = summary["missing_shards"]
    print(f"report: {summary['report']} ({len(summary['figures'])} figures, {summary['n_images']} images)")
    if missing:
        raise JobError(f"the report lacks {len(missing)} shard(s): {', '.join(missing[:5])}; hint: python "
                       f"jobs/launch_pipeline.py --run {run} --retry-failed")
    if summary["incomplete"]:  # the report is written and says so too
        raise JobError(f"the report is written, but the run is {summary['incomplete']}")
    return 0
