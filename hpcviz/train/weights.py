"""Bring your own ResNet: a run directory from a torchvision-layout state dict, with no training.

The run is the one training would have left, made by training's own code: the classes and the
validation split come from --data through `train.prepare_data` (the same seeded split, the same
fingerprint), the checkpoint is `train.checkpoint_state`'s dict standing at the end of its epochs,
config.json's "train" entry has every TrainConfig key (`ImportConfig.train_config`), and eval.json
comes from `train.final_eval`. Every later stage (launch_viz, aggregate, evaluate, inspect, a pipeline
continuing the run) reads it unchanged. Where it differs, it says so: the manifest's train record names
the file and its sha256 (imported_from, imported_sha256), the checkpoint has an "imported" entry, and
the recorded config has recipe 'import' and init = the file.

Loading is strict: every tensor of the file must be one of the architecture's, of its shape, and none
may be missing (num_batches_tracked aside: old state dicts lack it, and it changes no output); fc must
have one output per class of --data. Anything else is refused before a byte is written, naming the
first differences and, where one fits, the --arch/--stem the file is.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import dist
from ..config import ARCHS, STEMS, ConfigError, ImportConfig, TrainConfig
from ..data import memory
from ..data.sources import check_source, check_split, peek
from ..errors import InputError
from ..models import build_model
from ..rundir import RunDir, RunDirError
from . import checkpoint
from .loop import Meters, Position, Split, checkpoint_state, final_eval, make_optimizer, prepare_data, start_run_files

log = logging.getLogger("hpcviz")

_WRAPPERS = ("state_dict", "model")    # {"state_dict": ...} of many training scripts; hpcviz's own checkpoints
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_OPTIONAL = "num_batches_tracked"      # BatchNorm's step counter: absent from old state dicts, unused in eval mode
_SHOWN = 3                             # differences named per kind in an error line


class WeightsError(InputError):
    """A --weights file that is not a state dict of the requested architecture, stem and class count."""


# ----------------------------------------------------------------------------- reading and checking
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (weights_only): plain, or under 'state_dict'/'model', wrapper
    prefixes ('module.', '_orig_mod.') dropped."""
    try:
        obj = checkpoint.torch_load(path)
    except Exception as e:  # torch raises several types for a file that is not a (safe) state dict
        raise WeightsError(f"--weights {path}: not a readable state dict ({type(e).__name__}); hint: save one with "
                           "torch.save(model.state_dict(), FILE) (a pickled model object is refused: weights only)"
                           ) from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, dict) else []
        what = (f"a {type(obj).__name__}" if not isinstance(obj, dict) else "an empty dict" if not obj
                else f"a dict of {', '.join(kinds)}")
        raise WeightsError(f"--weights {path}: holds {what}, not a state dict of tensors; hint: save "
                           "model.state_dict() with torch.save(model.state_dict(), FILE)")
    state = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def expected_shapes(arch: str, num_classes: int, stem: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's state dict and its shape, without allocating one (the meta device)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, stem)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def differences(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What differs between a state dict and a model's tensors, most telling first; [] when it fits."""
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {shape} here" for k, shape in expected.items()
              if k in state and tuple(state[k].shape) != shape]
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    out = shapes[:_SHOWN] + ([f"+{len(shapes) - _SHOWN} more shapes"] if len(shapes) > _SHOWN else [])
    return out + ([f"missing {_few(missing)}"] if missing else []) + (
        [f"unexpected {_few(unexpected)}"] if unexpected else [])


def _outputs(state: Mapping[str, torch.Tensor]) -> int | None:
    fc = state.get("fc.weight")
    return int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None


def guess_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """The (arch, stem) whose tensors the file holds, at its own class count; None when none fits."""
    k = _outputs(state) or 10
    for arch in ARCHS:
        for stem in STEMS:
            if not differences(state, expected_shapes(arch, k, stem)):
                return arch, stem
    return None


def _hint(state: Mapping[str, torch.Tensor], path: str, cfg: TrainConfig, k: int) -> str:
    guess, outputs, stem = guess_arch(state), _outputs(state), cfg.resolved_stem()
    if guess == (cfg.arch, stem):  # only fc differs: another class count
        return (f"its fc has {outputs} outputs but --data {cfg.data} has {k} classes: import it over data with "
                f"those {outputs} classes, or fine-tune it to these: python jobs/launch_train.py --init {path} "
                f"--arch {cfg.arch} --stem {stem} --data {cfg.data} (fc starts fresh)")
    if guess is not None:
        classes = "" if outputs == k else f" (its fc has {outputs} outputs, --data has {k} classes)"
        return f"the file is a {guess[0]} with the {guess[1]} stem: pass --arch {guess[0]} --stem {guess[1]}{classes}"
    return (f"pass a torchvision-layout state dict of one of {', '.join(ARCHS)} (stem {' or '.join(STEMS)}), "
            "saved with torch.save(model.state_dict(), FILE)")


def check_weights(state: Mapping[str, torch.Tensor], path: str, cfg: TrainConfig, classes: Sequence[str]) -> None:
    """Refuse weights that are not those of cfg.arch with its stem and one output per class."""
    found = differences(state, expected_shapes(cfg.arch, len(classes), cfg.resolved_stem()))
    if found:
        raise WeightsError(f"--weights {path}: not a {cfg.arch} ({cfg.resolved_stem()} stem) with {len(classes)} "
                           f"outputs: {'; '.join(found)}; hint: {_hint(state, path, cfg, len(classes))}")


def load_weights(state: Mapping[str, torch.Tensor], cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model with the file's tensors (check_weights passed), in eval mode on the CPU; a BatchNorm counter
    the file lacks keeps its fresh value."""
    model = build_model(cfg.arch, num_classes, cfg.stem)
    counters = {k: v for k, v in model.state_dict().items() if k.endswith(_OPTIONAL)}
    model.load_state_dict({**counters, **state}, strict=True)
    return model.eval()


def refuse_existing(run: RunDir) -> None:
    """An import makes a run; it never overwrites one (nor a file)."""
    if run.path.exists() and not run.path.is_dir():
        raise RunDirError(f"--run {run}: is a file, not a directory; hint: choose another --run")
    if run.is_run():
        held = next(p for p in (run.checkpoints, run.manifest_file, run.config_file) if p.exists())
        raise RunDirError(f"--run {run} already holds a run ({held}); hint: choose a new --run, or remove that one "
                          f"(rm -r {run}) to import into it (nothing was overwritten)")


# ----------------------------------------------------------------------------- the import
@dataclass
class Prepared:
    """An import checked in full and read, nothing written yet."""
    cfg: ImportConfig
    train_cfg: TrainConfig  # what the run records as its "train" config
    model: nn.Module        # the weights, loaded strictly, on the CPU, in eval mode
    split: Split            # --data as training carves and places it, with the normalisation asked for
    device: torch.device
    weights_sha256: str
    existed: bool           # the run directory existed (not as a run) before: a failed write keeps it


def prepare_import(cfg: ImportConfig) -> Prepared:
    """Every check and all the reading (weights, data), in the order that fails fastest; nothing is written."""
    tcfg = cfg.train_config()
    run = RunDir(cfg.run_dir)
    refuse_existing(run)
    check_source(tcfg.data, tcfg.download)
    facts = peek(tcfg.data, tcfg.image_size)
    check_split(tcfg.data, facts, tcfg.val_fraction)
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    memory.check(f"--image-size {tcfg.image_size} with --data {tcfg.data}", memory.import_need(tcfg, facts, on_cpu),
                 memory.host_limit(), "a smaller --image-size or --eval-batch-size, --no-eval, or a machine with more "
                 "memory")
    state = read_state_dict(cfg.weights)
    if facts.classes is not None:  # known without decoding: refuse before the images are read
        check_weights(state, cfg.weights, tcfg, facts.classes)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; hint: --device cpu, or auto")
    device = dist.pick_device(cfg.device)
    split = prepare_data(tcfg, device)
    check_weights(state, cfg.weights, tcfg, split.classes)
    stats = cfg.stats()
    if stats is not None:  # else the training split's statistics, as prepare_data computed them
        split = dataclasses.replace(split, mean=stats[0], std=stats[1])
    model = load_weights(state, tcfg, len(split.classes))
    return Prepared(cfg, tcfg, model, split, device, checkpoint.sha256_file(cfg.weights), run.path.is_dir())


def write_import(p: Prepared) -> dict[str, Any]:
    """Write the run (the caller holds its lock): what training writes as it starts, the checkpoint, then the
    final evaluation unless --no-eval. A failure removes everything this wrote."""
    run = RunDir(p.cfg.run_dir)
    refuse_existing(run)  # again, under the lock: another command may have made it meanwhile
    before = {q.name for q in run.path.iterdir()} if p.existed else set()
    try:
        return _write(p, run)
    except BaseException:
        _undo(run, p.existed, before)
        raise


def _write(p: Prepared, run: RunDir) -> dict[str, Any]:
    cfg, split = p.train_cfg, p.split
    start_run_files(cfg, split, p.device, False, Position())
    # a finished run at the end of its epochs: continuing it (launch_pipeline.py --resume) skips training
    state = {**checkpoint_state(p.model, make_optimizer(p.model, cfg), cfg, split, Position(cfg.epochs, 0), Meters()),
             "imported": {"weights": p.cfg.weights, "sha256": p.weights_sha256, "normalize": p.cfg.normalize}}
    path = checkpoint.save_checkpoint(state, run.checkpoints)
    run.update("train", imported_from=p.cfg.weights, imported_sha256=p.weights_sha256)
    out: dict[str, Any] = {"checkpoint": str(path), "checkpoint_sha256": checkpoint.sha256_file(path)}
    log.info("imported %s into %s (%s, %s stem, %d classes)", p.cfg.weights, run, cfg.arch, cfg.resolved_stem(),
             len(split.classes))
    if not p.cfg.evaluate:
        run.update("train", status="done")
        return out
    model = p.model.to(p.device)
    if cfg.channels_last:  # as training evaluates
        model = model.to(memory_format=torch.channels_last)
    return {**out, **final_eval(cfg, model, split)}


def _undo(run: RunDir, existed: bool, before: set[str]) -> None:
    """Remove what a failed import wrote, so the same command can simply run again (the lock file is the lock's)."""
    try:
        for q in list(run.path.iterdir()):
            if q.name in before or q.name == run.lock_file.name:
                continue
            if q.is_dir():
                shutil.rmtree(q)
            else:
                q.unlink()
        if not existed:
            run.lock_file.unlink(missing_ok=True)
            run.path.rmdir()
    except OSError as e:  # the import's own error is what matters
        log.warning("could not remove the partial import in %s: %s", run, e)
