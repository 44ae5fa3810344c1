"""Dump every block's activations into HDF5 shards with an array job: `python jobs/launch_viz.py --run results/r18 --images 1000 --tasks 8`

Each array task handles one shard of images: it loads the run's checkpoint, runs its images
forward once in batches and writes results/<run>/viz/shards/shard-NNNNN.h5. When all tasks are
done (at once with --cluster local|debug, or with --wait on SLURM) the shards are collated into
results/<run>/viz/viz.h5, one virtual view over all of them. Rerunning redoes only the shards that
are missing or do not verify.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# options whose names training uses too: jobs/launch_pipeline.py composes both parsers and gives
# these a "viz-" prefix (--viz-batch-size, ...)
SHARED_NAMES = ("split", "batch-size", "device", "seed")


def add_viz_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The visualization options; `prefix` is put before SHARED_NAMES (option and dest)."""
    def opt(name: str) -> str:
        return f"--{prefix}{name}" if name in SHARED_NAMES else f"--{name}"
    g = p.add_argument_group("visualization")
    g.add_argument(opt("split"), default="val", help="val | train (default val)")
    g.add_argument("--images", type=int, default=200, help="class-balanced sample size (default 200)")
    g.add_argument("--indices", default="", help="explicit comma-separated positions in the split (overrides --images)")
    g.add_argument("--tasks", type=int, default=0, help="array tasks = shards (default: from --per-task)")
    g.add_argument("--per-task", type=int, default=100, help="images per task when --tasks is not given")
    g.add_argument(opt("batch-size"), type=int, default=64, help="images per forward pass")
    g.add_argument("--blocks", default="", help="comma-separated block names (default: every block)")
    g.add_argument("--deconv-blocks", default="all",
                   help="blocks to reconstruct with the deconvnet: all (default) | none | comma-separated names")
    g.add_argument("--paths", default="both,residual,shortcut",
                   help="deconvnet paths at residual blocks (default all three)")
    g.add_argument("--invert-blocks", default="default",
                   help="blocks to invert: default (conv1 + each stage's last block) | all | none | names")
    g.add_argument("--invert-steps", type=int, default=0, help="optimisation steps per inversion (0 = default)")
    g.add_argument("--prior", default="tv", help="tv (Mahendran & Vedaldi) | none (plain sum of squared errors)")
    g.add_argument("--compression", default="", choices=("", "gzip", "lzf"), help="HDF5 filter (default none)")
    g.add_argument(opt("device"), default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument(opt("seed"), type=int, default=0, help="seed of the image sample")
    g.add_argument("--fast", action="store_true",
                   help="GPUs: TF32 convolutions and atomic unpooling (faster; ~1e-3 off the exact default)")
    g.add_argument("--throttle", type=int, default=0, help="at most this many array tasks at once (SLURM)")


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz visualization array", add_help=add_help)
    p.add_argument("--run", required=True, help="a trained run directory (holds checkpoints/)")
    add_viz_args(p)
    p.add_argument("--fresh", action="store_true", help="discard shards of an earlier, different request")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch_train import add_launch_args  # the same SLURM flags as training
    add_launch_args(p)
    return p


def build_viz_config(args: argparse.Namespace, run: str, prefix: str = ""):
    from hpcviz.viz import VizConfig

    def get(name: str):
        return getattr(args, (prefix + name if name in SHARED_NAMES else name).replace("-", "_"))

    def names(spec: str) -> list[str]:
        return [] if spec == "none" else [b for b in spec.split(",") if b]
    try:
        indices = [int(i) for i in args.indices.split(",") if i.strip()] if args.indices else []
    except ValueError:
        raise ValueError(f"--indices {args.indices!r}: not comma-separated integers; hint: --indices 3,17,42") from None
    n = len(indices) or args.images
    tasks = args.tasks or max(1, -(-n // max(1, args.per_task)))
    return VizConfig(run_dir=run, split=get("split"), images=args.images, indices=indices, tasks=tasks,
                     batch_size=get("batch-size"), blocks=names(args.blocks), compression=args.compression,
                     device=get("device"), seed=get("seed"), deconv_blocks=names(args.deconv_blocks),
                     paths=names(args.paths), invert_blocks=names(args.invert_blocks),
                     invert_steps=args.invert_steps, prior=args.prior, fast=args.fast)


def build_configs(args: argparse.Namespace):
    from hpcviz.config import LaunchConfig
    launch = LaunchConfig(cluster=args.cluster, gpus=args.gpus, nproc=1, nodes=1, cpus_per_task=args.cpus_per_task,
                          mem_gb=args.mem_gb, time_min=args.time_min, partition=args.partition,
                          account=args.account, qos=args.qos, constraint=args.constraint, profile=args.profile,
                          wait=args.wait)
    return build_viz_config(args, args.run), launch


def main(args: argparse.Namespace) -> int:
    from hpcviz.launch import LaunchError, launch_viz
    from hpcviz.log import setup_logging
    setup_logging()
    try:
        cfg, launch = build_configs(args)
        return launch_viz(cfg, launch, throttle=args.throttle, fresh=args.fresh)
    except (ValueError, LaunchError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
