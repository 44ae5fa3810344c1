"""Evaluate a run's checkpoint on any data source (jobs/evaluate.py): results/<run>/eval-<name>.json."""
from __future__ import annotations

import argparse

from ..cli import Parser, add_options, command, given
from ..config import EvalConfig, LaunchConfig, config_from_dict, default_eval_name
from ..launch.executors import check_launch, make_executor, wait_result
from ..log import setup_logging
from ..rundir import RunDir, RunDirError


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("evaluate.py", add_help=add_help, description="Evaluate a run's checkpoint on a data source.")
    add_options(p, EvalConfig, title="evaluation", required=("run_dir", "data"))
    add_options(p, LaunchConfig, title="where to run (default: in this process)", only=("cluster", "gpus", "profile"))
    return p


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    values = given(args, EvalConfig)
    cfg = config_from_dict(EvalConfig, {**values, "name": values.get("name") or default_eval_name(values["data"])})
    cfg.validate()
    requested = {"cluster": "inline", **given(args, LaunchConfig, only=("cluster", "gpus", "profile"))}
    launch = check_launch(config_from_dict(LaunchConfig, requested), cfg.device)
    run = RunDir(cfg.run_dir)
    if not run.checkpoints.is_dir():
        raise RunDirError(f"--run {run}: no checkpoints/ in it; hint: pass a run directory made by "
                          "jobs/launch_train.py")
    from ..train import evaluation  # torch: once the options are known to be good
    evaluation.check_request(cfg, launch, run)
    with run.lock():
        if launch.cluster == "inline":
            result = evaluation.evaluate_run(cfg)
        else:
            ex = make_executor(launch, run.logs, f"hpcviz-eval-{cfg.name}")
            result = wait_result(ex.submit(evaluation.evaluate_run, cfg), launch)
    print(f"{cfg.name}: accuracy {100 * result['accuracy']:.2f}% on {result['n']} images -> {run.eval_file(cfg.name)}")
    return 0
