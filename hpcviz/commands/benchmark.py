"""Benchmarks, each a ratio against a baseline measured in the same run (jobs/benchmark.py lists them): the parser is
derived from each benchmark's options (hpcviz.bench.options), the runners are hpcviz.bench.runners'."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..bench.options import BENCHMARKS
from ..cli import Parser, add_options, command, given
from ..config import config_from_dict, config_to_dict
from ..log import setup_logging


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("benchmark.py", add_help=add_help, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="bench", required=True, parser_class=Parser)
    for name, (options, help_text, required) in BENCHMARKS.items():
        add_options(sub.add_parser(name, help=help_text, description=help_text), options, required=required)
    return p


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    options = BENCHMARKS[args.bench][0]
    cfg: Any = config_from_dict(options, given(args, options))
    from ..bench import runners  # torch: once the options are known to be good
    result = runners.RUNNERS[args.bench](cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": {"bench": args.bench, **config_to_dict(cfg)}, **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
