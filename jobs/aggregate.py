"""Collate a run into one report: `python jobs/aggregate.py --run results/r18`

Collates the visualization shards into results/<run>/viz/viz.h5, then writes results/<run>/report/:
figures/*.png (training curves, per-class accuracy, confusion matrix, conv1 filters, feature maps,
deconvnet panels, inversions), tables/*.csv and *.md (accuracy, per-class accuracy, per-block
inversion error, training parameters), report.md and a self-contained report.html. Missing shards
are named in the report. It runs in this process (it is light); jobs/launch_pipeline.py submits it
as the last SLURM job of the pipeline. Exit code: 0 complete, 1 written with shards missing, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def add_report_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--report-images", type=int, default=3, help="images in the feature-map and deconvnet figures")
    g.add_argument("--invert-images", type=int, default=4, help="images in the inversion figure")
    g.add_argument("--channels", type=int, default=8, help="strongest channels per block in the feature maps")
    g.add_argument("--no-embed", dest="embed", action="store_false",
                   help="report.html links report/figures/*.png instead of embedding them")


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz aggregation", add_help=add_help)
    p.add_argument("--run", required=True, help="the run directory (results/<run>)")
    add_report_args(p)
    return p


def build_config(args: argparse.Namespace, run: str):
    from hpcviz.aggregate import AggregateConfig
    for flag, value in (("--report-images", args.report_images), ("--channels", args.channels),
                        ("--invert-images", args.invert_images)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1; hint: drop it for the default")
    return AggregateConfig(run_dir=run, images=args.report_images, invert_images=args.invert_images,
                           channels=args.channels, embed=args.embed)


def main(args: argparse.Namespace) -> int:
    from hpcviz.aggregate import aggregate
    from hpcviz.log import setup_logging
    setup_logging()
    try:
        summary = aggregate(build_config(args, args.run))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    missing = summary["missing_shards"]
    print(f"report: {summary['report']} ({len(summary['figures'])} figures, {summary['n_images']} images)"
          + (f"; missing shards: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
