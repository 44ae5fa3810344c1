"""The submitted training job: trains; on a time-limit or preemption signal it saves and leaves, and comes back.

A submitit callable (the job receives the config, never a model). `launch_train.py --cluster inline` runs it
as one rank of srun or torchrun; slurm/train.sbatch requeues on EXIT_STOPPED.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any

import submitit

from .. import dist
from ..config import TrainConfig
from .loop import train

__all__ = ["TrainJob", "EXIT_STOPPED"]

EXIT_STOPPED = 3  # a run that saved and stopped on a signal; slurm/train.sbatch requeues on it


class TrainJob:
    """The submitted callable: trains; on a time-limit or preemption signal it saves and leaves.

    On SIGUSR2 (submitit's time-limit warning) rank 0 hands the signal back to submitit's own
    handler once the state is saved, which calls `checkpoint()` and requeues the job. On SIGTERM
    (preemption, `scontrol requeue`, scancel) every rank exits without a result, so submitit's
    client keeps waiting while SLURM requeues the job, and the rerun continues the run.
    """

    def __init__(self, requeue_via_submitit: bool = True, alone: bool = False) -> None:
        self.requeue_via_submitit = requeue_via_submitit
        self.alone = alone  # the debug executor: this process is the whole job, whatever env it inherited

    def __call__(self, cfg: TrainConfig) -> dict[str, Any]:
        result = train(cfg, alone=self.alone)
        if result.get("status") != "stopped":
            return result
        if self.requeue_via_submitit and result.get("signal") == signal.SIGUSR2 and dist.rank() == 0:
            signal.raise_signal(signal.SIGUSR2)  # submitit: checkpoint() + scontrol requeue + exit
        raise SystemExit(EXIT_STOPPED)  # no result pickle: the job is not over

    def checkpoint(self, cfg: TrainConfig) -> submitit.helpers.DelayedSubmission:
        # continue from the run's last checkpoint when the job comes back
        return submitit.helpers.DelayedSubmission(TrainJob(), dataclasses.replace(cfg, resume="auto"))
