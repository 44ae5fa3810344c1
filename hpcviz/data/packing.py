"""Packing an image set into one HDF5 file (hpcviz-packed-v1), streamed: images are decoded, resized and
written ~64 MB at a time, so a folder of any size packs in bounded memory. The command is
jobs/pack_data.py (hpcviz.commands.pack); the file is written by hpcviz.store.PackedWriter, atomically,
after checking that it fits on its file system.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..config import PackConfig
from ..store import PackedReader, PackedWriter, StoreError
from . import memory
from .sources import DataError, ImageFolderStream, check_source, load_images, peek
from .transforms import resize_images

log = logging.getLogger("hpcviz")
_CHUNK_BYTES = 64 * 2 ** 20  # images in memory at a time (the folder stream bounds itself the same way)


class Source(NamedTuple):
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


def open_source(cfg: PackConfig) -> Source:
    """The --data set as batches; every bad spec raises load_images' one-line DataError."""
    spec, size = cfg.data, cfg.image_size
    if size is not None and size < 1:
        load_images(spec, size)  # raises its --image-size error before touching any file
    packed = spec.lower().endswith((".h5", ".hdf5"))  # checked before isdir, as load_images does
    if packed and os.path.isfile(spec):
        return _from_packed(spec, size)
    if not packed and os.path.isdir(spec):
        return _from_folder(spec, size, cfg.skip_bad)
    ds = load_images(spec, size, download=cfg.download, skip_bad=cfg.skip_bad, seed=cfg.seed)
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


def check_request(cfg: PackConfig) -> None:
    """Before anything is read whole: --data, and what packing holds at --image-size (builtin and CIFAR-10 whole;
    one image of a folder or packed file); without --image-size the images keep their size and nothing grows."""
    if cfg.image_size is None:
        return
    check_source(cfg.data, cfg.download)
    facts = peek(cfg.data, cfg.image_size or 32)
    memory.check(f"--image-size {cfg.image_size} with --data {cfg.data}", memory.pack_need(cfg.data, facts,
                 cfg.image_size), memory.host_limit(), "a smaller --image-size")
