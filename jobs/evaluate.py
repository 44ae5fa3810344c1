"""Evaluate a run's checkpoint on any data source: `python jobs/evaluate.py --run results/r18 --data DIR --name test`

Writes results/<run>/eval-<name>.json (overall and per-class accuracy, confusion
matrix) beside eval.json. Classes are matched to the model's by name. Runs here
(`--cluster local` or `debug`, the default) or as a SLURM job (`--cluster slurm`).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz evaluation", add_help=add_help)
    p.add_argument("--run", required=True, help="run directory holding checkpoints/")
    p.add_argument("--data", required=True, help="builtin | cifar10:DIR | cifar10-test:DIR | DIR | FILE.h5")
    p.add_argument("--name", default="", help="suffix of eval-<name>.json (default: from --data)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--cluster", default="inline", help="inline (in this process, default) | local | slurm")
    p.add_argument("--gpus", type=int, default=None, help="with --cluster slurm|local (default: 1 where there is a GPU)")
    p.add_argument("--profile", default="")
    return p


def default_name(data: str) -> str:
    base = data.rstrip("/").split(":")[-1].split("/")[-1] or data
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(base).stem) or "data"


def main(args: argparse.Namespace) -> int:
    from hpcviz.config import LaunchConfig
    from hpcviz.evaluate import evaluate_run
    from hpcviz.launch import LaunchError, make_executor, precheck_data, wait_result
    from hpcviz.log import setup_logging
    setup_logging()
    name = args.name or default_name(args.data)
    try:
        if not (Path(args.run) / "checkpoints").is_dir():
            raise ValueError(f"--run {args.run}: no checkpoints/ in it; hint: pass a run directory made by "
                             "jobs/launch_train.py")
        precheck_data(args.data)
        if args.cluster == "inline":
            result = evaluate_run(args.run, args.data, name, args.device, args.batch_size)
        else:
            launch = LaunchConfig(cluster=args.cluster, gpus=args.gpus, profile=args.profile)
            ex = make_executor(launch, Path(args.run) / "logs", f"hpcviz-eval-{name}")
            job = ex.submit(evaluate_run, args.run, args.data, name, args.device, args.batch_size)
            result = wait_result(job, launch)
    except (ValueError, LaunchError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(f"{name}: accuracy {100 * result['accuracy']:.2f}% on {result['n']} images -> "
          f"{Path(args.run) / f'eval-{name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
