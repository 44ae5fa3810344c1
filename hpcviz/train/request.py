"""A training request checked before anything is queued or written: the data, --init, --resume against the run,
the batch against the split and the processes, the memory the data needs."""
from __future__ import annotations

from typing import Any

from ..config import ConfigError, LaunchConfig, TrainConfig
from ..data.memory import check_train
from ..data.sources import check_source, check_split, peek, split_sizes
from ..rundir import RunDir
from . import checkpoint

__all__ = ["check_train_request", "check_batch", "prepare_run"]


def check_train_request(cfg: TrainConfig, launch: LaunchConfig | None = None) -> None:
    """Every check of a training request that decodes nothing and needs no GPU, before anything is queued or
    written: --data (paths, layout, a packed file's labels, an empty validation split), --init, the checkpoint
    --resume continues against this run (arch, stem, classes, data where known; the job checks again with the
    data loaded), then --batch-size against the training split (and the processes of `launch`) and the memory
    the data and batches need (hpcviz.memory)."""
    check_source(cfg.data, cfg.download)
    facts = peek(cfg.data, cfg.image_size)
    check_split(cfg.data, facts, cfg.val_fraction)
    if cfg.init:
        try:
            state = checkpoint.torch_load(cfg.init)
        except Exception as e:  # torch raises several types for a file that is not a state dict
            raise ConfigError(f"--init {cfg.init}: not a readable state dict ({type(e).__name__}); hint: save one "
                              "with torch.save(model.state_dict(), PATH)") from None
        if not isinstance(state, dict):
            raise ConfigError(f"--init {cfg.init}: holds a {type(state).__name__}, not a state dict; hint: save "
                              "model.state_dict(), not the model")
    if cfg.resume:
        found = checkpoint.find_checkpoint(RunDir(cfg.run_dir).checkpoints) if cfg.resume == "auto" else cfg.resume
        if found is not None:
            checkpoint.check_resumable(checkpoint.load_checkpoint(found), cfg,
                                       len(facts.classes) if facts.classes else None, facts.fingerprint)
    check_batch(cfg, facts, launch)  # sizes last: a --resume of another data set says that first
    if launch is not None and launch.cluster != "inline":
        check_train(cfg, launch, facts)


def check_batch(cfg: TrainConfig, facts: Any, launch: LaunchConfig | None = None) -> None:
    """--batch-size: divisible by the processes (when `launch` knows them), and no larger than the training split
    (when the source's classes are known: data.SourceFacts), as the training job would find once started."""
    if launch is not None and launch.cluster != "inline" and launch.gpus is not None:
        world = launch.tasks_per_node() * launch.nodes
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size}: must be divisible by the {world} processes (the global "
                              f"batch is split evenly); hint: use a multiple of {world}, e.g. "
                              f"{max(world, cfg.batch_size - cfg.batch_size % world)}")
    if facts.per_class is not None:
        n_train = split_sizes(facts.per_class, cfg.val_fraction)[0]
        if cfg.batch_size > n_train:
            raise ConfigError(f"--batch-size {cfg.batch_size}: larger than the {n_train} training images of --data "
                              f"{cfg.data} (an epoch would have no step); hint: use --batch-size {n_train} or less, "
                              "or more data")


def prepare_run(cfg: TrainConfig, cluster: str, resume_hint: str = "continue it") -> None:
    """Refuse a --run that already holds a checkpoint without --resume (here, before anything is queued
    or written; the job checks again). Outside debug, the job continues its run when it is requeued."""
    if not cfg.resume:
        found = checkpoint.find_checkpoint(RunDir(cfg.run_dir).checkpoints)
        if found is not None:
            raise checkpoint.CheckpointError(f"--run {cfg.run_dir} already holds a checkpoint ({found}); "
                                             f"hint: pass --resume to {resume_hint}, or choose a new --run")
    if cluster != "debug":
        cfg.resume = cfg.resume or "auto"
