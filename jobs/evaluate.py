"""Evaluate a run's checkpoint on any data source: `python jobs/evaluate.py --run results/r18 --data DIR --name test`

Writes results/<run>/eval-<name>.json (overall and per-class accuracy, confusion matrix) beside
eval.json. Classes are matched to the model's by name. Runs in this process by default, or as a job
(`--cluster local` or `slurm`). Exit code: 0 done, 1 failed, 2 bad input.
"""
from hpcviz.commands.evaluate import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
