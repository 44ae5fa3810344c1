"""python jobs/inspect_results.py results/<run> | FILE.h5 [DATASET [--index I] [--png OUT.png]]

What is in a run, an HDF5 file or one dataset, without dumping data:
  results/<run>                  stages and their status, accuracy, visualization shards present/missing
  FILE.h5                        tree: shapes, dtypes, chunks, filters, dimension labels, key attrs
  FILE.h5 DATASET [--index I]    min, max, mean, std, NaN/inf/zero counts of the dataset (or of image I)
  ... --png OUT.png              images, deconv/*, invert/* as RGB images; act/* as a feature-map grid
Bad input (not HDF5, truncated, unknown dataset, index out of range) is one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpcviz import store  # noqa: E402
from hpcviz.inspect import render_stats, render_tree, summarize_run  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("inspect_results", add_help=add_help,
                                description="Inspect a run directory, an HDF5 file or one dataset.")
    p.add_argument("target", help="a run directory (results/<run>) or an .h5 file (shard, viz.h5, packed data)")
    p.add_argument("dataset", nargs="?", default=None, help="dataset path in the file, e.g. act/layer1.0")
    p.add_argument("--index", type=int, default=None, help="one image (row) of DATASET instead of all of it")
    p.add_argument("--png", default=None, help="save DATASET's image (or feature maps) of --index as a PNG")
    p.add_argument("--max-items", type=int, default=64, help="at most this many images / channels in --png")
    return p


def save_png(path: Path, name: str, index: int | None, out: str, max_items: int) -> str:
    """Draw image `index` of `name` (or the first images of an RGB dataset when no index) into `out`."""
    from hpcviz.figures import image_grid
    first = store.read_image(path, name, 0 if index is None else index)
    feature_maps = name.strip("/").startswith("act/")
    if first.ndim != 3 or (not feature_maps and first.shape[0] != 3):
        raise ValueError(f"--png: {name} holds {first.shape} per image; valid: (3, H, W) images (images, "
                         "deconv/*, invert/*) or (C, h, w) maps (act/*); hint: drop --png to see its statistics")
    if index is None and not feature_maps:
        data = store.read_shard(path, [name], slice(0, max_items))[name]  # (n, 3, H, W)
        title = name
    else:
        data, title = first, f"{name}[{0 if index is None else index}]"  # (C, h, w) or (3, H, W)
    fig = image_grid(data, title=title, max_items=max_items, rgb=not feature_maps)
    fig.savefig(out, dpi=120)
    return f"wrote {out}"


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes: wide, no wrapping
    target = Path(args.target)
    try:
        if target.is_dir():
            if args.dataset or args.index is not None or args.png:
                raise ValueError(f"{target} is a run directory; DATASET, --index and --png need an .h5 file; "
                                 f"hint: python jobs/inspect_results.py {target}/viz/viz.h5 act/layer1.0")
            console.print(summarize_run(target))
        elif args.dataset is None:
            if args.index is not None or args.png:
                raise ValueError("--index and --png need a DATASET; hint: run without them to list the datasets")
            console.print(render_tree(store.describe(target)))
        else:
            console.print(render_stats(store.dataset_stats(target, args.dataset, args.index)))
            if args.png:
                print(save_png(target, args.dataset, args.index, args.png, args.max_items))
    except (store.StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args()))
