"""Visualize a trained run with an array job: `python jobs/launch_viz.py --run results/r18 --images 1000 --tasks 8`

Each array task handles one shard of images: it loads the run's checkpoint, runs its images forward
once in batches (activations of every block, deconvnet reconstructions, inversions) and writes
results/<run>/viz/shards/shard-NNNNN.h5. When all tasks are done (at once with --cluster local|debug, or
with --wait on SLURM) the shards are collated into results/<run>/viz/viz.h5, one virtual view over all
of them. Rerunning redoes only the shards that are missing or not the plan's.
Exit code: 0 done (or submitted), 1 tasks failed or shards are missing, 2 bad input (nothing written).
"""
from hpcviz.commands.viz import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
