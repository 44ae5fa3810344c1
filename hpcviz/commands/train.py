"""Train a ResNet with DDP (jobs/launch_train.py): submit on SLURM and return, or run here and follow."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import submitit

from ..cli import Parser, add_options, command, given
from ..config import LaunchConfig, TrainConfig, config_from_dict, make_train_config
from ..launch.executors import LaunchError, check_launch, submit_train, wait_result
from ..log import setup_logging
from ..rundir import RunDir, RunLock


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("launch_train.py", add_help=add_help, description="Train a ResNet with DDP.")
    add_options(p, TrainConfig, title="training")
    add_options(p, LaunchConfig, title="where to run")
    return p


def default_run(cfg: TrainConfig) -> str:
    data = cfg.data.split(":")[0].replace("/", "_").strip("._") or "data"
    return f"results/{cfg.arch}-{data}"


def build_configs(args: argparse.Namespace) -> tuple[TrainConfig, LaunchConfig]:
    """The training and launch configs of a command line, checked in full (nothing read from the run yet)."""
    overrides = given(args, TrainConfig)
    cfg = make_train_config(overrides, overrides.pop("recipe", "default"))
    cfg.run_dir = cfg.run_dir if getattr(args, "run", None) else default_run(cfg)
    launch = check_launch(config_from_dict(LaunchConfig, given(args, LaunchConfig)), cfg.device)
    cfg.device = launch.job_device(cfg.device)
    return cfg, launch


def follow_training(job: submitit.Job, cfg: TrainConfig, launch: LaunchConfig,
                    find_checkpoint: Callable[[Path], Path | None]) -> dict:
    """Wait for a training job; a job that died (killed, out of memory) leaves the record failed and the error
    says how to continue from the last checkpoint (find_checkpoint: hpcviz.train.checkpoint's)."""
    try:
        return wait_result(job, launch, follow=launch.wait)
    except LaunchError as e:
        run = RunDir(cfg.run_dir)
        if launch.cluster != "slurm":
            run.mark_lost("train", str(e))
        last = find_checkpoint(run.checkpoints)
        first, _, rest = str(e).partition("\n")
        hint = (f"continue it from {last} with the same command and --resume" if last is not None else
                "no checkpoint was saved yet: rerun the same command")
        raise LaunchError(f"{first}; hint: {hint}" + (f"\n{rest}" if rest else "")) from None


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    cfg, launch = build_configs(args)
    from ..train import checkpoint, job, request  # torch: once the options are known to be good
    from ..viz.state import StageFailed, check_outcome
    request.check_train_request(cfg, launch)
    if launch.cluster == "inline":  # one rank of srun/torchrun: train here, exit 3 if stopped on a signal
        result = job.TrainJob(requeue_via_submitit=False)(cfg)
        if result.get("rank", 0) == 0:
            print(f"done: {cfg.run_dir} (val accuracy {100 * result['val_accuracy']:.2f}%)")
        return 0
    with RunDir(cfg.run_dir).lock() as lock:
        request.prepare_run(cfg, launch.cluster)
        submitted = submit_train(cfg, launch, job.TrainJob())
        add_job(lock, submitted, launch)
        if launch.cluster == "slurm" and not launch.wait:
            print(f"submitted job {submitted.job_id}\n  run dir: {cfg.run_dir}\n"
                  f"  follow:  tail -f {RunDir(cfg.run_dir).logs / f'{submitted.job_id}_0_log.err'}"
                  f"\n  or:      squeue -j {submitted.job_id}")
            return 0
        result = follow_training(submitted, cfg, launch, checkpoint.find_checkpoint)
    print(f"{result.get('status', 'done')}: {cfg.run_dir} "
          f"(val accuracy {100 * result.get('val_accuracy', float('nan')):.2f}%)")
    try:  # a run that stopped (a signal, a time limit) or whose files do not verify is not done
        check_outcome(RunDir(cfg.run_dir), ("train",))
    except StageFailed as e:
        raise LaunchError(f"{e}; hint: continue it with the same command and --resume") from None
    return 0


def add_job(lock: RunLock, job: submitit.Job, launch: LaunchConfig) -> None:
    """The run's lock names the job: SLURM jobs hold the run after the launcher returns."""
    if launch.cluster in ("slurm", "local"):
        lock.add_jobs([str(job.job_id)], launch.cluster)
