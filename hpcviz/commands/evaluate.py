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
    from ..data.sources import check_source  # torch: once the options are known to be good
    check_source(cfg.data)
    _check_memory(cfg, launch, run)
    from ..train.evaluation import evaluate_run
    with run.lock():
        if launch.cluster == "inline":
            result = evaluate_run(cfg)
        else:
            ex = make_executor(launch, run.logs, f"hpcviz-eval-{cfg.name}")
            result = wait_result(ex.submit(evaluate_run, cfg), launch)
    print(f"{cfg.name}: accuracy {100 * result['accuracy']:.2f}% on {result['n']} images -> {run.eval_file(cfg.name)}")
    return 0


def _check_memory(cfg: EvalConfig, launch: LaunchConfig, run: RunDir) -> None:
    """The source decoded whole at the run's image size, and its batches on a CPU, against the memory there is."""
    import torch

    from ..config import default_stem
    from ..data import memory
    from ..data.sources import peek
    train = run.read_config().get("train") or {}
    if not {"arch", "image_size"} <= set(train):
        return
    on_cpu = cfg.device == "cpu" or not (launch.gpus if launch.gpus is not None else torch.cuda.is_available())
    facts = peek(cfg.data, train["image_size"])
    classes = len(facts.classes) if facts.classes else 10
    need = memory.eval_need(cfg.data, facts, train["image_size"], train["arch"],
                            train.get("stem") or default_stem(train["arch"]),
                            classes, cfg.batch_size, on_cpu)
    memory.check(f"--data {cfg.data} at the run's image size {train['image_size']}", need, memory.host_limit(launch),
                 "a smaller --batch-size, or evaluate a part of the data")
