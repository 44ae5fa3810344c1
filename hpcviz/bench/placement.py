"""Benchmark of the data placements: training throughput of each against the device-resident one (same
run, same steps), and the memory a 2-process local job takes with each, against the packed file's size.

Memory is read from /proc while the ranks run: each rank's peak RSS (VmHWM, which counts the node-shared
pages in every rank that touched them), the peak of the ranks' summed PSS (touched shared pages counted
once) and the peak growth of the node's shared memory (/proc/meminfo Shmem: the host placement's copy in
/dev/shm, whether touched or not). PSS plus that growth is what the node spends.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..config import TrainConfig
from ..train.loop import prepare_data, train_steps
from .viz import time_project_steps


def throughput(cfg: TrainConfig, steps: int, rounds: int = 3) -> dict[str, Any]:
    """Images/s of the project's step with each placement (device = the baseline; stream needs a packed
    file), timed in interleaved rounds (device, host, stream, device, ...) so all see the same machine;
    medians are reported."""
    import statistics

    device = dist.pick_device(cfg.device)
    splits = {w: prepare_data(dataclasses.replace(cfg, data_placement=w), device) for w in ("device", "host", "stream")}
    n = min(steps, splits["device"].train.n // cfg.batch_size - 3)
    runs: dict[str, list[float]] = {w: [] for w in splits}
    for _ in range(rounds):
        for w, split in splits.items():
            runs[w].append(time_project_steps(dataclasses.replace(cfg, data_placement=w), split, n))
    out: dict[str, Any] = {w: statistics.median(r) for w, r in runs.items()}
    out.update(runs=runs, steps=n, stream_vs_device=out["stream"] / out["device"],
               host_vs_device=out["host"] / out["device"])
    return out


def _rank(rank: int, port: int, cfg: TrainConfig, steps: int, done: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init(cfg.device if cfg.device != "auto" else "cpu")
    try:
        device = dist.pick_device(cfg.device)
        dist.share_cores()
        split = prepare_data(cfg, device)
        train_steps(cfg, split, min(steps, split.train.n // cfg.batch_size))
        done.put((rank, split.placement))
    finally:
        dist.cleanup()


def _proc_kib(path: str, key: str) -> int:
    """The kiB value of `key` in a /proc file (0 when it is gone: the process ended)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(cfg: TrainConfig, steps: int, port: int) -> dict[str, Any]:
    """Peak RSS per rank and peak summed PSS of a 2-process CPU job with cfg's placement, sampled every 50 ms."""
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, cfg, steps, done)) for r in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    peak_rss, peak_pss, shmem0, peak_shm = [0, 0], 0, _proc_kib("/proc/meminfo", "Shmem:"), 0
    while any(p.is_alive() for p in procs):
        for k, p in enumerate(procs):
            peak_rss[k] = max(peak_rss[k], _proc_kib(f"/proc/{p.pid}/status", "VmHWM:"))
        peak_pss = max(peak_pss, sum(_proc_kib(f"/proc/{p.pid}/smaps_rollup", "Pss:") for p in procs))
        peak_shm = max(peak_shm, _proc_kib("/proc/meminfo", "Shmem:") - shmem0)  # the node-shared copy
        time.sleep(0.05)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"placement {cfg.data_placement}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    placements = dict(done.get() for _ in procs)
    size = Path(cfg.data).stat().st_size if os.path.isfile(cfg.data) else 0
    return {"placement": placements[0], "file_MB": size / 2 ** 20, "peak_rss_MB": [r / 1024 for r in peak_rss],
            "peak_pss_sum_MB": peak_pss / 1024, "peak_shared_memory_MB": peak_shm / 1024,
            "seconds": time.perf_counter() - t0}


def bench_placement(cfg: TrainConfig, steps: int, memory_steps: int, port: int) -> dict[str, Any]:
    out: dict[str, Any] = {"throughput": throughput(cfg, steps)}
    out["memory"] = {w: memory(dataclasses.replace(cfg, data_placement=w), memory_steps, port + k)
                     for k, w in enumerate(("device", "host", "stream"))}
    out["torch_threads"] = torch.get_num_threads()
    return out
