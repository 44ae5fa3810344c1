"""Train a ResNet with DDP: `python jobs/launch_train.py --gpus 4 --run results/r18 --data data/cifar10.h5`

On SLURM (the default where sbatch exists) it submits one task per GPU, prints the
job id, the run directory and how to follow the log, and returns (`--wait` follows
it). `--cluster local` runs the same tasks here in the foreground (`--nproc 2` for
two gloo CPU processes); `--cluster debug` runs in this process. The exit code of a
foreground run is the job's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcviz.config import AMP_MODES, ARCHS, DEVICES, RECIPES, SCHEDULES, STEMS, LaunchConfig  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz training", add_help=add_help)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="builtin | builtin:N | cifar10:DIR | cifar10-test:DIR | DIR | FILE.h5 (default builtin)")
    g.add_argument("--image-size", type=int, help="px; images are resized to this (default 32)")
    g.add_argument("--val-fraction", type=float, help="share carved out for validation (default 0.1)")
    g.add_argument("--split-seed", type=int, help="seed of the train/val split (default 0)")
    g.add_argument("--skip-bad", action="store_true", default=None, help="skip unreadable images (warn with a count)")
    g.add_argument("--download", action="store_true", default=None, help="cifar10: download when missing")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no crop/flip")
    g.add_argument("--data-placement", help="auto | device | host | stream: the whole set on each device, one "
                   "copy per node in shared memory, or read from the packed file as it trains (default auto: by size)")
    g.add_argument("--data-workers", type=int, help="threads gathering batches ahead for host/stream (default 2)")
    g = p.add_argument_group("model")
    # no argparse `choices`: the config's own check gives a one-line error listing them
    g.add_argument("--arch", help=f"{' | '.join(ARCHS)} (default resnet18)")
    g.add_argument("--stem", help=f"{' | '.join(STEMS)} (default: imagenet for resnet18/34/50, cifar for 20/32/56)")
    g.add_argument("--init", help="torchvision-format state dict to start from (e.g. pretrained weights)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", default="default",
                   help=f"{' | '.join(RECIPES)}: named defaults; 'seed' = the course report (lr 0.0005, batch 256, 900 epochs, no schedule)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global images per step, split over the processes (default 256)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 0.2)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=None)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--schedule", help=" | ".join(SCHEDULES))
    g.add_argument("--warmup-epochs", type=float)
    g = p.add_argument_group("execution")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help=" | ".join(DEVICES))
    g.add_argument("--amp", help=f"{' | '.join(AMP_MODES)}; auto = bf16 autocast on GPUs that have bf16")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--log-every", type=int, help="steps between progress lines in logs")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints inside an epoch (0 = epoch ends)")
    g.add_argument("--dist-timeout", dest="dist_timeout_min", type=float,
                   help="minutes the rendezvous and the first collective may take (ranks loading data; default 30)")
    g.add_argument("--collective-timeout", dest="collective_timeout_min", type=float,
                   help="minutes any later collective may take before the job aborts (default 10)")
    g.add_argument("--run", help="run directory (default results/<arch>-<data>)")
    g.add_argument("--resume", nargs="?", const="auto",
                   help="continue the run's last checkpoint (or the checkpoint PATH given)")
    add_launch_args(p)
    return p


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch")
    g.add_argument("--cluster", default="auto",
                   help="auto | slurm | local | debug | inline (auto = slurm where sbatch exists; inline = be one "
                        "rank of srun/torchrun, as in slurm/train.sbatch)")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs per node, one task each; 0 = CPU (default: 1 where there is a GPU: this machine's for "
                        "local/debug, a GPU profile's nodes on SLURM; else 0)")
    g.add_argument("--nproc", type=int, default=1, help="CPU processes per node when --gpus 0 (gloo)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--cpus-per-task", type=int, default=0)
    g.add_argument("--mem-gb", type=int, default=0)
    g.add_argument("--time", dest="time_min", type=int, default=0, help="minutes")
    g.add_argument("--partition", default="")
    g.add_argument("--account", default="")
    g.add_argument("--qos", default="")
    g.add_argument("--constraint", default="")
    g.add_argument("--profile", default="", help="slurm/profiles/NAME.ini or a path (default: default)")
    g.add_argument("--wait", action="store_true", help="on SLURM: follow the job until it ends")


TRAIN_KEYS = ("data", "image_size", "val_fraction", "split_seed", "skip_bad", "download", "augment", "arch", "stem", "init",
              "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing", "schedule",
              "warmup_epochs", "seed", "device", "amp", "channels_last", "compile", "eval_batch_size", "log_every",
              "checkpoint_every", "resume", "data_placement", "data_workers", "dist_timeout_min",
              "collective_timeout_min")


def build_configs(args: argparse.Namespace):
    from hpcviz.config import make_train_config
    overrides = {k: getattr(args, k) for k in TRAIN_KEYS}
    cfg = make_train_config(overrides, args.recipe)
    cfg.run_dir = args.run or f"results/{cfg.arch}-{cfg.data.split(':')[0].replace('/', '_').strip('._') or 'data'}"
    launch = LaunchConfig(cluster=args.cluster, gpus=args.gpus, nproc=args.nproc, nodes=args.nodes,
                          cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min,
                          partition=args.partition, account=args.account, qos=args.qos,
                          constraint=args.constraint, profile=args.profile, wait=args.wait)
    if args.gpus and cfg.device == "cpu":
        raise SystemExit("error: --gpus with --device cpu; hint: drop one of them")
    from hpcviz.launch import resolve_gpus
    launch.gpus = resolve_gpus(launch, cfg.device)
    return cfg, launch


def main(args: argparse.Namespace) -> int:
    from hpcviz import checkpoint
    from hpcviz.launch import (TrainJob, LaunchError, detect_cluster, precheck_data, prepare_run, submit_train,
                               wait_result)
    from hpcviz.log import setup_logging
    setup_logging()
    try:
        cfg, launch = build_configs(args)
        launch.cluster = detect_cluster(launch.cluster)
        precheck_data(cfg.data, cfg.download)
        if launch.cluster == "inline":  # one rank of srun/torchrun: train here, exit 3 if stopped on a signal
            result = TrainJob(requeue_via_submitit=False)(cfg)
            if result.get("rank", 0) == 0:
                print(f"done: {cfg.run_dir} (val accuracy {100 * result['val_accuracy']:.2f}%)")
            return 0
        prepare_run(cfg, launch.cluster)
        checkpoint.update_manifest(cfg.run_dir, "train", status="submitted", cluster=launch.cluster)
        job = submit_train(cfg, launch)
        checkpoint.update_manifest(cfg.run_dir, "train", job_id=str(job.job_id))
        if launch.cluster == "slurm" and not launch.wait:
            print(f"submitted job {job.job_id}\n  run dir: {cfg.run_dir}\n"
                  f"  follow:  tail -f {Path(job.paths.folder) / f'{job.job_id}_0_log.err'}"
                  f"\n  or:      squeue -j {job.job_id}")
            return 0
        result = wait_result(job, launch, follow=launch.wait)
        print(f"{result.get('status', 'done')}: {cfg.run_dir} "
              f"(val accuracy {100 * result.get('val_accuracy', float('nan')):.2f}%)")
        return 0
    except (ValueError, LaunchError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
