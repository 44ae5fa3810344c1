"""python jobs/pack_data.py --data DIR --image-size 32 --out data/cifar10-train.h5

Decode an image set once (ImageFolder, CIFAR-10 batches, builtin, or a packed file to repack or resize)
and write it as one packed HDF5 file (hpcviz-packed-v1), so training jobs load it in a second, or stream
its rows, instead of decoding 50,000 JPEGs on every rank. It streams: images are decoded, resized and
written ~64 MB at a time, so a folder of any size packs in bounded memory, with a progress bar (a log
line every ~10 % when not on a terminal). With --skip-bad and skipped files the images written are
copied once more into a right-sized file (needs twice the disk space for a moment). The write is
atomic: an interrupted run never leaves a partial --out.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpcviz.data import DATA_FORMS, DataError, ImageFolderStream, load_images, resize_images  # noqa: E402
from hpcviz.store import PackedReader, PackedWriter, StoreError  # noqa: E402

log = logging.getLogger("hpcviz")
_CHUNK_BYTES = 64 * 2 ** 20  # images in memory at a time (the folder stream bounds itself the same way)


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


class Source(NamedTuple):  # not a dataclass: tests load this script without registering it in sys.modules
    """An image set as a stream of batches: (images (b, 3, H, W) uint8, labels (b,) int64) in order."""
    classes: tuple[str, ...]
    planned: int                                        # images if none is skipped
    batches: Iterator[tuple[np.ndarray, np.ndarray]]
    done: Callable[[], int]                             # progress so far, in units of `planned`


def _in_memory(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> Source:
    """builtin and CIFAR-10 are small (CIFAR-10: 150 MB): decoded whole, then written in chunks."""
    rows, state = max(1, _CHUNK_BYTES // int(np.prod(images.shape[1:]))), {"done": 0}

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, images.shape[0], rows):
            state["done"] = min(images.shape[0], lo + rows)
            yield images[lo:lo + rows], labels[lo:lo + rows]  # (b, 3, H, W), (b,)
    return Source(classes, images.shape[0], batches(), lambda: state["done"])


def _from_folder(spec: str, image_size: int | None, skip_bad: bool) -> Source:
    stream = ImageFolderStream(spec, image_size, skip_bad=skip_bad, batch=1024)
    batches = ((images.numpy(), labels.numpy()) for images, labels in stream)
    return Source(stream.classes, stream.n_files, batches, lambda: stream.files_done)


def _from_packed(spec: str, image_size: int | None) -> Source:
    """A packed file, read (and resized) a chunk at a time: repacks an older chunked file, or resizes one."""
    try:
        reader = PackedReader(spec)
    except StoreError as e:  # the same message load_images gives for this file
        raise DataError(f"--data {e}") from e
    state = {"done": 0}

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with reader:
            for lo, block in reader.iter_chunks(max(1, _CHUNK_BYTES // int(np.prod(reader.shape[1:])))):
                images = block if image_size is None else resize_images(torch.from_numpy(block), image_size)
                images = np.asarray(images)  # (b, 3, S, S)
                state["done"] = lo + block.shape[0]
                yield images, reader.labels[lo:lo + block.shape[0]]  # (b,)
    return Source(tuple(reader.classes), reader.n, batches(), lambda: state["done"])


def open_source(args: argparse.Namespace) -> Source:
    """The --data set as batches; every bad spec raises load_images' one-line DataError."""
    spec, size = args.data, args.image_size
    if size is not None and size < 1:
        load_images(spec, size)  # raises its --image-size error before touching any file
    packed = spec.lower().endswith((".h5", ".hdf5"))  # checked before isdir, as load_images does
    if packed and os.path.isfile(spec):
        return _from_packed(spec, size)
    if not packed and os.path.isdir(spec):
        return _from_folder(spec, size, args.skip_bad)
    ds = load_images(spec, size, download=args.download, skip_bad=args.skip_bad, seed=args.seed)
    return _in_memory(ds.images.numpy(), ds.labels.numpy(), ds.classes)


class Progress:
    """A rich bar on a terminal; elsewhere (SLURM logs, pipes) a log line at every ~10 %."""

    def __init__(self, total: int, title: str) -> None:
        self.total, self.title, self.start, self.next_line = max(1, total), title, time.perf_counter(), 0.1
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            self.bar = RichProgress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=self.total)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif done / self.total >= self.next_line - 1e-9:
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s: %d/%d (%.0f %%), %.0f/s", self.title, done, self.total, 100 * done / self.total, rate)
            self.next_line = (int(10 * done / self.total) + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def pack(src: Source, out: Path, attrs: dict[str, str | int | float]) -> tuple[int, int, int, str]:
    """Write `src` to `out` batch by batch; (n, height, width, fingerprint). Nothing at `out` on failure."""
    writer, progress = None, Progress(src.planned, f"packing {out.name}")
    try:
        for images, labels in src.batches:
            if writer is None:  # an ImageFolder without --image-size: the size is the first image's
                writer = PackedWriter(out, src.planned, images.shape[2], images.shape[3], src.classes, attrs)
            writer.append(images, labels)
            progress.update(src.done())
        if writer is None:
            raise DataError(f"--out {out}: the source gave no images; hint: check --data")
        fingerprint = writer.close()
    except BaseException as e:
        if writer is not None:
            writer.abort(e)
        raise
    finally:
        progress.close()
    return writer.count, writer.height, writer.width, fingerprint


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # show progress and the --skip-bad warning when run as a script
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: --out {out} already exists; pass --force to overwrite it or choose another --out",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    attrs = {"source": args.data, "seed": args.seed,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        src = open_source(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        n, height, width, _fingerprint = pack(src, out, attrs)
    except (DataError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = os.path.getsize(out) / 2 ** 20
    print(f"wrote {out}: {n} images, {len(src.classes)} classes ({', '.join(src.classes)}), "
          f"{height}x{width}, {mb:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args()))
