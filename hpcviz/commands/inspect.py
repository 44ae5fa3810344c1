"""What is in a run, an HDF5 file or one dataset (jobs/inspect_results.py), without dumping data."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from .. import store
from ..cli import Parser, command
from ..errors import InputError
from ..files import folder_problem, write_bytes


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("inspect_results.py", add_help=add_help,
               description="Inspect a run directory, an HDF5 file or one dataset.")
    p.add_argument("target", help="a run directory (results/<run>) or an .h5 file (shard, viz.h5, packed data)")
    p.add_argument("dataset", nargs="?", default=None, help="dataset path in the file, e.g. act/layer1.0")
    p.add_argument("--index", type=int, default=None, help="one image (row) of DATASET instead of all of it")
    p.add_argument("--png", default=None, help="save DATASET's image (or feature maps) of --index as a PNG")
    p.add_argument("--max-items", type=int, default=64, help="at most this many images / channels in --png")
    p.add_argument("--block", default=None, help="with --channel: that channel's dataset examples (its top-k "
                   "images: activation, image, class, position); --png draws its patches and projections")
    p.add_argument("--channel", type=int, default=None, help="a channel of --block")
    return p


def _check(args: argparse.Namespace, target: Path) -> None:
    if (args.block is None) != (args.channel is None):
        raise InputError("--block and --channel go together; hint: e.g. --block layer4.1 --channel 17")
    if args.max_items < 1:
        raise InputError(f"--max-items {args.max_items}: must be at least 1; hint: drop it for the default (64)")
    if args.block is not None:
        if args.dataset or args.index is not None:
            raise InputError("--block/--channel take no DATASET or --index; hint: drop them")
        _check_png(args)
        return
    if target.is_dir() and (args.dataset or args.index is not None or args.png):
        raise InputError(f"{target} is a run directory; DATASET, --index and --png need an .h5 file; "
                         f"hint: python jobs/inspect_results.py {target}/viz/viz.h5 act/layer1.0")
    if args.dataset is None and (args.index is not None or args.png):
        raise InputError("--index and --png need a DATASET; hint: run without them to list the datasets")
    _check_png(args)


def _check_png(args: argparse.Namespace) -> None:
    if args.png:
        folder = Path(args.png).absolute().parent
        problem = folder_problem(folder)
        if problem:
            raise InputError(f"--png {args.png}: the folder {folder} {problem}; hint: "
                             + ("create it first (mkdir -p), or " if problem == "does not exist" else "")
                             + "write the PNG elsewhere")
        if Path(args.png).is_dir():
            raise InputError(f"--png {args.png}: is a directory; hint: name a file, e.g. --png maps.png")
        if not args.png.lower().endswith(".png"):
            raise InputError(f"--png {args.png}: must end in .png; hint: e.g. --png maps.png")


@command
def main(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes: wide, no wrapping
    target = Path(args.target)
    _check(args, target)
    from ..report import inspection  # torch and matplotlib: once the request is known to be good
    if args.block is not None:
        path = target / "viz" / "viz.h5" if target.is_dir() else target
        ex = inspection.channel_examples(path, args.block, args.channel, inspection.run_of(path))
        png = inspection.channel_png(ex) if args.png else b""  # refused before anything is printed
        console.print(inspection.render_channel(ex))
        if png:
            write_bytes(args.png, png)
            print(f"wrote {args.png}")
    elif target.is_dir():
        console.print(inspection.summarize_run(target))
    elif args.dataset is None:
        console.print(inspection.render_tree(store.describe(target)))
    else:
        inspection.check_examples(target, args.dataset, args.index)
        console.print(inspection.render_stats(store.dataset_stats(target, args.dataset, args.index)))
        if args.png:
            write_bytes(args.png, inspection.dataset_png(target, args.dataset, args.index, args.max_items))
            print(f"wrote {args.png}")
    return 0
