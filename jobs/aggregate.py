"""Collate a run into one report: `python jobs/aggregate.py --run results/r18`

Collates the visualization shards into results/<run>/viz/viz.h5, then writes results/<run>/report/:
figures/*.png, tables/*.csv and *.md, report.md and a self-contained report.html, replacing the previous
report as a whole. Missing shards are named in the report.
Exit code: 0 complete, 1 written with shards missing, 2 bad input.
"""
from hpcviz.commands.aggregate import get_args_parser, main

if __name__ == "__main__":
    raise SystemExit(main(get_args_parser(add_help=True).parse_args()))
