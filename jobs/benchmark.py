"""Benchmarks, each a ratio against a baseline measured in the same run: `python jobs/benchmark.py train --device cpu`

  train   images/s of the project's training step vs a plain eager fp32 DataLoader loop
          (same data, model, batch), then with --to-accuracy the epochs and minutes until
          validation accuracy reaches --target (81.89%, the course report's figure).
  invert  images/s of a batched inversion vs one image at a time, and the median relative
          feature error per block (a trained ResNet-20 by default).
  deconv  ms/image of every block x 3 deconvnet paths vs a Captum-style baseline (a full
          forward + backward per block and path), and their largest relative difference.
  dump    MB/s of the HDF5 shard writer vs writing the same bytes raw with fsync, for each
          compression offered, and the bytes per image per block of ResNet-18 (both stems)
          and ResNet-20.

--data auto uses ../shared/data/cifar10-train-jpeg.tar.gz when it exists (unpacked and packed
once into data/cifar10-train.h5), else the built-in set. Results go to results/benchmarks/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
PACKED = ROOT / "data" / "cifar10-train.h5"


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("hpcviz benchmarks", add_help=add_help)
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
    from hpcviz.data import fingerprint, load_images
    from hpcviz.store import write_packed
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
    from hpcviz.bench import bench_train_throughput, time_to_accuracy
    from hpcviz.config import make_train_config
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

    from hpcviz.bench import block_bytes, sample_activations
    from hpcviz.store import ShardWriter
    blocks = sample_activations(args.arch, "", args.image_size, args.batch_size)  # {block: (b, C, h, w) fp16}
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

    from hpcviz.bench import bench_invert
    from hpcviz.data import channel_stats, load_images, normalize
    from hpcviz.models import block_names, build_model
    if args.arch:
        model, label = build_model(args.arch, 10, args.stem).eval(), f"{args.arch} (untrained)"
        mean = std = None
    else:
        runs = sorted(Path("results/benchmarks").glob("tta-resnet20-*/checkpoints")) if not args.run else \
            [Path(args.run) / "checkpoints"]
        if not runs:
            raise ValueError("--run: no trained run found; hint: python jobs/benchmark.py train --to-accuracy, "
                             "or pass --run results/<run>, or --arch resnet20 for an untrained model")
        from hpcviz.checkpoint import load_checkpoint
        state = load_checkpoint(runs[-1])
        model = build_model(state["config"]["arch"], len(state["classes"]), state["config"]["stem"])
        model.load_state_dict(state["model"])
        model.eval()
        label, mean, std = f"{state['config']['arch']} trained ({runs[-1].parent.name})", state["mean"], state["std"]
    if args.arch:
        ds = load_images(resolve_data(args.data), 32)
        torch.manual_seed(0)
        pixels = ds.images[torch.randperm(len(ds))[: args.images]]
        mean, std = channel_stats(ds.images)
    else:  # a class-balanced sample of the run's own split: held-out images unless --split train
        from hpcviz.viz import balanced_sample, load_split
        split_x, split_y, _ = load_split(state["config"], args.split)
        pixels = split_x[torch.as_tensor(balanced_sample(split_y.numpy(), args.images, seed=0))]
        label += f", {args.split} split"
    x = normalize(pixels, mean, std)
    blocks = [b for b in args.blocks.split(",") if b] or block_names(model)
    r = bench_invert(model, x, mean, std, blocks, args.steps or None, args.single)
    print(f"invert {label}, {r['images']} images, {r['steps']} steps: batched {r['batched_images_per_s']:.3f} "
          f"img/s vs one at a time {r['one_at_a_time_images_per_s']:.3f} img/s, ratio {r['ratio']:.1f}x "
          f"(max |diff| {r['max_abs_diff_batched_vs_single']:.1e})")
    print("median relative feature error: " + ", ".join(f"{b} {e:.3f}" for b, e in r["median_error"].items()))
    return {"invert": {**r, "model": label}}


def run_deconv(args: argparse.Namespace) -> dict:
    from hpcviz.bench import bench_deconv
    r = bench_deconv(args.arch, args.stem, args.batch_size, args.image_size, args.device, args.repeats)
    print(f"deconv {r['arch']} ({r['stem']} stem) on {r['device']}, batch {r['batch']} at {r['image_size']} px, "
          f"{r['reconstructions']} reconstructions (blocks x paths): {r['ours_ms_per_image']:.1f} ms/image vs "
          f"Captum-style {r['baseline_ms_per_image']:.1f} ms/image, speed-up {r['speedup']:.1f}x "
          f"(max relative difference {r['max_rel_diff_vs_baseline']:.1e})")
    return {"deconv": r}


def main(args: argparse.Namespace) -> int:
    from hpcviz.log import setup_logging
    setup_logging()
    try:
        result = {"train": run_train, "dump": run_dump, "deconv": run_deconv, "invert": run_invert}[args.bench](args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0])
                          .parse_args()))
