"""Bring your own ResNet (jobs/import_model.py): a run directory from a torchvision-layout state dict, no training."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..cli import Parser, add_options, command, given
from ..config import ImportConfig, config_from_dict
from ..log import setup_logging
from ..report.render import terminal_text  # class names from --data: shown as written, never as terminal codes
from ..rundir import RunDir

if TYPE_CHECKING:  # torch: imported by main once the options are known to be good
    from ..train.weights import Prepared

_CLASSES_SHOWN = 8


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("import_model.py", add_help=add_help,
               description="Make a run directory from a torchvision-layout state dict, without training.")
    add_options(p, ImportConfig, title="import", required=("weights", "arch", "data", "run_dir"))
    return p


def summary(cfg: ImportConfig, prepared: Prepared, result: dict[str, Any]) -> str:
    """What was written, and the next command."""
    run, tcfg, split = RunDir(cfg.run_dir), prepared.train_cfg, prepared.split
    classes = terminal_text(", ".join(split.classes[:_CLASSES_SHOWN])) + (
        ", ..." if len(split.classes) > _CLASSES_SHOWN else "")
    stats = "  ".join(f"{name} {','.join(f'{v:.4g}' for v in values)}"
                      for name, values in (("mean", split.mean), ("std", split.std)))
    if "val_accuracy" in result:
        acc = (f"val {100 * result['val_accuracy']:.2f}% on {split.val.n} images, train "
               f"{100 * result['train_accuracy']:.2f}% on {split.train.n} -> {run.eval_file()}")
    else:
        acc = f"not evaluated (--no-eval): {run.eval_file()} is not written"
    return (f"imported {cfg.weights} -> {run} (no training)\n"
            f"  model:      {tcfg.arch}, {tcfg.resolved_stem()} stem, {len(split.classes)} classes: {classes}\n"
            f"  weights:    {cfg.weights} (sha256 {prepared.weights_sha256})\n"
            f"  checkpoint: {result['checkpoint']} (sha256 {result['checkpoint_sha256']})\n"
            f"  normalise:  {cfg.normalize}: {stats}\n"
            f"  accuracy:   {acc}\n"
            f"  next:       python jobs/launch_viz.py --run {run} --images 200 --tasks 2")


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = config_from_dict(ImportConfig, given(args, ImportConfig)).validate()
    run = RunDir(cfg.run_dir)
    from ..train import weights  # torch: once the options are known to be good
    prepared = weights.prepare_import(cfg)  # every check, and the reading: nothing is written before the lock is held
    with run.lock():
        result = weights.write_import(prepared)
    print(summary(cfg, prepared, result))
    return 0
