"""What is in a run, an HDF5 file or one dataset (jobs/inspect_results.py), without dumping data."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import store
from ..cli import Parser, command
from ..errors import InputError
from ..report.inspection import (
    channel_examples,
    projection_problem,
    render_channel,
    render_stats,
    render_tree,
    run_of,
    summarize_run,
)


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


def save_channel_png(ex: dict, out: str) -> str:
    """The channel's patches and projections, one row, as a PNG."""
    import io

    import numpy as np

    from ..files import write_bytes
    from ..report.figures import examples_grid
    if "patch" not in ex:
        why = ex["not_projected"]
        raise InputError(f"--png: no projections of {ex['block']} channel {ex['channel']} to draw: {why}"
                         + ("" if "hint:" in why else "; hint: python jobs/aggregate.py --run RUN, then again"))
    fig = examples_grid(ex["patch"][None], ex["deconv"][None], np.array([ex["channel"]]),
                        np.array([ex["selectivity"]]), np.array([ex["selective_class"]]), ex["classes"], ex["block"])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(out, buf.getvalue())
    return f"wrote {out}"


def save_png(path: Path, name: str, index: int | None, out: str, max_items: int) -> str:
    """Draw image `index` of `name` (or the first images of an RGB dataset when no index) into `out`."""
    import io

    from ..files import write_bytes
    from ..report.figures import image_grid
    first = store.read_image(path, name, 0 if index is None else index)
    feature_maps = name.strip("/").startswith("act/")
    if first.ndim != 3 or (not feature_maps and first.shape[0] != 3):
        raise InputError(f"--png: {name} holds {first.shape} per image; valid: (3, H, W) images (images, "
                         "deconv/*, invert/*) or (C, h, w) maps (act/*); hint: drop --png to see its statistics")
    if index is None and not feature_maps:
        data = store.read_shard(path, [name], slice(0, max_items))[name]  # (n, 3, H, W)
        title = name
    else:
        data, title = first, f"{name}[{0 if index is None else index}]"  # (C, h, w) or (3, H, W)
    buf = io.BytesIO()
    image_grid(data, title=title, max_items=max_items, rgb=not feature_maps).savefig(buf, format="png", dpi=120)
    write_bytes(out, buf.getvalue())
    return f"wrote {out}"


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
        from ..files import folder_problem
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


def _check_examples(target: Path, dataset: str, index: int | None) -> None:
    """A run's viz.h5 presents its projection parts: refuse to read one that is not this run's (as for --block)."""
    parts = dataset.strip("/").split("/")
    run = run_of(target)
    if run is None or parts[0] != "examples" or len(parts) < 3:
        return
    why = projection_problem(run, parts[1], None if parts[2] == "grid" else index, presented=True)
    if why:
        raise InputError(f"{dataset}: {why}")


@command
def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes: wide, no wrapping
    target = Path(args.target)
    _check(args, target)
    if args.block is not None:
        path = target / "viz" / "viz.h5" if target.is_dir() else target
        ex = channel_examples(path, args.block, args.channel, run_of(path))
        png = save_channel_png(ex, args.png) if args.png else ""  # refused before anything is printed
        console.print(render_channel(ex))
        if png:
            print(png)
    elif target.is_dir():
        console.print(summarize_run(target))
    elif args.dataset is None:
        console.print(render_tree(store.describe(target)))
    else:
        _check_examples(target, args.dataset, args.index)
        console.print(render_stats(store.dataset_stats(target, args.dataset, args.index)))
        if args.png:
            print(save_png(target, args.dataset, args.index, args.png, args.max_items))
    return 0
