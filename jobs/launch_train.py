"""Train a ResNet with DDP: `python jobs/launch_train.py --gpus 4 --run results/r18 --data data/cifar10-train.h5`

On SLURM (the default where sbatch exists) it submits one task per GPU, prints the job id, the run
directory and how to follow the log, and returns (`--wait` follows it). `--cluster local` runs the same
tasks here in the foreground (`--nproc 2` for two gloo CPU processes); `--cluster debug` runs in this
process. Exit code: 0 done (or submitted), 1 the job failed, 2 bad input (nothing written).
"""
from hpcviz.commands.train import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
