"""Benchmarks, each a ratio against a baseline measured in the same run (jobs/benchmark.py lists them)."""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..cli import Parser, command
from ..config import ConfigError
from ..log import setup_logging

ROOT = Path(__file__).resolve().parents[2]  # the checkout: data/ and ../shared/ are found from it

SHARED_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
PACKED = ROOT / "data" / "cifar10-train.h5"


def get_args_parser(add_help: bool = False) -> Parser:
    p = Parser("benchmark.py", add_help=add_help, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("train", help="training step vs a plain loop; time to accuracy")
    t.add_argument("--data", default="auto", help="auto | any --data form of launch_train.py")
    t.add_argument("--arch", default="resnet20")
    t.add_argument("--stem", default="")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--steps", type=int, default=20, help="timed steps of each loop")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    t.add_argument("--compile", action="store_true")
    t.add_argument("--to-accuracy", action="store_true", help="also train until --target (long on a CPU)")
    t.add_argument("--target", type=float, default=0.8189)
    t.add_argument("--epochs", type=int, default=15, help="length of the schedule for --to-accuracy")
    t.add_argument("--lr", type=float, default=0.2)
    t.add_argument("--out", default="results/benchmarks")
    d = sub.add_parser("dump", help="shard writer vs raw fsync'ed writes")
    d.add_argument("--arch", default="resnet20")
    d.add_argument("--images", type=int, default=512)
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3, help="timings per variant; medians are reported")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the activations are computed and converted to fp16")
    i = sub.add_parser("invert", help="inversion: a batch vs one image at a time, error per block")
    i.add_argument("--run", default="", help="a trained run (default: the newest results/benchmarks/tta-resnet20-*)")
    i.add_argument("--arch", default="", help="instead of --run: an untrained model of this arch")
    i.add_argument("--stem", default="")
    i.add_argument("--data", default="auto", help="with --arch: where the images come from")
    i.add_argument("--split", default="val", help="with a trained run: val (held out, default) | train")
    i.add_argument("--images", type=int, default=16)
    i.add_argument("--single", type=int, default=2, help="images timed one at a time")
    i.add_argument("--steps", type=int, default=0, help="0 = the default iteration count")
    i.add_argument("--blocks", default="", help="default: every block")
    i.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    i.add_argument("--out", default="results/benchmarks")
    v = sub.add_parser("deconv", help="deconvnet: every block x 3 paths vs a Captum-style baseline")
    v.add_argument("--arch", default="resnet20")
    v.add_argument("--stem", default="")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--image-size", type=int, default=32)
    v.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--out", default="results/benchmarks")
    d.add_argument("--dir", default="results/benchmarks/dump-tmp", help="where the test files are written")
    d.add_argument("--out", default="results/benchmarks")
    pl = sub.add_parser("placement", help="host/stream vs device-resident data: throughput and memory")
    pl.add_argument("--data", default="auto", help="a packed FILE.h5 (auto: the shared CIFAR-10, packed)")
    pl.add_argument("--image-size", type=int, default=0, help="0 = the file's own size")
    pl.add_argument("--arch", default="resnet20")
    pl.add_argument("--batch-size", type=int, default=128)
    pl.add_argument("--steps", type=int, default=20, help="timed steps per placement")
    pl.add_argument("--memory-steps", type=int, default=5, help="steps the 2-process memory runs train")
    pl.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    pl.add_argument("--port", type=int, default=29611)
    pl.add_argument("--out", default="results/benchmarks")
    z = sub.add_parser("viz", help="the whole array task per image: the default vs today's way (1000 Adam steps)")
    z.add_argument("--run", required=True, help="a trained run: its held-out images are visualized")
    z.add_argument("--images", type=int, default=16)
    z.add_argument("--split", default="val", help="val (held out, default) | train")
    z.add_argument("--batch-size", type=int, default=64)
    z.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    z.add_argument("--out", default="results/benchmarks")
    e = sub.add_parser("examples", help="dataset examples: the map's cost in an array task, the merge, the "
                       "projections per channel, exactness against a brute-force top-k")
    e.add_argument("--data", default="auto", help="auto | any --data form (the training split is visualized)")
    e.add_argument("--images", type=int, default=10000)
    e.add_argument("--tasks", type=int, default=4, help="array tasks (shards), run one after the other here")
    e.add_argument("--topk", type=int, default=9)
    e.add_argument("--arch", default="resnet18")
    e.add_argument("--stem", default="cifar")
    e.add_argument("--image-size", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--project-channels", type=int, default=16, help="channels per block whose projections are timed")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--out", default="results/benchmarks")
    f = sub.add_parser("featviz", help="feature visualization: every channel of a block batched vs Lucent's "
                       "render_vis one channel at a time (activation reached, time per channel)")
    f.add_argument("--run", required=True, help="a trained run: its network and normalisation")
    f.add_argument("--per-block", type=int, default=2, help="channels per block compared with the baseline")
    f.add_argument("--baseline", default="auto", choices=("auto", "lucent", "loop"),
                   help="auto: Lucent if it imports, else our loop one channel at a time with its settings")
    f.add_argument("--baseline-steps", type=int, default=512, help="steps of the baseline (Lucent's default 512)")
    f.add_argument("--all", action="store_true", help="also time every channel of the network in one call")
    f.add_argument("--steps", type=int, default=0, help="0 = the default step limit of ours")
    f.add_argument("--project", action="store_true",
                   help="also project every channel of ResNet-50 at 224 px on one H200 (FLOPs, memory)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    f.add_argument("--out", default="results/benchmarks")
    g = sub.add_parser("gpu", help="the GPU check: pytest -m gpu and every benchmark on CUDA (< 8 min)")
    g.add_argument("--data", default="auto")
    g.add_argument("--viz-images", type=int, default=256, help="images through the whole visualization stage")
    g.add_argument("--device", default="cuda", choices=("cuda",))
    g.add_argument("--out", default="results/benchmarks")
    return p


def resolve_data(spec: str) -> str:
    """auto -> the shared CIFAR-10 JPEGs packed once into data/cifar10-train.h5, or builtin."""
    if spec != "auto":
        return spec
    if PACKED.exists():
        return str(PACKED)
    if not SHARED_TAR.exists():
        print(f"note: {SHARED_TAR} not found: using the built-in data set", file=sys.stderr)
        return "builtin"
    from ..data.sources import fingerprint, load_images
    from ..store import write_packed
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


def run_train(args: argparse.Namespace) -> dict:
    from ..bench.viz import bench_train_throughput, time_to_accuracy
    from ..config import make_train_config
    data = resolve_data(args.data)
    cfg = make_train_config(dict(data=data, arch=args.arch, stem=args.stem, device=args.device,
                                 batch_size=args.batch_size, compile=args.compile, epochs=args.epochs, lr=args.lr))
    out = {"throughput": bench_train_throughput(cfg, args.steps, args.workers)}
    t = out["throughput"]
    print(f"train {t['arch']} on {t['device']}, batch {t['batch_size']}: project {t['project_images_per_s']:.0f} "
          f"img/s, plain loop {t['plain_images_per_s']:.0f} img/s, ratio {t['ratio']:.2f}x")
    if args.to_accuracy:
        cfg.run_dir = str(Path(args.out) / f"tta-{cfg.arch}-{t['device'].split(':')[0]}-{int(time.time())}")
        out["time_to_accuracy"] = a = time_to_accuracy(cfg, args.target)
        print(f"time to {100 * a['target']:.2f}%: " + (f"epoch {a['epoch']}, {a['wall_minutes_to_target']:.1f} min "
              f"wall ({a['train_minutes_to_target']:.1f} min training)" if a["reached"] else
              f"not reached in {a['epochs']} epochs (best {100 * a['best_val_acc']:.2f}%)"))
    return out


def _raw_write(path: Path, arrays: list, repeats: int) -> float:
    """Seconds to write the same bytes as one plain file, fsync'ed: the baseline."""
    import os
    path.unlink(missing_ok=True)  # a fresh file, as the shard writer's is (freeing the old blocks is not timed)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(repeats):
            for a in arrays:
                f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def run_dump(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from ..bench.viz import block_bytes, sample_activations
    from ..store import ShardWriter
    blocks = sample_activations(args.arch, "", args.image_size, args.batch_size, device=args.device)  # {block: fp16}
    repeats = max(1, args.images // args.batch_size)
    n = repeats * args.batch_size
    total_mb = sum(a.nbytes for a in blocks.values()) * repeats / 1e6
    tmp = Path(args.dir)
    tmp.mkdir(parents=True, exist_ok=True)
    import statistics
    rows = []
    for comp in (None, "lzf", "gzip"):
        raws, shards = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same state of the disk and cache
            raws.append(_raw_write(tmp / "raw.bin", list(blocks.values()), repeats))
            (tmp / f"shard-{comp or 'none'}.h5").unlink(missing_ok=True)
            t0 = time.perf_counter()
            with ShardWriter(tmp / f"shard-{comp or 'none'}.h5", n, {"bench": True}, compression=comp) as w:
                for r in range(repeats):
                    for name, a in blocks.items():
                        w.write(f"act/{name}", r * args.batch_size, a, dims=("image", "channel", "y", "x"))
            shards.append(time.perf_counter() - t0)
        raw_s, s = statistics.median(raws), statistics.median(shards)
        size = (tmp / f"shard-{comp or 'none'}.h5").stat().st_size
        rows.append({"compression": comp or "none", "MB_per_s": total_mb / s, "raw_MB_per_s": total_mb / raw_s,
                     "ratio_to_raw": raw_s / s, "file_MB": size / 1e6})
        print(f"dump {args.arch} {n} images, {total_mb:.0f} MB fp16, compression {comp or 'none'}: "
              f"{total_mb / s:.0f} MB/s vs raw+fsync {total_mb / raw_s:.0f} MB/s (ratio {raw_s / s:.2f}), "
              f"file {size / 1e6:.0f} MB")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    sizes = {f"{a}/{s}": block_bytes(a, s, args.image_size) for a, s in
             (("resnet18", "imagenet"), ("resnet18", "cifar"), ("resnet20", "cifar"))}
    for key, per_block in sizes.items():
        print(f"bytes/image at {args.image_size} px, {key}: " + ", ".join(f"{b} {v}" for b, v in per_block.items())
              + f"; total {sum(per_block.values())}")
    del np, torch
    return {"writer": rows, "bytes_per_image": sizes, "images": n, "arch": args.arch}


def run_invert(args: argparse.Namespace) -> dict:
    import torch

    from ..bench.viz import bench_invert
    from ..data.sources import load_images
    from ..data.transforms import channel_stats, normalize
    from ..models import block_names, build_model
    if args.arch:
        model, label = build_model(args.arch, 10, args.stem).eval(), f"{args.arch} (untrained)"
        mean = std = None
    else:
        runs = sorted(Path("results/benchmarks").glob("tta-resnet20-*/checkpoints")) if not args.run else \
            [Path(args.run) / "checkpoints"]
        if not runs:
            raise ConfigError("--run: no trained run found; hint: python jobs/benchmark.py train --to-accuracy, "
                             "or pass --run results/<run>, or --arch resnet20 for an untrained model")
        from ..models import from_checkpoint
        from ..train.checkpoint import load_checkpoint
        state = load_checkpoint(runs[-1])
        model = from_checkpoint(state)
        label, mean, std = f"{state['config']['arch']} trained ({runs[-1].parent.name})", state["mean"], state["std"]
    if args.arch:
        ds = load_images(resolve_data(args.data), 32)
        torch.manual_seed(0)
        pixels = ds.images[torch.randperm(len(ds))[: args.images]]
        mean, std = channel_stats(ds.images)
    else:  # a class-balanced sample of the run's own split: held-out images unless --split train
        from ..viz.plan import balanced_sample, load_split
        split_x, split_y, _ = load_split(state["config"], args.split)
        pixels = split_x[torch.as_tensor(balanced_sample(split_y.numpy(), args.images, seed=0))]
        label += f", {args.split} split"
    from ..dist import pick_device
    dev = pick_device(args.device)
    assert mean is not None and std is not None
    model, x = model.to(dev), normalize(pixels, mean, std).to(dev)
    label += f", on {dev}"
    blocks = [b for b in args.blocks.split(",") if b] or block_names(model)
    r = bench_invert(model, x, mean, std, blocks, args.steps or None, args.single)
    print(f"invert {label}, {r['images']} images, {r['steps']} steps: batched {r['batched_images_per_s']:.3f} "
          f"img/s vs one at a time {r['one_at_a_time_images_per_s']:.3f} img/s, ratio {r['ratio']:.1f}x "
          f"(max |diff| {r['max_abs_diff_batched_vs_single']:.1e})")
    print("median relative feature error: " + ", ".join(f"{b} {e:.3f}" for b, e in r["median_error"].items()))
    return {"invert": {**r, "model": label}}


def run_deconv(args: argparse.Namespace) -> dict:
    from ..bench.viz import bench_deconv
    r = bench_deconv(args.arch, args.stem, args.batch_size, args.image_size, args.device, args.repeats)
    print(f"deconv {r['arch']} ({r['stem']} stem) on {r['device']}, batch {r['batch']} at {r['image_size']} px, "
          f"{r['reconstructions']} reconstructions (blocks x paths): {r['ours_ms_per_image']:.1f} ms/image vs "
          f"Captum-style {r['baseline_ms_per_image']:.1f} ms/image, speed-up {r['speedup']:.1f}x "
          f"(max relative difference {r['max_rel_diff_vs_baseline']:.1e})")
    return {"deconv": r}


def run_viz(args: argparse.Namespace) -> dict:
    from ..bench.viz import bench_viz
    r = bench_viz(Path(args.run), Path(args.out) / "viz-tmp", args.images, args.split, args.device, args.batch_size)
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


def run_examples(args: argparse.Namespace) -> dict:
    from ..bench.examples import bench_examples
    r = bench_examples(Path(args.out) / "examples-tmp", resolve_data(args.data), args.images, args.tasks, args.topk,
                       args.arch, args.stem, args.image_size, args.batch_size, args.device, args.project_channels)
    m, g, x, p = r["map"], r["merge"], r["exactness"], r["projection"]
    print(f"examples {r['arch']} ({r['stem']} stem), {r['images']} images in {r['tasks']} tasks, k={r['k']}, "
          f"{r['blocks']} blocks, on {r['device']}")
    print(f"  map: shard 0 {m['shard0_without_s']:.1f} s without, {m['shard0_with_s']:.1f} s with: "
          f"+{100 * m['added']:.1f}% (its own clock: {100 * m['topk_share_of_tasks']:.1f}% of all tasks' time)")
    print(f"  merge: collation {g['collate_s']:.2f} s (the reduce alone {g['reduce_s']:.2f} s) "
          f"for {g['n_images']} images")
    print(f"  exactness vs a brute-force top-k over viz.h5: {'EXACT' if x['exact'] else 'DIFFERS ' + str(x['wrong'])} "
          f"({x['blocks_checked']} blocks, {x['seconds']:.0f} s)")
    print("  projection, s per channel: " + ", ".join(f"{b} {s:.3f}" for b, s in p["seconds_per_channel"].items())
          + f"; every channel: {p['all_channels_s']:.0f} s")
    return {"examples": r}


def run_featviz(args: argparse.Namespace) -> dict:
    from ..bench.featviz import bench_all_channels, bench_featviz, load_run, pick_channels, project_resnet50
    from ..dist import pick_device, share_cores
    from ..explain.featviz import FeatvizConfig
    share_cores()  # $HPCVIZ_THREADS, else torch's default; both sides run on the same thread count
    model, mean, std, size, label = load_run(Path(args.run))
    dev = pick_device(args.device)
    model, label = model.to(dev), f"{label}, on {dev}"
    cfg = FeatvizConfig(steps=args.steps) if args.steps else FeatvizConfig()
    out: dict = {"model": label, "image_size": size}
    if args.per_block:
        r = out["compare"] = bench_featviz(model, mean, std, size, pick_channels(model, size, args.per_block), cfg,
                                           args.baseline, args.baseline_steps)
        print(f"featviz {label}, {r['channels']} channels ({args.per_block} per block) at {size} px, "
              f"{r['threads']} threads; baseline: {r['baseline']} ({r['baseline_steps']} steps, one channel per call)")
        print(f"  activation: ours >= baseline on {100 * r['ours_ge_baseline']:.0f}% of channels, median ratio "
              f"{r['median_activation_ratio']:.2f} (ours {r['mean_steps']:.0f} steps on average, "
              f"at most {r['max_steps']})")
        print(f"  time per channel: ours {r['ours_s_per_channel']:.2f} s, baseline "
              f"{r['baseline_s_per_channel']:.1f} s: {r['time_ratio']:.0f}x less")
    if args.all:
        a = out["all"] = bench_all_channels(model, mean, std, size, cfg)
        print(f"  every channel ({a['channels']}) in one call: {a['seconds']:.0f} s ({a['s_per_channel']:.2f} s per "
              f"channel, {a['mean_steps_all']:.0f} steps on average)")
    if args.project:
        steps = out.get("all", out.get("compare", {})).get("mean_steps_all", out.get("compare", {}).get("mean_steps"))
        p = out["projection"] = project_resnet50(float(steps or cfg.steps), cfg.steps)
        print(f"  projection (not a measurement), ResNet-50 at 224 px, all {p['channels']} channels on one H200 at "
              f"{100 * p['efficiency']:.0f}% of peak: {p['tflop_per_step_all_rows']:.0f} TFLOP per step of all rows; "
              + ", ".join(f"{k} {v['mean_steps']:.1f} min ({v['max_steps']:.1f} at {p['max_steps']} steps)"
                          for k, v in p["minutes"].items())
              + f"; {p['max_saved_MB_per_row_fp32']:.0f} MB per row: {p['rows_at_once_fp32']} rows at once (fp32)")
    return {"featviz": out}


def run_placement(args: argparse.Namespace) -> dict:
    from ..bench.placement import bench_placement
    from ..store import PackedReader
    data = resolve_data(args.data)
    with PackedReader(data) as reader:
        size = args.image_size or reader.shape[-1]
    from ..config import TrainConfig
    cfg = TrainConfig(data=data, image_size=size, arch=args.arch, batch_size=args.batch_size, device=args.device,
                      log_every=10 ** 9)
    r = bench_placement(cfg, args.steps, args.memory_steps, args.port)
    t = r["throughput"]
    print(f"placement {args.arch} at {size} px on {args.device}: device {t['device']:.0f} img/s, host {t['host']:.0f} "
          f"({t['host_vs_device']:.2f}x), stream {t['stream']:.0f} ({t['stream_vs_device']:.2f}x)")
    for where, m in r["memory"].items():
        print(f"  2 ranks, {where}: peak RSS {m['peak_rss_MB'][0]:.0f} + {m['peak_rss_MB'][1]:.0f} MB, peak summed "
              f"PSS {m['peak_pss_sum_MB']:.0f} MB + node-shared {m['peak_shared_memory_MB']:.0f} MB, "
              f"file {m['file_MB']:.0f} MB")
    return {"placement": r}


def run_gpu(args: argparse.Namespace) -> dict:
    """The GPU check: pytest -m gpu, then each benchmark on CUDA; one table, one JSON (gpu.json)."""
    import subprocess

    import torch
    if not torch.cuda.is_available():
        raise ConfigError("benchmark gpu: no CUDA device is visible; hint: run it on a GPU node "
                         "(srun --gpus 1 python jobs/benchmark.py gpu)")
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], cwd=ROOT,
                           capture_output=True, text=True)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"pytest -m gpu: {summary}")
    ns = argparse.Namespace
    data = resolve_data(args.data)
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "pytest_gpu": summary,
                 "pytest_gpu_ok": tests.returncode == 0, "train": {}}
    for stem in ("cifar", "imagenet"):
        r = run_train(ns(data=data, arch="resnet18", stem=stem, device="cuda", batch_size=512, steps=30, workers=8,
                         compile=False, to_accuracy=False, target=0.8189, epochs=1, lr=0.2, out=args.out))
        out["train"][stem] = r["throughput"]
    out["dump"] = run_dump(ns(arch="resnet18", images=2048, image_size=32, batch_size=256, repeats=3,
                              device="cuda", dir=str(Path(args.out) / "dump-tmp")))
    out["deconv"] = run_deconv(ns(arch="resnet18", stem="cifar", batch_size=256, image_size=32, device="cuda",
                                  repeats=3))["deconv"]
    out["invert"] = run_invert(ns(run="", arch="resnet18", stem="cifar", data=data, split="val", images=64,
                                  single=1, steps=0, blocks="", device="cuda"))["invert"]
    from ..bench.viz import bench_viz_stage
    out["viz"] = bench_viz_stage(data, args.viz_images, Path(args.out) / "gpu-viz-run")
    out["seconds"] = time.perf_counter() - t0
    _print_gpu_table(out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {Path(args.out) / 'gpu.json'}")
    return {"gpu": out}


def _print_gpu_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table
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
    v = out["viz"]
    t.add_row("whole viz stage (every block, 3 paths, default inversion)",
              f"{v['images_per_s']:.1f} img/s ({v['images']} images in {v['seconds']:.0f} s)")
    Console().print(t)


@command
def main(args: argparse.Namespace) -> int:
    setup_logging()
    result = {"train": run_train, "dump": run_dump, "deconv": run_deconv, "invert": run_invert,
              "placement": run_placement, "gpu": run_gpu, "viz": run_viz, "examples": run_examples,
              "featviz": run_featviz}[args.bench](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
