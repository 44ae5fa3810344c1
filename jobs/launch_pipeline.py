"""Train, visualize and report in one command: `python jobs/launch_pipeline.py --gpus 4 --run results/r18 --data data/cifar10-train.h5`

On SLURM it submits three jobs at once and returns: training; the visualization array with `afterok`
on training; the aggregation with `afterany` on the array, so it reports whatever failed
(results/<run>/report/report.html). `--wait` follows the stages in a live table; `--status` shows them
once; `--retry-failed` resubmits only the missing or failed array tasks and aggregates again.
`--cluster local` (or debug) runs the same stages here, in order. Takes every option of
jobs/launch_train.py, jobs/launch_viz.py (those both have are --viz-split, --viz-batch-size,
--viz-device, --viz-seed here) and jobs/aggregate.py.
Exit code: 0 done (or submitted), 1 a stage failed or shards are missing, 2 bad input, 130 interrupted.
"""
from hpcviz.commands.pipeline import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
