"""Training: DDP over 1..N processes, data resident on the device, bit-exact resume.

Every random draw is a function of (seed, epoch, step, rank): the order of the
training images comes from a generator seeded by (seed, epoch), augmentation
from one seeded by (seed, epoch, step, rank). A checkpoint therefore only needs
the weights, the optimizer state and the position (epoch, step); resuming from
it, after a crash, a requeue or a time limit, gives bit-identical weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__, dist
from ..config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from ..data import placement
from ..data.placement import Feed
from ..data.sources import DataError
from ..data.transforms import augment, norm_tensors, normalize, split_indices
from ..errors import JobError
from ..log import StepProgress, setup_logging
from ..models import build_model, from_checkpoint, load_init
from ..rundir import RunDir
from . import checkpoint
from .evaluation import autocast_for, evaluate, summarize

log = logging.getLogger("hpcviz")


class TrainingError(JobError, FloatingPointError):
    """Training cannot go on: the loss is not finite."""


@dataclass
class Split:
    train: Feed             # Nt training images, as batches on the device (see hpcviz.placement)
    val: Feed               # Nv validation images
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    placement: str          # device | host | stream

    @property
    def device(self) -> torch.device:
        return self.train.device


def prepare_data(cfg: TrainConfig, device: torch.device) -> Split:
    """Open the source (one copy per node at most), carve the seeded validation split, compute the
    normalisation on the train part (rank 0, in one pass) and place the images (cfg.data_placement)."""
    src = placement.open_source(cfg, cfg.data_placement)
    if src.n and (int(src.labels.min()) < 0 or int(src.labels.max()) >= len(src.classes)):
        raise DataError(f"--data {cfg.data}: labels {int(src.labels.min())}..{int(src.labels.max())} in that file "
                        f"are outside 0..{len(src.classes) - 1} (its {len(src.classes)} classes); hint: repack it "
                        "with jobs/pack_data.py")
    train_idx, val_idx = split_indices(src.labels, cfg.val_fraction, seed=cfg.split_seed)
    if not len(val_idx):
        raise DataError(f"--data {cfg.data}: the validation split is empty ({src.n} images, --val-fraction "
                        f"{cfg.val_fraction:g} rounds to no image of any class); hint: use more images per class "
                        "or a larger --val-fraction")
    if dist.is_main():
        facts: Any = (placement.train_stats(src, train_idx), placement.source_fingerprint(src),
                      placement.choose(cfg.data_placement, src, device))
    else:
        facts = None
    (mean, std), fp, where = cast(Any, dist.broadcast_object(facts))  # the same on every rank, computed once
    train_feed, val_feed = placement.make_feeds(src, where, train_idx, val_idx, device, cfg.data_workers)
    return Split(train_feed, val_feed, src.classes, mean, std, fp, where)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`: linear warm-up from lr/10, then one-cycle (linear to 0), cosine, or constant."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    if step < warmup:
        return cfg.lr * (0.1 + 0.9 * step / warmup)
    frac = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "onecycle":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only: decaying BN scales and biases only hurts."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator whose stream is a function of `parts` only."""
    g = torch.Generator()
    g.manual_seed(hash_ints(*parts))
    return g


def hash_ints(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class StopRequest:
    """Signal handler that only sets a flag; the loop agrees on a step across ranks, then stops there."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        for s in signals:
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a debug executor): no signal handling
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}


def build_for_training(cfg: TrainConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(raw model, model to call for training: DDP-wrapped and/or compiled)."""
    torch.manual_seed(hash_ints(cfg.seed, 0xC0DE))
    raw = build_model(cfg.arch, num_classes, cfg.stem)
    if cfg.init:
        load_init(raw, checkpoint.torch_load(cfg.init))
    raw = raw.to(device)
    if cfg.channels_last:  # faster on GPUs (tensor cores) and, with oneDNN, several times on CPUs
        raw = raw.to(memory_format=torch.channels_last)
    model = dist.wrap_ddp(raw, device)
    if cfg.compile:
        model = cast(nn.Module, torch.compile(model))
    return raw, model


class Meters:
    """Running sums of one epoch's training loss and accuracy (checkpointed, so resumed epochs report exactly)."""

    def __init__(self, state: dict[str, float] | None = None) -> None:
        s = state or {}
        self.loss_sum, self.correct, self.n = s.get("loss_sum", 0.0), s.get("correct", 0.0), s.get("n", 0.0)
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        # loss and hits stay on the device (summed at the epoch's end or a checkpoint) and the count is a
        # host number: the step never syncs
        self._pending.append(torch.stack([loss.detach().double() * len(y),
                                          (logits.detach().argmax(1) == y).sum().double()]))
        self.n += float(len(y))

    def state(self) -> dict[str, float]:
        if self._pending:
            total = torch.stack(self._pending).sum(0).tolist()
            self.loss_sum, self.correct = self.loss_sum + total[0], self.correct + total[1]
            self._pending = []
        return {"loss_sum": self.loss_sum, "correct": self.correct, "n": self.n}

    def global_state(self, device: torch.device) -> dict[str, float]:
        """The sums over all ranks (every rank must call it): what a checkpoint stores."""
        s = self.state()
        t = dist.all_reduce_sum(torch.tensor([s["loss_sum"], s["correct"], s["n"]], dtype=torch.float64, device=device))
        return {"loss_sum": float(t[0]), "correct": float(t[1]), "n": float(t[2])}

    def global_means(self, device: torch.device) -> tuple[float, float]:
        g = self.global_state(device)
        return g["loss_sum"] / max(g["n"], 1.0), g["correct"] / max(g["n"], 1.0)


@dataclass
class Position:
    epoch: int = 0   # epoch being run (0-based)
    step: int = 0    # next step inside it


def epoch_batches(cfg: TrainConfig, epoch: int, first_step: int, steps_per_epoch: int, n: int,
                  device: torch.device) -> list[torch.Tensor]:
    """This rank's positions in the training split for steps first_step.. of `epoch`: (b,) each, on `device`.
    The order is a function of (seed, epoch) alone, so every rank, placement and resume agrees on it."""
    local_b = cfg.batch_size // dist.world_size()
    perm = torch.randperm(n, generator=seeded(cfg.seed, epoch))  # (Nt,) once per epoch
    perm = perm.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else perm.to(device)
    return [perm[step * cfg.batch_size + dist.rank() * local_b:][:local_b]
            for step in range(first_step, steps_per_epoch)]


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, split: Split, cfg: TrainConfig,
                    pos: Position, steps_per_epoch: int, meters: Meters, stop: StopRequest,
                    save: Callable[[Position, Meters], None]) -> bool:
    """Run the steps of `pos.epoch` from `pos.step`; False if all ranks agreed to stop early (state saved).

    The steady-state step never waits for the device: the only host-device syncs are the checks every
    `check_every` steps (divergence, a stop signal, the loss for the log), marked with dist.sync_allowed."""
    device = split.device
    total_steps = steps_per_epoch * cfg.epochs
    m, s = norm_tensors(split.mean, split.std, device)  # once, not a host-device copy per step
    check_every = 1 if device.type == "cpu" else 10
    progress = StepProgress(steps_per_epoch, f"epoch {pos.epoch + 1}/{cfg.epochs}", cfg.log_every)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    lists = epoch_batches(cfg, pos.epoch, pos.step, steps_per_epoch, split.train.n, split.train.index_device)
    batches = split.train.batches(lists)
    try:
        for step, (x, y) in zip(range(pos.step, steps_per_epoch), batches):  # x: (b, 3, H, W) uint8, y: (b,)
            lr = lr_at(pos.epoch * steps_per_epoch + step, total_steps, steps_per_epoch, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.augment:
                x = augment(x, seeded(cfg.seed, pos.epoch, step, dist.rank()))
            x = normalize(x, m, s)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, cfg.amp):
                logits = model(x)  # (b, K)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meters.add(loss, logits, y)
            bad |= ~torch.isfinite(loss)
            pos.step = step + 1
            due_save = cfg.checkpoint_every > 0 and pos.step % cfg.checkpoint_every == 0
            due_log = pos.step % cfg.log_every == 0
            if pos.step % check_every == 0 or pos.step == steps_per_epoch or due_save or due_log:
                with dist.sync_allowed():
                    nonfinite, stopping = dist.any_ranks([bad, stop.signum is not None], device)
                    if nonfinite:
                        raise TrainingError(f"loss is not finite at epoch {pos.epoch + 1}, step {pos.step} "
                                            f"(lr {lr:g}); nothing was saved from this epoch; hint: lower --lr "
                                            "or --warmup-epochs longer, then --resume from the last checkpoint")
                    if stopping and pos.step < steps_per_epoch:
                        save(pos, meters)
                        return False
                    if due_save and pos.step < steps_per_epoch:
                        save(pos, meters)
                    if due_log:
                        progress.update(pos.step, f"loss {loss.item():.3f} lr {lr:.4g}")
            if not due_log:
                progress.update(pos.step)
    finally:
        progress.close()
        batches.close()
    return True


Session = tuple[nn.Module, nn.Module, torch.optim.Optimizer]  # (raw model, the model trained: DDP/compiled, optimizer)


def train_steps(cfg: TrainConfig, split: Split, steps: int, session: Session | None = None, epoch: int = 0) -> Session:
    """`steps` steps of the training step itself (train_one_epoch, as epoch `epoch`), with no checkpoint, stop signal
    or log line: what the benchmarks time and the GPU check runs under its sync guard. `session`: the models and
    optimizer of an earlier call to go on with (a warm-up), else fresh ones (build_for_training). Returns them."""
    if session is None:
        raw, model = build_for_training(cfg, len(split.classes), split.device)
        session = (raw, model, make_optimizer(raw, cfg))
    quiet = dataclasses.replace(cfg, log_every=10 ** 9)
    train_one_epoch(session[1], session[2], split, quiet, Position(epoch, 0), steps, Meters(), StopRequest(signals=()),
                    lambda *a: None)
    return session


def load_resume_state(cfg: TrainConfig, num_classes: int, fingerprint: str | None = None) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None for a fresh run; refuses to overwrite an existing run."""
    ckpt_dir = RunDir(cfg.run_dir).checkpoints
    if cfg.resume in ("", "auto"):
        found = checkpoint.find_checkpoint(ckpt_dir)
        if found is None:
            return None
        if cfg.resume == "" and dist.restart_count() == 0:
            raise checkpoint.CheckpointError(
                f"--run {cfg.run_dir} already holds a checkpoint ({found}); hint: pass --resume to continue it, "
                "or choose a new --run (nothing was overwritten)")
        path: Path | str = found
    else:
        # a requeued job continues its own run, not the checkpoint it was first started from
        own = checkpoint.find_checkpoint(ckpt_dir) if dist.restart_count() > 0 else None
        path = own or cfg.resume
    state = checkpoint.load_checkpoint(path)
    checkpoint.check_resumable(state, cfg, num_classes, fingerprint)
    return state


def checkpoint_state(raw: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, split: Split,
                     pos: Position, meters: Meters) -> dict[str, Any]:
    """What a checkpoint holds (also written by hpcviz.importing, for a run that was not trained here)."""
    # CPU tensors: the checkpoint loads with plain torch.load(path, weights_only=True) on a machine without
    # a GPU; resuming moves the optimizer state to the parameters' device (Optimizer.load_state_dict)
    return {"model": checkpoint.to_cpu(raw.state_dict()), "optimizer": checkpoint.to_cpu(opt.state_dict()),
            "epoch": pos.epoch, "step": pos.step,
            "meters": meters.global_state(split.device), "config": config_to_dict(cfg), "classes": list(split.classes),
            "mean": list(split.mean), "std": list(split.std), "data_fingerprint": split.fingerprint,
            "world_size": dist.world_size(), "hpcviz_version": __version__, "torch_version": str(torch.__version__)}


def train(cfg: TrainConfig, alone: bool = False) -> dict[str, Any]:
    """Train (or continue) the run in cfg.run_dir; returns the final evaluation, or how it stopped.
    `alone`: this process is the whole job (the debug executor), whatever launcher variables it inherited."""
    cfg.validate()
    device_type = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    dist.init(device_type, cfg.dist_timeout_min, alone=alone)
    setup_logging()
    stop = StopRequest()
    started: list[bool] = []
    benchmark = torch.backends.cudnn.benchmark  # _train turns it on for GPUs: the caller's setting comes back
    try:
        return _train(cfg, dist.pick_device(cfg.device), stop, started)
    except Exception as e:
        if dist.is_main():
            _record_end(RunDir(cfg.run_dir), e, bool(started))
        raise
    finally:
        torch.backends.cudnn.benchmark = benchmark
        stop.restore()
        dist.cleanup()


def _record_end(run: RunDir, error: Exception, started: bool) -> None:
    """Once this run's files are ours, a status view must see why it ended; a refused start (a run that exists
    without --resume, a checkpoint of other data) puts back the record its submission replaced."""
    try:
        if started:
            run.update("train", status="failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
        else:
            run.abandon("train")
    except Exception as e:  # e.g. a full disk: the job's own error is what matters
        log.warning("could not record the end of training in %s: %s", run.manifest_file, e)


def _train(cfg: TrainConfig, device: torch.device, stop: StopRequest, started: list[bool]) -> dict[str, Any]:
    run = Path(cfg.run_dir)
    dist.share_cores()
    if cfg.batch_size % dist.world_size():
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be divisible by the {dist.world_size()} processes; "
                          f"hint: use {cfg.batch_size - cfg.batch_size % dist.world_size()}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    split = prepare_data(cfg, device)
    dist.barrier()  # the first collective waits for the slowest rank's data (long timeout) ...
    dist.settle(cfg.collective_timeout_min)  # ... every later one may not hang for long
    steps_per_epoch = split.train.n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size}: larger than the {split.train.n} training images; "
                          "hint: use a smaller --batch-size or more data")
    resume = load_resume_state(cfg, len(split.classes), split.fingerprint)
    raw, model = build_for_training(cfg, len(split.classes), device)
    opt = make_optimizer(raw, cfg)
    pos, meters = _resume(resume, raw, opt, split) if resume is not None else (Position(), Meters())
    if dist.is_main():
        start_run_files(cfg, split, device, resume is not None, pos)
    started.append(True)

    def save(p: Position, m: Meters) -> None:
        state = checkpoint_state(raw, opt, cfg, split, p, m)  # every rank: meters.state() must run everywhere
        if dist.is_main():
            checkpoint.save_checkpoint(state, RunDir(run).checkpoints)
        dist.barrier()

    log.info("training %s (%s stem) on %d images of %d classes, %d steps/epoch, %d process(es); rank 0 on %s; "
             "data placement %s", cfg.arch, cfg.resolved_stem(), split.train.n, len(split.classes), steps_per_epoch,
             dist.world_size(), dist.describe_device(device), split.placement)
    saved = time.monotonic()
    while pos.epoch < cfg.epochs:
        t0 = time.perf_counter()
        images_before = meters.state()["n"]
        if not train_one_epoch(model, opt, split, cfg, pos, steps_per_epoch, meters, stop, save):
            log.warning("stopping at epoch %d step %d on signal %s: checkpoint saved", pos.epoch + 1, pos.step,
                        signal.Signals(stop.signum).name if stop.signum else "?")
            if dist.is_main():
                RunDir(run).update("train", status="stopped", epoch=pos.epoch, step=pos.step)
            return {"status": "stopped", "epoch": pos.epoch, "step": pos.step, "signal": stop.signum}
        train_s = time.perf_counter() - t0
        dist.broadcast_buffers(raw)
        _end_epoch(cfg, raw, split, pos, meters, train_s, images_before, opt)
        pos, meters = Position(pos.epoch + 1, 0), Meters()
        # by time, not every epoch (an epoch can take seconds); the last always, a stop signal always (above)
        due = pos.epoch == cfg.epochs or time.monotonic() - saved >= 60 * cfg.checkpoint_minutes
        if dist.any_ranks([due], device)[0]:  # rank 0's clock is not rank 1's: all save, or none
            save(pos, meters)
            saved = time.monotonic()
    return final_eval(cfg, raw, split)


def _resume(resume: dict[str, Any], raw: nn.Module, opt: torch.optim.Optimizer,
            split: Split) -> tuple[Position, Meters]:
    """The weights, optimizer, position and meters of the checkpoint `resume`; `split` takes its normalisation."""
    raw.load_state_dict(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    # the checkpoint holds the sums over all ranks: rank 0 carries them, the others start at 0
    pos, meters = Position(resume["epoch"], resume["step"]), Meters(resume["meters"] if dist.is_main() else None)
    log.info("resumed from %s at epoch %d step %d", resume["path"], pos.epoch + 1, pos.step)
    # the weights expect the normalisation they were trained with: the same as the data's for a run trained
    # here, but an imported run's (hpcviz.train.weights) may be ImageNet's
    mean, std = resume["mean"], resume["std"]
    split.mean, split.std = (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
    return pos, meters


def start_run_files(cfg: TrainConfig, split: Split, device: torch.device, resumed: bool, pos: Position) -> None:
    """config.json's "train", the manifest's train record (running) and metrics.jsonl, as a run starts."""
    run = RunDir(cfg.run_dir)
    run.logs.mkdir(parents=True, exist_ok=True)
    run.write_config("train", config_to_dict(cfg))
    run.update("train", status="running", previous=None, error="", host=os.uname().nodename,
               world_size=dist.world_size(), device=dist.describe_device(device), data_placement=split.placement,
               hpcviz_version=__version__, torch_version=str(torch.__version__), dataset_fingerprint=split.fingerprint,
               classes=list(split.classes), restarts=dist.restart_count())
    # epochs at or after the resume point will be written again: drop them so none appears twice
    kept = [r for r in run.read_metrics() if resumed and r["epoch"] <= pos.epoch]
    run.write_metrics(kept)


def _end_epoch(cfg: TrainConfig, raw: nn.Module, split: Split, pos: Position, meters: Meters,
               train_s: float, images_before: float, opt: torch.optim.Optimizer) -> None:
    train_loss, train_acc = meters.global_means(split.device)
    val = evaluate(raw, split.val, split.mean, split.std, len(split.classes), cfg.eval_batch_size, cfg.amp,
                   cfg.channels_last)
    images = (meters.state()["n"] - images_before) * dist.world_size()
    record = {"epoch": pos.epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val["loss"],
              "val_acc": val["accuracy"], "lr": opt.param_groups[0]["lr"], "images_per_s": images / train_s,
              "epoch_s": train_s, "time": time.time()}
    if dist.is_main():
        RunDir(cfg.run_dir).append_metrics(record)
    log.info("epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f acc %.2f%%  %.0f img/s", pos.epoch + 1,
             cfg.epochs, train_loss, 100 * train_acc, val["loss"], 100 * val["accuracy"], record["images_per_s"])


def final_eval(cfg: TrainConfig, raw: nn.Module, split: Split) -> dict[str, Any]:
    """Evaluate the validation and training splits; eval.json and the manifest's train record: done."""
    run = Path(cfg.run_dir)
    cl = cfg.channels_last
    val = summarize(evaluate(raw, split.val, split.mean, split.std, len(split.classes),
                             cfg.eval_batch_size, cfg.amp, cl), split.classes)
    train_res = evaluate(raw, split.train, split.mean, split.std, len(split.classes), cfg.eval_batch_size, cfg.amp, cl)
    rundir = RunDir(run)
    ckpt = checkpoint.find_checkpoint(rundir.checkpoints) if dist.is_main() else None
    result = {"split": "val", **val, "train_accuracy": train_res["accuracy"], "train_n": train_res["n"],
              "checkpoint": rundir.rel(ckpt) if ckpt else None,
              "checkpoint_sha256": checkpoint.file_sha256(ckpt) if ckpt else None,
              "data": cfg.data, "data_fingerprint": split.fingerprint, "config": config_to_dict(cfg)}
    if dist.is_main():
        rundir.write_eval(result)
        rundir.update("train", status="done", val_accuracy=val["accuracy"], train_accuracy=train_res["accuracy"])
        log.info("done: val accuracy %.2f%%, train accuracy %.2f%%; %s", 100 * val["accuracy"],
                 100 * train_res["accuracy"], run / "eval.json")
    return {"status": "done", "val_accuracy": val["accuracy"], "train_accuracy": train_res["accuracy"],
            "run_dir": str(run), "rank": dist.rank(), "weights_sha256": weights_digest(raw)}


def evaluate_checkpoint(run_dir: str, device: str = "auto") -> dict[str, Any]:
    """eval.json anew from the checkpoint the run holds now (it changed since eval.json was written): the
    validation and training splits, as training evaluates them at its end, with the checkpoint's own
    normalisation (an imported run's is not the data's)."""
    setup_logging()
    run = RunDir(run_dir)
    state = checkpoint.load_checkpoint(run.checkpoints)
    cfg = config_from_dict(TrainConfig, {**state["config"], "run_dir": run_dir, "resume": ""})
    dev = dist.pick_device(device)
    split = dataclasses.replace(prepare_data(cfg, dev), mean=tuple(state["mean"]), std=tuple(state["std"]))
    model = from_checkpoint(state, dev)
    if cfg.channels_last:  # as training evaluates
        model = model.to(memory_format=torch.channels_last)
    return final_eval(cfg, model, split)


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict: equal digests = bit-identical weights (ranks, reruns)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
