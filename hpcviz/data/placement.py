"""Where a training job keeps its images: on the device, once per node in shared host memory, or
streamed from the packed file; every placement yields the same uint8 batches.

- device: the whole source (train and val, uint8) on each rank's device; a batch is one gather there.
- host:   one copy per node in shared memory (/dev/shm, else a node-local file, mapped by every local
          rank; never one copy per rank); batches are gathered into pinned buffers by background threads
          and copied with non_blocking.
- stream: nothing but the labels in memory; background threads read each batch's rows from the packed
          HDF5 file (`store.PackedReader`, plain preads), a few batches ahead: memory is bounded by
          `depth` batches whatever the file's size.
- auto:   device if the source fits in 40% of the device's free memory, else host if it fits in half of
          the node's available memory, else stream (packed files), logged with the figures.

Batches are asked for by position lists that the training loop draws from (seed, epoch, step, rank),
so every placement feeds the same images in the same order and a run ends bit-identical (on CPU)
whichever one it used. Sources that are not packed files are decoded once per node (by local rank 0)
and shared through the same mapped file; a packed file at the run's image size is never loaded whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..config import PLACEMENTS, TrainConfig
from ..errors import InputError
from ..store import PackedReader, StoreError, fingerprint_blocks
from .sources import DataError, fingerprint, load_images
from .transforms import stats_from_sums

log = logging.getLogger("hpcviz")

_CHUNK_BYTES = 64 * 2 ** 20  # sequential passes (copies, statistics, hashes) read this much at a time


class PlacementError(InputError):
    """A --data-placement that cannot hold this data set here."""


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """The images of a --data spec: held in memory (`images`, maybe a mapping shared by the node's ranks),
    or readable by rows from a packed file (`reader`) without loading it."""
    spec: str
    labels: torch.Tensor                 # (N,) int64, CPU
    classes: tuple[str, ...]
    shape: tuple[int, int, int]          # (3, H, W)
    images: torch.Tensor | None = None   # (N, 3, H, W) uint8, CPU
    reader: Any = None                   # store.PackedReader
    fingerprint: str = ""                # data.fingerprint's value ("" = not known yet)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return self.n * int(np.prod(self.shape))

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, images (b, 3, H, W) uint8) over the whole source, in order, ~64 MB at a time."""
        rows = max(1, _CHUNK_BYTES // int(np.prod(self.shape)))
        if self.images is not None:
            for lo in range(0, self.n, rows):
                yield lo, self.images[lo:lo + rows]
        else:
            for lo, block in self.reader.iter_chunks(rows):
                yield lo, torch.from_numpy(block)


def _packed_at_size(cfg: TrainConfig) -> Any:
    """A PackedReader when --data is a packed file already at --image-size (no resize needed), else None."""
    if not cfg.data.lower().endswith((".h5", ".hdf5")) or not os.path.isfile(cfg.data):
        return None
    try:
        reader = PackedReader(cfg.data)
    except StoreError as e:
        raise DataError(f"--data {e}") from e
    if tuple(reader.shape[2:]) != (cfg.image_size, cfg.image_size):
        reader.close()
        return None
    return reader


def _loaded(cfg: TrainConfig, download: bool) -> Source:
    ds = load_images(cfg.data, cfg.image_size, download=download, skip_bad=cfg.skip_bad)
    _, c, h, w = ds.images.shape  # (N, 3, H, W)
    return Source(cfg.data, ds.labels, ds.classes, (int(c), int(h), int(w)), images=ds.images,
                  fingerprint=fingerprint(ds))


def open_source(cfg: TrainConfig, placement: str = "auto") -> Source:
    """Every rank's view of --data. A packed file at the run's size is opened for row reads; any other
    source is decoded once per node and shared (one copy per node); with --download, rank 0 downloads
    before anyone else reads. Every rank must call it (it has barriers)."""
    reader = _packed_at_size(cfg)
    if reader is not None:
        labels = torch.from_numpy(np.asarray(reader.labels, dtype=np.int64))
        return Source(cfg.data, labels, tuple(reader.classes), tuple(reader.shape[1:]), reader=reader,
                      fingerprint=str(reader.attrs.get("fingerprint", "")))
    if placement == "stream":
        raise PlacementError(f"--data-placement stream: --data {cfg.data} is not a packed file at --image-size "
                             f"{cfg.image_size}; hint: python jobs/pack_data.py --data {cfg.data} --image-size "
                             f"{cfg.image_size} --out FILE.h5, then --data FILE.h5 (or --data-placement host)")
    first = None
    if cfg.download:  # one download (rank 0), not one per rank into the same folder
        first = _loaded(cfg, download=True) if dist.rank() == 0 else None
        dist.barrier()
    if dist.local_world_size() <= 1 or not dist.is_dist():
        return first or _loaded(cfg, download=False)
    return _share_on_node(cfg, first)


def _shared_dirs() -> list[Path]:
    """Where a node-shared copy may live, in order of preference: memory first, then node-local disks."""
    names = ("/dev/shm", os.environ.get("SLURM_TMPDIR", ""), os.environ.get("TMPDIR", ""), "/tmp")
    return [Path(d) for d in dict.fromkeys(names) if d and os.path.isdir(d)]


def _shared_dir(nbytes: int) -> Path:
    """Where the node's copy lives: $HPCVIZ_SHM_DIR, else /dev/shm when it has room, else a local temp dir."""
    if os.environ.get("HPCVIZ_SHM_DIR"):
        return Path(os.environ["HPCVIZ_SHM_DIR"])
    for d in _shared_dirs():
        if shutil.disk_usage(d).free > 1.05 * nbytes:
            return d
    raise PlacementError(f"no room for a {nbytes / 2 ** 30:.1f} GiB node-shared copy in /dev/shm, $TMPDIR or /tmp; "
                         "hint: --data-placement stream with a packed file, or set HPCVIZ_SHM_DIR")


def _share_on_node(cfg: TrainConfig, loaded: Source | None) -> Source:
    """Local rank 0 decodes --data and writes it to a mapped file; the node's other ranks map the same pages."""
    env = dist.current_env()
    key = hashlib.sha256(f"{cfg.data}|{cfg.image_size}|{env.master_addr}|{env.master_port}|{os.getuid()}"
                         .encode()).hexdigest()[:16]
    meta: dict[str, Any] = {}
    path = Path()
    if dist.local_rank() == 0:
        src = loaded or _loaded(cfg, download=False)
        path = _write_mapped(src, key)
        meta = {"path": str(path), "labels": src.labels.tolist(), "classes": list(src.classes),
                "shape": list(src.shape), "fingerprint": src.fingerprint}
        (path.parent / f"{path.name}.json").write_text(json.dumps(meta))
        del src, loaded
    dist.barrier()
    if dist.local_rank() != 0:
        dirs = [Path(os.environ["HPCVIZ_SHM_DIR"])] if os.environ.get("HPCVIZ_SHM_DIR") else _shared_dirs()
        hits = [d / f"hpcviz-{key}.u8.json" for d in dirs if (d / f"hpcviz-{key}.u8.json").is_file()]
        if not hits:
            raise PlacementError(f"rank {dist.rank()} on {env.host}: local rank 0's shared copy of --data "
                                 "is not there; hint: set HPCVIZ_SHM_DIR to a node-local directory")
        meta = json.loads(hits[0].read_text())
        path = Path(meta["path"])
    shape = tuple(meta["shape"])
    n = len(meta["labels"])
    images = torch.from_file(str(path), shared=True, size=n * int(np.prod(shape)), dtype=torch.uint8)
    dist.barrier()
    if dist.local_rank() == 0:  # every rank has mapped it: the pages live until the last one exits
        path.unlink(missing_ok=True)
        (path.parent / f"{path.name}.json").unlink(missing_ok=True)
    return Source(cfg.data, torch.tensor(meta["labels"], dtype=torch.int64), tuple(meta["classes"]), shape,
                  images=images.view(n, *shape), fingerprint=meta["fingerprint"])


def _write_mapped(src: Source, key: str) -> Path:
    path = _shared_dir(src.nbytes) / f"hpcviz-{key}.u8"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for _, block in src.chunks():
            f.write(block.contiguous().numpy().data.cast("B"))  # .data: the array's memoryview
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- one pass statistics
def train_stats(src: Source, train_idx: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """data.channel_stats of the training images, in one bounded pass (no copy of the split)."""
    mask = torch.zeros(src.n, dtype=torch.bool)
    mask[train_idx] = True
    total, total_sq = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    step = max(1, 2 ** 22 // int(np.prod(src.shape)))  # int64 temporaries of ~32 MB, whatever the chunk
    for lo, block in src.chunks():
        mine = block[mask[lo:lo + len(block)]]  # (b, 3, H, W) uint8
        for k in range(0, len(mine), step):
            x = mine[k:k + step].to(torch.int64)
            total += x.sum(dim=(0, 2, 3))
            total_sq += (x * x).sum(dim=(0, 2, 3))
    return stats_from_sums(total, total_sq, int(mask.sum()) * src.shape[1] * src.shape[2])


def source_fingerprint(src: Source) -> str:
    """data.fingerprint of the source, computed in one bounded pass when the file does not carry it."""
    if src.fingerprint:
        return src.fingerprint
    return fingerprint_blocks((src.n, *src.shape), (b.contiguous().numpy() for _, b in src.chunks()),
                              src.labels.numpy(), src.classes)


# ----------------------------------------------------------------------------- choosing
def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes() // max(1, dist.local_world_size())  # each rank holds its own copy


def available_host_bytes() -> int:
    """MemAvailable of this machine (8 GiB when /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return 8 * 2 ** 30


def choose(requested: str, src: Source, device: torch.device) -> str:
    """The placement for `requested` (see the module docstring), checked against what is possible."""
    if requested not in PLACEMENTS:
        raise PlacementError(f"--data-placement {requested!r}: not one of {', '.join(PLACEMENTS)}; "
                             "hint: auto picks by size")
    if requested == "stream" and src.reader is None:
        raise PlacementError(f"--data-placement stream needs a packed file at the run's image size, not {src.spec}; "
                             "hint: pack it with jobs/pack_data.py --image-size S")
    if requested != "auto":
        return requested
    size, free_dev, free_host = src.nbytes, _free_device_bytes(device), available_host_bytes()
    if size <= 0.4 * free_dev:
        choice = "device"
    elif size <= 0.5 * free_host or src.reader is None:
        choice = "host"
    else:
        choice = "stream"
    log.info("--data-placement auto: %s (data %.2f GiB; free on %s %.1f GiB; available on the node %.1f GiB)",
             choice, size / 2 ** 30, device, free_dev / 2 ** 30, free_host / 2 ** 30)
    return choice


# ----------------------------------------------------------------------------- feeds
class Feed:
    """One split's images as batches: `batches(index lists)` yields (x (b, 3, H, W) uint8, y (b,) int64)
    on the device, in the order asked. Index lists hold positions in the split (0..n-1)."""

    placement = "device"

    def __init__(self, pos: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        self.pos = pos.to(torch.int64)          # (n,) positions in the source
        self.labels = labels.to(device)         # (n,) int64
        self.device = device

    @property
    def n(self) -> int:
        return int(self.pos.shape[0])

    @property
    def index_device(self) -> torch.device:
        """Where index lists are best built (the device for resident data: no copy per step)."""
        return torch.device("cpu")

    def subset(self, n: int) -> Feed:
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, pos=self.pos[:n], labels=self.labels[:n])
        return out

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DeviceFeed(Feed):
    """The whole source resident on the device: a batch is one gather there."""

    def __init__(self, images: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        super().__init__(pos.to(device), labels, device)
        self.images = images  # (N, 3, H, W) uint8 on device

    @property
    def index_device(self) -> torch.device:
        return self.device

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        for idx in index_lists:
            idx = idx.to(self.device, non_blocking=True)
            yield self.images[self.pos[idx]], self.labels[idx]


class _Prefetching(Feed):
    """Batches gathered on the host by `workers` threads, `depth` batches ahead, into reused (pinned on CUDA)
    buffers; a buffer is refilled only once the copy out of it has finished."""

    def __init__(self, pos: torch.Tensor, labels: torch.Tensor, device: torch.device, shape: Sequence[int],
                 workers: int = 2, depth: int = 4) -> None:
        super().__init__(pos.cpu(), labels, device)
        self.cpu_labels = labels.cpu().to(torch.int64)
        self.shape, self.workers, self.depth = tuple(shape), max(1, workers), max(1, depth)

    def _fill(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _buffers(self, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda"
        return [(torch.empty((b, *self.shape), dtype=torch.uint8, pin_memory=pin),
                 torch.empty((b,), dtype=torch.int64, pin_memory=pin)) for _ in range(self.depth + 2)]

    def batches(self, index_lists: Iterable[torch.Tensor]) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        lists = [i.cpu() for i in index_lists]
        if not lists:
            return
        pools: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        events: dict[int, Any] = {}  # batch k -> the event its buffer's previous copy recorded

        def job(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = lists[k]
            pool = pools[len(idx)]
            x, y = pool[k % len(pool)]
            if k in events:  # the copy out of this buffer (batch k - len(pool)) must have finished:
                ev = events.pop(k)  # polled, not synchronize(): no host-device sync is ever requested
                while not ev.query():
                    time.sleep(1e-4)
            self._fill(self.pos[idx], x)
            torch.index_select(self.cpu_labels, 0, idx, out=y)
            return x, y

        for b in {len(idx) for idx in lists}:  # the last batch of an epoch may be smaller
            pools[b] = self._buffers(b)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="hpcviz-feed") as pool:
            pending: list[Future] = [pool.submit(job, k) for k in range(min(self.depth, len(lists)))]
            for k in range(len(lists)):
                x, y = pending[k].result()
                if self.device.type == "cuda":
                    xd, yd = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    reuse = k + len(pools[len(lists[k])])
                    if reuse < len(lists):
                        ev = torch.cuda.Event()
                        ev.record()
                        events[reuse] = ev
                else:
                    xd, yd = x, y  # valid until the consumer asks for the batch after next
                nxt = k + self.depth
                if nxt < len(lists):
                    pending.append(pool.submit(job, nxt))
                yield xd, yd


class HostFeed(_Prefetching):
    """The source in (node-shared) host memory; batches gathered by threads into pinned buffers."""

    placement = "host"

    def __init__(self, images: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 workers: int = 2, depth: int = 4) -> None:
        super().__init__(pos, labels, device, images.shape[1:], workers, depth)
        self.images = images  # (N, 3, H, W) uint8, CPU

    def _fill(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.images, 0, rows, out=out)


class StreamFeed(_Prefetching):
    """Rows read from the packed file for each batch, a few batches ahead: memory bounded by `depth`."""

    placement = "stream"

    def __init__(self, reader: Any, pos: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 workers: int = 2, depth: int = 4) -> None:
        super().__init__(pos, labels, device, reader.shape[1:], workers, depth)
        self.reader = reader

    def _fill(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.reader.read_rows(rows.numpy(), out.numpy())


def feed_tensors(images: torch.Tensor, labels: torch.Tensor, device: torch.device, workers: int = 2) -> Feed:
    """A feed over in-memory uint8 images (N, 3, H, W) and labels (N,): resident on a CPU, batches copied to a GPU."""
    pos = torch.arange(len(labels))
    if device.type == "cpu":
        return DeviceFeed(images, pos, labels, device)
    return HostFeed(images.cpu(), pos, labels, device, workers)


def make_feeds(src: Source, placement: str, train_idx: torch.Tensor, val_idx: torch.Tensor,
               device: torch.device, workers: int = 2) -> tuple[Feed, Feed]:
    """(train feed, val feed) of `placement` (already chosen) over one shared copy of the source."""
    labels = src.labels
    if placement == "device":
        if src.images is not None and device.type == "cpu" and dist.local_world_size() <= 1:
            images = src.images  # already where it is needed
        else:
            images = torch.empty((src.n, *src.shape), dtype=torch.uint8, device=device)
            for lo, block in src.chunks():
                images[lo:lo + len(block)].copy_(block)  # bounded host memory for packed files
        return (DeviceFeed(images, train_idx, labels[train_idx], device),
                DeviceFeed(images, val_idx, labels[val_idx], device))
    if placement == "host":
        if src.images is None:  # a packed file: one node-shared copy of it
            images = _map_file_on_node(src)
        else:
            images = src.images
        return (HostFeed(images, train_idx, labels[train_idx], device, workers),
                HostFeed(images, val_idx, labels[val_idx], device, workers))
    return (StreamFeed(src.reader, train_idx, labels[train_idx], device, workers),
            StreamFeed(src.reader, val_idx, labels[val_idx], device, workers))


def _map_file_on_node(src: Source) -> torch.Tensor:
    """A packed source copied once into the node's shared memory (local rank 0 writes, all map)."""
    if not dist.is_dist() or dist.local_world_size() <= 1:
        images = torch.empty((src.n, *src.shape), dtype=torch.uint8)
        for lo, block in src.chunks():
            images[lo:lo + len(block)] = block
        return images
    cfg = TrainConfig(data=src.spec, image_size=src.shape[-1])
    return _share_on_node(cfg, src).images  # type: ignore[return-value]
