"""The benchmarks behind jobs/benchmark.py, each a ratio against a baseline measured in the same run: one runner
per benchmark, taking its options (hpcviz.bench.options) and returning the result that the command writes as JSON."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..config import ConfigError, TrainConfig, make_train_config
from ..data.sources import fingerprint, load_images
from ..data.transforms import channel_stats, normalize
from ..dist import pick_device, share_cores
from ..explain.featviz import FeatvizConfig
from ..models import block_names, build_model, from_checkpoint
from ..store import PackedReader, ShardWriter, write_packed
from ..train.checkpoint import load_checkpoint
from ..viz.plan import balanced_sample, load_split
from .command import run_command
from .examples import bench_examples
from .featviz import bench_all_channels, bench_featviz, bench_resnet50, load_run, pick_channels, project_resnet50
from .options import (
    DeconvBench,
    DumpBench,
    ExamplesBench,
    FeatvizBench,
    GpuBench,
    GpuProjectionBench,
    InvertBench,
    PlacementBench,
    TrainBench,
    VizBench,
)
from .placement import bench_placement
from .viz import (
    bench_deconv,
    bench_homotopy,
    bench_invert,
    bench_train_throughput,
    bench_viz,
    bench_viz_stage,
    block_bytes,
    project_viz_gpu,
    sample_activations,
    time_to_accuracy,
)

__all__ = ["RUNNERS", "resolve_data"]

ROOT = Path(__file__).resolve().parents[2]  # the checkout: data/ and ../shared/ are found from it
SHARED_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
PACKED = ROOT / "data" / "cifar10-train.h5"


def resolve_data(spec: str) -> str:
    """auto -> the shared CIFAR-10 JPEGs packed once into data/cifar10-train.h5, or builtin."""
    if spec != "auto":
        return spec
    if PACKED.exists():
        return str(PACKED)
    if not SHARED_TAR.exists():
        print(f"note: {SHARED_TAR} not found: using the built-in data set", file=sys.stderr)
        return "builtin"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(SHARED_TAR) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        ds = load_images(str(Path(tmp) / "train"), 32)
        PACKED.parent.mkdir(exist_ok=True)
        write_packed(PACKED, ds.images.numpy(), ds.labels.numpy(), ds.classes,
                     {"source": str(SHARED_TAR.name), "fingerprint": fingerprint(ds)})
    print(f"packed {len(ds)} images into {PACKED} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return str(PACKED)


def run_train(opts: TrainBench) -> dict:
    data = resolve_data(opts.data)
    cfg = make_train_config(dict(data=data, arch=opts.arch, stem=opts.stem, device=opts.device,
                                 batch_size=opts.batch_size, compile=opts.compile, epochs=opts.epochs, lr=opts.lr))
    out = {"throughput": bench_train_throughput(cfg, opts.steps, opts.workers)}
    t = out["throughput"]
    print(f"train {t['arch']} on {t['device']}, batch {t['batch_size']}: project {t['project_images_per_s']:.0f} "
          f"img/s, plain loop {t['plain_images_per_s']:.0f} img/s, ratio {t['ratio']:.2f}x")
    if opts.to_accuracy:
        cfg.run_dir = str(Path(opts.out) / f"tta-{cfg.arch}-{t['device'].split(':')[0]}-{int(time.time())}")
        out["time_to_accuracy"] = a = time_to_accuracy(cfg, opts.target)
        print(f"time to {100 * a['target']:.2f}%: " + (f"epoch {a['epoch']}, {a['wall_minutes_to_target']:.1f} min "
              f"wall ({a['train_minutes_to_target']:.1f} min training)" if a["reached"] else
              f"not reached in {a['epochs']} epochs (best {100 * a['best_val_acc']:.2f}%)"))
    return out


def _raw_write(path: Path, arrays: list, repeats: int) -> float:
    """Seconds to write the same bytes as one plain file, fsync'ed: the baseline."""
    path.unlink(missing_ok=True)  # a fresh file, as the shard writer's is (freeing the old blocks is not timed)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(repeats):
            for a in arrays:
                f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def run_dump(opts: DumpBench) -> dict:

    blocks = sample_activations(opts.arch, "", opts.image_size, opts.batch_size, device=opts.device)  # {block: fp16}
    repeats = max(1, opts.images // opts.batch_size)
    n = repeats * opts.batch_size
    total_mb = sum(a.nbytes for a in blocks.values()) * repeats / 1e6
    tmp = Path(opts.dir)
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for comp in (None, "lzf", "gzip"):
        raws, shards = [], []
        for _ in range(opts.repeats):  # interleaved, so both see the same state of the disk and cache
            raws.append(_raw_write(tmp / "raw.bin", list(blocks.values()), repeats))
            (tmp / f"shard-{comp or 'none'}.h5").unlink(missing_ok=True)
            t0 = time.perf_counter()
            with ShardWriter(tmp / f"shard-{comp or 'none'}.h5", n, {"bench": True}, compression=comp) as w:
                for r in range(repeats):
                    for name, a in blocks.items():
                        w.write(f"act/{name}", r * opts.batch_size, a, dims=("image", "channel", "y", "x"))
            shards.append(time.perf_counter() - t0)
        raw_s, s = statistics.median(raws), statistics.median(shards)
        size = (tmp / f"shard-{comp or 'none'}.h5").stat().st_size
        rows.append({"compression": comp or "none", "MB_per_s": total_mb / s, "raw_MB_per_s": total_mb / raw_s,
                     "ratio_to_raw": raw_s / s, "file_MB": size / 1e6})
        print(f"dump {opts.arch} {n} images, {total_mb:.0f} MB fp16, compression {comp or 'none'}: "
              f"{total_mb / s:.0f} MB/s vs raw+fsync {total_mb / raw_s:.0f} MB/s (ratio {raw_s / s:.2f}), "
              f"file {size / 1e6:.0f} MB")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    sizes = {f"{a}/{s}": block_bytes(a, s, opts.image_size) for a, s in
             (("resnet18", "imagenet"), ("resnet18", "cifar"), ("resnet20", "cifar"))}
    for key, per_block in sizes.items():
        print(f"bytes/image at {opts.image_size} px, {key}: " + ", ".join(f"{b} {v}" for b, v in per_block.items())
              + f"; total {sum(per_block.values())}")
    return {"writer": rows, "bytes_per_image": sizes, "images": n, "arch": opts.arch}


def run_invert(opts: InvertBench) -> dict:

    if opts.arch:
        model, label = build_model(opts.arch, 10, opts.stem).eval(), f"{opts.arch} (untrained)"
        mean = std = None
    else:
        runs = sorted(Path("results/benchmarks").glob("tta-resnet20-*/checkpoints")) if not opts.run else \
            [Path(opts.run) / "checkpoints"]
        if not runs:
            raise ConfigError("--run: no trained run found; hint: python jobs/benchmark.py train --to-accuracy, "
                             "or pass --run results/<run>, or --arch resnet20 for an untrained model")
        state = load_checkpoint(runs[-1])
        model = from_checkpoint(state)
        label, mean, std = f"{state['config']['arch']} trained ({runs[-1].parent.name})", state["mean"], state["std"]
    if opts.arch:
        ds = load_images(resolve_data(opts.data), 32)
        torch.manual_seed(0)
        pixels = ds.images[torch.randperm(len(ds))[: opts.images]]
        mean, std = channel_stats(ds.images)
    else:  # a class-balanced sample of the run's own split: held-out images unless --split train
        split_x, split_y, _ = load_split(state["config"], opts.split)
        pixels = split_x[torch.as_tensor(balanced_sample(split_y.numpy(), opts.images, seed=0))]
        label += f", {opts.split} split"
    dev = pick_device(opts.device)
    assert mean is not None and std is not None
    model, x = model.to(dev), normalize(pixels, mean, std).to(dev)
    label += f", on {dev}"
    blocks = [b for b in opts.blocks.split(",") if b] or block_names(model)
    if opts.homotopy:
        h = bench_homotopy(model, x, mean, std, blocks)
        print(f"invert {label}, {h['images']} images: median / 90th percentile error (mean steps) per block")
        for name in ("without", "default"):
            print(f"  {name:8s} {h[name]['seconds']:6.1f} s  " + "  ".join(
                f"{b} {v['median']:.3f}/{v['p90']:.3f} ({v['mean_steps']:.0f})" for b, v in h[name]["blocks"].items()))
        return {"invert": {"homotopy": h, "model": label}}
    r = bench_invert(model, x, mean, std, blocks, opts.steps or None, opts.single)
    print(f"invert {label}, {r['images']} images, {r['steps']} steps: batched {r['batched_images_per_s']:.3f} "
          f"img/s vs one at a time {r['one_at_a_time_images_per_s']:.3f} img/s, ratio {r['ratio']:.1f}x "
          f"(max |diff| {r['max_abs_diff_batched_vs_single']:.1e})")
    print("median relative feature error: " + ", ".join(f"{b} {e:.3f}" for b, e in r["median_error"].items()))
    return {"invert": {**r, "model": label}}


def run_deconv(opts: DeconvBench) -> dict:
    r = bench_deconv(opts.arch, opts.stem, opts.batch_size, opts.image_size, opts.device, opts.repeats)
    print(f"deconv {r['arch']} ({r['stem']} stem) on {r['device']}, batch {r['batch']} at {r['image_size']} px, "
          f"{r['reconstructions']} reconstructions (blocks x paths): {r['ours_ms_per_image']:.1f} ms/image vs "
          f"Captum-style {r['baseline_ms_per_image']:.1f} ms/image, speed-up {r['speedup']:.1f}x "
          f"(max relative difference {r['max_rel_diff_vs_baseline']:.1e})")
    return {"deconv": r}


def run_viz(opts: VizBench) -> dict:
    if not opts.run and not opts.command:
        raise ConfigError("benchmark.py viz: needs --run (a trained run) or --command; hint: --run results/r20, "
                          "or --command to time the whole local command against --baseline")
    out = run_command(opts) if opts.command else {}
    return {**out, **(run_task(opts) if opts.run else {})}


def run_task(opts: VizBench) -> dict:
    r = bench_viz(Path(opts.run), Path(opts.out) / "viz-tmp", opts.images, opts.split, opts.device, opts.batch_size)
    for method in ("baseline", "default"):
        m = r[method]
        s = m["seconds_per_image"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "total")
        print(f"viz {r['arch']} on {r['device']}, {r['images']} {r['split']} images, {method}: "
              f"{s['total']:.2f} s/image ({parts})")
        print("  median inversion error: " + ", ".join(f"{b} {e:.3f} ({m['mean_steps'][b]:.0f} steps)"
                                                     for b, e in m["median_error"].items()))
    print(f"viz: the default is {r['ratio']:.1f}x faster per image than the baseline "
          f"(inversion alone {r['inversion_ratio']:.1f}x)")
    return {"viz": r}


def run_examples(opts: ExamplesBench) -> dict:
    r = bench_examples(Path(opts.out) / "examples-tmp", resolve_data(opts.data), opts.images, opts.tasks, opts.topk,
                       opts.arch, opts.stem, opts.image_size, opts.batch_size, opts.device, opts.project_channels)
    m, g, x, p = r["map"], r["merge"], r["exactness"], r["projection"]
    print(f"examples {r['arch']} ({r['stem']} stem), {r['images']} images in {r['tasks']} tasks, k={r['k']}, "
          f"{r['blocks']} blocks, on {r['device']}")
    print(f"  map: shard 0 {m['shard0_without_s']:.1f} s without, {m['shard0_with_s']:.1f} s with: "
          f"+{100 * m['added']:.1f}% (its own clock: {100 * m['topk_share_of_tasks']:.1f}% of all tasks' time)")
    print(f"  merge: collation {g['collate_s']:.2f} s (the reduce alone {g['reduce_s']:.2f} s) "
          f"for {g['n_images']} images")
    print(f"  exactness vs a brute-force top-k over viz.h5: {'EXACT' if x['exact'] else 'DIFFERS ' + str(x['wrong'])} "
          f"({x['blocks_checked']} blocks, {x['seconds']:.0f} s)")
    print("  projection, s per channel, receptive field only (whole image then cropped): " + ", ".join(
        f"{b} {s:.3f} ({p['full_seconds_per_channel'][b]:.3f})" for b, s in p["seconds_per_channel"].items())
        + f"; every channel: {p['all_channels_s']:.0f} s ({p['full_all_channels_s']:.0f} s), "
        f"{p['full_all_channels_s'] / max(p['all_channels_s'], 1e-9):.2f}x")
    return {"examples": r}


def run_featviz(opts: FeatvizBench) -> dict:
    share_cores()  # $HPCVIZ_THREADS, else torch's default; both sides run on the same thread count
    if not opts.run and not opts.resnet50_seconds:
        raise ConfigError("benchmark featviz: needs --run RUN (a trained run) or --resnet50-seconds S; hint: "
                          "python jobs/benchmark.py featviz --run results/r20")
    dev = pick_device(opts.device)
    out: dict = {}
    if opts.resnet50_seconds:
        r50 = out["resnet50"] = bench_resnet50(opts.resnet50_seconds, dev)
        print(f"featviz ResNet-50 (untrained) at 224 px on {dev}, defaults: {r50['measured_channels']} channels in "
              f"{r50['measured_s']:.0f} s ({r50['tflop_per_s']:.1f} TFLOP/s), the other {r50['rest_channels']} "
              f"extrapolated: {r50['rest_s_extrapolated']:.0f} s; every channel {r50['total_min']:.1f} min")
        if not opts.run:
            return {"featviz": out}
    model, mean, std, size, label = load_run(Path(opts.run))
    model, label = model.to(dev), f"{label}, on {dev}"
    cfg = FeatvizConfig(steps=opts.steps) if opts.steps else FeatvizConfig()
    out.update(model=label, image_size=size)
    if opts.per_block:
        r = out["compare"] = bench_featviz(model, mean, std, size, pick_channels(model, size, opts.per_block), cfg,
                                           opts.baseline, opts.baseline_steps)
        print(f"featviz {label}, {r['channels']} channels ({opts.per_block} per block) at {size} px, "
              f"{r['threads']} threads; baseline: {r['baseline']} ({r['baseline_steps']} steps, one channel per call)")
        print(f"  activation: ours >= baseline on {100 * r['ours_ge_baseline']:.0f}% of channels, median ratio "
              f"{r['median_activation_ratio']:.2f} (ours {r['mean_steps']:.0f} steps on average, "
              f"at most {r['max_steps']})")
        print(f"  time per channel: ours {r['ours_s_per_channel']:.2f} s, baseline "
              f"{r['baseline_s_per_channel']:.1f} s: {r['time_ratio']:.0f}x less")
    if opts.all:
        a = out["all"] = bench_all_channels(model, mean, std, size, cfg)
        print(f"  every channel ({a['channels']}) in one call: {a['seconds']:.0f} s ({a['s_per_channel']:.2f} s per "
              f"channel, {a['mean_steps_all']:.0f} steps on average)")
    if opts.project:
        steps = out.get("all", out.get("compare", {})).get("mean_steps_all", out.get("compare", {}).get("mean_steps"))
        p = out["projection"] = project_resnet50(float(steps or cfg.steps), cfg.steps)
        print(f"  projection (not a measurement), ResNet-50 at 224 px, all {p['channels']} channels on one H200 at "
              f"{100 * p['efficiency']:.0f}% of peak: {p['tflop_per_step_all_rows']:.0f} TFLOP per step of all rows; "
              + ", ".join(f"{k} {v['mean_steps']:.1f} min ({v['max_steps']:.1f} at {p['max_steps']} steps)"
                          for k, v in p["minutes"].items())
              + f"; {p['max_saved_MB_per_row_fp32']:.0f} MB per row: {p['rows_at_once_fp32']} rows at once (fp32)")
    return {"featviz": out}


def run_placement(opts: PlacementBench) -> dict:
    data = resolve_data(opts.data)
    with PackedReader(data) as reader:
        size = opts.image_size or reader.shape[-1]
    cfg = TrainConfig(data=data, image_size=size, arch=opts.arch, batch_size=opts.batch_size, device=opts.device,
                      log_every=10 ** 9)
    r = bench_placement(cfg, opts.steps, opts.memory_steps, opts.port)
    t = r["throughput"]
    print(f"placement {opts.arch} at {size} px on {opts.device}: device {t['device']:.0f} img/s, host {t['host']:.0f} "
          f"({t['host_vs_device']:.2f}x), stream {t['stream']:.0f} ({t['stream_vs_device']:.2f}x)")
    for where, m in r["memory"].items():
        print(f"  2 ranks, {where}: peak RSS {m['peak_rss_MB'][0]:.0f} + {m['peak_rss_MB'][1]:.0f} MB, peak summed "
              f"PSS {m['peak_pss_sum_MB']:.0f} MB + node-shared {m['peak_shared_memory_MB']:.0f} MB, "
              f"file {m['file_MB']:.0f} MB")
    return {"placement": r}


def run_gpu(opts: GpuBench) -> dict:
    """The GPU check: pytest -m gpu, then each benchmark on CUDA; one table, one JSON (gpu.json)."""

    if not torch.cuda.is_available():
        raise ConfigError("benchmark gpu: no CUDA device is visible; hint: run it on a GPU node "
                         "(srun --gpus 1 python jobs/benchmark.py gpu)")
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=ROOT,
                           capture_output=True, text=True)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"pytest -m gpu: {summary}")
    data = resolve_data(opts.data)
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "pytest_gpu": summary,
                 "pytest_gpu_ok": tests.returncode == 0, "train": {}}
    for stem in ("cifar", "imagenet"):
        r = run_train(TrainBench(data=data, arch="resnet18", stem=stem, device="cuda", batch_size=512, steps=30,
                                 workers=8, epochs=1, out=opts.out))
        out["train"][stem] = r["throughput"]
    out["dump"] = run_dump(DumpBench(arch="resnet18", images=2048, image_size=32, batch_size=256, device="cuda",
                                     dir=str(Path(opts.out) / "dump-tmp")))
    out["deconv"] = run_deconv(DeconvBench(arch="resnet18", stem="cifar", batch_size=256, image_size=32,
                                           device="cuda"))["deconv"]
    out["invert"] = run_invert(InvertBench(arch="resnet18", stem="cifar", data=data, images=64, single=1,
                                           device="cuda"))["invert"]
    out["viz"] = {stem: bench_viz_stage(data, opts.viz_images, Path(opts.out) / f"gpu-viz-{stem}", stem=stem)
                  for stem in ("cifar", "imagenet")}
    out["featviz_resnet50"] = bench_resnet50(150.0, torch.device("cuda"))
    out["ddp"] = run_ddp(data, Path(opts.out) / "gpu-ddp-run") if torch.cuda.device_count() >= 2 else None
    out["seconds"] = time.perf_counter() - t0
    _print_gpu_table(out)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / "gpu.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {Path(opts.out) / 'gpu.json'}")
    return {"gpu": out}


def run_ddp(data: str, run_dir: Path) -> dict[str, Any]:
    """One epoch of ResNet-18 DDP on 2 GPUs with NCCL, through the launcher as a user starts it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_train.py"), "--cluster", "local", "--gpus", "2",
                        "--arch", "resnet18", "--data", data, "--epochs", "1", "--batch-size", "512", "--lr", "0.2",
                        "--run", str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    return {"ok": r.returncode == 0, "seconds": time.perf_counter() - t0, "error": (errors or [""])[-1]}


def run_gpu_projection(opts: GpuProjectionBench) -> dict:
    p = project_viz_gpu(opts.arch, opts.image_size, opts.images, opts.steps, opts.efficiency)
    print(f"projection (not a measurement): {p['images']} images of {p['image_size']} px through {p['arch']}, one "
          f"array task's default work (every block dumped, deconvnet x 3 paths exact in fp32, the default inversion "
          f"in bf16 with every row running all {p['steps']} steps: an upper bound), on one H200 at "
          f"{100 * p['efficiency']:.0f}% of the dense peaks")
    for stem, r in p["stems"].items():
        print(f"  {stem} stem: {r['exact_gflop_per_image']:.1f} GFLOP per image exact, "
              f"{r['inversion_gflop_per_image']:.0f} GFLOP inversion: {r['minutes']:.1f} min")
    return {"gpu_projection": p}


def _print_gpu_table(out: dict) -> None:
    t = Table(title=f"hpcviz GPU check on {out['device']} ({out['seconds'] / 60:.1f} min)")
    for col in ("what", "result"):
        t.add_column(col)
    t.add_row("pytest -m gpu", out["pytest_gpu"])
    for stem, r in out["train"].items():
        t.add_row(f"train ResNet-18 {stem} stem, 32 px", f"{r['project_images_per_s']:.0f} img/s "
                  f"({r['ratio']:.2f}x eager fp32 resident, {r['ratio_vs_dataloader']:.2f}x DataLoader)")
    none = next(r for r in out["dump"]["writer"] if r["compression"] == "none")
    t.add_row("dump (shard writer)", f"{none['MB_per_s']:.0f} MB/s ({none['ratio_to_raw']:.2f} of raw)")
    t.add_row("deconv every block x 3 paths", f"{out['deconv']['ours_ms_per_image']:.2f} ms/image "
              f"({out['deconv']['speedup']:.1f}x Captum-style)")
    t.add_row("invert (default steps)", f"{out['invert']['batched_images_per_s']:.1f} img/s")
    for stem, v in out["viz"].items():
        t.add_row(f"one array task, ResNet-18 {stem} stem (every block, 3 paths, default inversion)",
                  f"{v['images_per_s']:.1f} img/s ({v['images']} images in {v['seconds']:.0f} s); "
                  f"{v['projected_images']} images: {v['projected_s'] / 60:.1f} min (projected)")
    f = out["featviz_resnet50"]
    t.add_row("featviz, every channel of ResNet-50 at 224 px", f"{f['total_min']:.1f} min ({f['measured_channels']} "
              f"channels measured in {f['measured_s']:.0f} s, {f['rest_channels']} extrapolated by FLOPs)")
    d = out["ddp"]
    ddp = "not run: fewer than 2 GPUs visible" if d is None else (
        f"ok: 1 epoch in {d['seconds']:.0f} s" if d["ok"] else f"FAILED after {d['seconds']:.0f} s: {d['error']}")
    t.add_row("DDP, 2 GPUs, NCCL", ddp)
    Console().print(t)


RUNNERS: dict[str, Callable[[Any], dict]] = {
    "train": run_train, "dump": run_dump, "deconv": run_deconv, "invert": run_invert, "placement": run_placement,
    "gpu": run_gpu, "viz": run_viz, "examples": run_examples, "featviz": run_featviz,
    "gpu-projection": run_gpu_projection}
