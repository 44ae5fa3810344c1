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


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz visualization array", add_help=add_help)
    p.add_argument("--run", required=True, help="a trained run directory (holds checkpoints/)")
    p.add_argument("--split", default="val", help="val | train (default val)")
    p.add_argument("--images", type=int, default=200, help="class-balanced sample size (default 200)")
    p.add_argument("--indices", default="", help="explicit comma-separated positions in the split (overrides --images)")
    p.add_argument("--tasks", type=int, default=0, help="array tasks = shards (default: from --per-task)")
    p.add_argument("--per-task", type=int, default=100, help="images per task when --tasks is not given")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--blocks", default="", help="comma-separated block names (default: every block)")
    p.add_argument("--deconv-blocks", default="all",
                   help="blocks to reconstruct with the deconvnet: all (default) | none | comma-separated names")
    p.add_argument("--paths", default="both,residual,shortcut",
                   help="deconvnet paths at residual blocks (default all three)")
    p.add_argument("--invert-blocks", default="default",
                   help="blocks to invert: default (conv1 + each stage's last block) | all | none | names")
    p.add_argument("--invert-steps", type=int, default=0, help="optimisation steps per inversion (0 = default)")
    p.add_argument("--prior", default="tv", help="tv (Mahendran & Vedaldi) | none (plain sum of squared errors)")
    p.add_argument("--compression", default="", choices=("", "gzip", "lzf"), help="HDF5 filter (default none)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    p.add_argument("--throttle", type=int, default=0, help="at most this many array tasks at once (SLURM)")
    p.add_argument("--fresh", action="store_true", help="discard shards of an earlier, different request")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch_train import add_launch_args  # the same SLURM flags as training
    add_launch_args(p)
    return p


def build_configs(args: argparse.Namespace):
    from hpcviz.config import LaunchConfig
    from hpcviz.viz import VizConfig
    indices = [int(i) for i in args.indices.split(",") if i.strip()] if args.indices else []
    n = len(indices) or args.images
    tasks = args.tasks or max(1, -(-n // max(1, args.per_task)))
    cfg = VizConfig(run_dir=args.run, split=args.split, images=args.images, indices=indices, tasks=tasks,
                    batch_size=args.batch_size, blocks=[b for b in args.blocks.split(",") if b],
                    compression=args.compression, device=args.device, seed=args.seed,
                    deconv_blocks=[] if args.deconv_blocks == "none" else [b for b in args.deconv_blocks.split(",") if b],
                    paths=[p for p in args.paths.split(",") if p],
                    invert_blocks=[] if args.invert_blocks == "none" else [b for b in args.invert_blocks.split(",") if b],
                    invert_steps=args.invert_steps, prior=args.prior)
    launch = LaunchConfig(cluster=args.cluster, gpus=args.gpus, nproc=1, nodes=1, cpus_per_task=args.cpus_per_task,
                          mem_gb=args.mem_gb, time_min=args.time_min, partition=args.partition,
                          account=args.account, qos=args.qos, constraint=args.constraint, profile=args.profile,
                          wait=args.wait)
    return cfg, launch


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
