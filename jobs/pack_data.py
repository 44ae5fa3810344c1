"""python jobs/pack_data.py --data DIR --image-size 32 --out data/cifar10-train.h5

Decode an image set once (ImageFolder, CIFAR-10 batches or builtin) and write it as one packed
HDF5 file (hpcviz-packed-v1), so training jobs load it in a second instead of decoding 50,000
JPEGs on every rank. The write is atomic: an interrupted run never leaves a partial --out.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpcviz.data import DATA_FORMS, DataError, fingerprint, load_images  # noqa: E402
from hpcviz.store import StoreError, write_packed  # noqa: E402


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("pack_data", add_help=add_help,
                                     description="Pack an image set into one HDF5 file.")
    parser.add_argument("--data", required=True, help=f"image set to pack: {DATA_FORMS}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize to S x S (default: keep; builtin: 32)")
    parser.add_argument("--out", required=True, help="output .h5 file")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (with a warning)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if missing (cifar10:DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the builtin set")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return parser


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # show the --skip-bad warning when run as a script
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: --out {out} already exists; pass --force to overwrite it or choose another --out",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        ds = load_images(args.data, args.image_size, download=args.download, skip_bad=args.skip_bad,
                         seed=args.seed)
        attrs = {"source": ds.source, "fingerprint": fingerprint(ds), "seed": args.seed,
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_packed(out, ds.images.numpy(), ds.labels.numpy(), ds.classes, attrs)
    except (DataError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n, _, height, width = ds.images.shape  # (N, 3, H, W)
    mb = os.path.getsize(out) / 2 ** 20
    print(f"wrote {out}: {n} images, {len(ds.classes)} classes ({', '.join(ds.classes)}), "
          f"{height}x{width}, {mb:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args()))
