"""The options of every benchmark (jobs/benchmark.py NAME), as config dataclasses: the command's parser is derived
from them like every other command's (hpcviz.cli.add_options), and each result JSON records the config that made it.

Options that mean what training's mean (--arch, --stem, --batch-size, ...) take TrainConfig's definition; every
benchmark has --device and --out. This module imports no torch: --help stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DEVICES, option, train_option

__all__ = ["BENCHMARKS", "Bench", "TrainBench", "DumpBench", "InvertBench", "DeconvBench", "PlacementBench",
           "VizBench", "ExamplesBench", "FeatvizBench", "GpuBench"]

DATA_AUTO = "auto | any --data form of launch_train.py (auto: the shared CIFAR-10 packed once, else builtin)"


@dataclass
class Bench:
    device: str = option("auto", "where both sides run (auto: CUDA where there is one)", choices=DEVICES)
    out: str = option("results/benchmarks", "where the result JSON is written")


@dataclass
class TrainBench(Bench):
    data: str = option("auto", DATA_AUTO)
    arch: str = train_option("arch", default="resnet20")
    stem: str = train_option("stem")
    batch_size: int = train_option("batch_size")
    steps: int = option(20, "timed steps of each loop", unit="steps")
    workers: int = option(2, "DataLoader workers of the plain loop")
    compile: bool = train_option("compile")
    to_accuracy: bool = option(False, "also train until --target (long on a CPU)")
    target: float = option(0.8189, "validation accuracy to reach (the course report's 81.89%)")
    epochs: int = train_option("epochs", default=15, help="length of the schedule for --to-accuracy")
    lr: float = train_option("lr")


@dataclass
class DumpBench(Bench):
    arch: str = train_option("arch", default="resnet20")
    images: int = option(512, "images written per variant", unit="images")
    image_size: int = train_option("image_size")
    batch_size: int = train_option("batch_size", default=64)
    repeats: int = option(3, "timings per variant; medians are reported")
    dir: str = option("results/benchmarks/dump-tmp", "where the test files are written")


@dataclass
class InvertBench(Bench):
    run: str = option("", "a trained run (default: the newest results/benchmarks/tta-resnet20-*)")
    arch: str = option("", "instead of --run: an untrained model of this arch")
    stem: str = train_option("stem")
    data: str = option("auto", "with --arch: where the images come from; " + DATA_AUTO)
    split: str = option("val", "with a trained run: val (held out) | train")
    images: int = option(16, "images inverted", unit="images")
    single: int = option(2, "images timed one at a time", unit="images")
    steps: int = option(0, "0 = the inversion's default step limit", unit="steps")
    blocks: str = option("", "comma-separated blocks (default: every block)")
    homotopy: bool = option(False, "instead: the default against the same without its homotopy (median and 90th "
                            "percentile error per block, seconds)")


@dataclass
class DeconvBench(Bench):
    arch: str = train_option("arch", default="resnet20")
    stem: str = train_option("stem")
    batch_size: int = train_option("batch_size", default=64)
    image_size: int = train_option("image_size")
    repeats: int = option(3, "timings per variant; medians are reported")


@dataclass
class PlacementBench(Bench):
    device: str = option("cpu", "where both sides run", choices=DEVICES)
    data: str = option("auto", "a packed FILE.h5 (auto: the shared CIFAR-10, packed)")
    image_size: int = option(0, "0 = the file's own size", unit="px")
    arch: str = train_option("arch", default="resnet20")
    batch_size: int = train_option("batch_size", default=128)
    steps: int = option(20, "timed steps per placement", unit="steps")
    memory_steps: int = option(5, "steps the 2-process memory runs train", unit="steps")
    port: int = option(29611, "the 2-process runs' rendezvous port")


@dataclass
class VizBench(Bench):
    run: str = option("", "a trained run: its held-out images are visualized")
    images: int = option(16, "images visualized", unit="images")
    split: str = option("val", "val (held out) | train")
    batch_size: int = option(64, "images per forward pass", unit="images")
    command: bool = option(False, "also (without --run: only) the whole `launch_viz.py --cluster local --images "
                           "N --tasks 1` here and at --baseline, each on a run its own code trains (hpcviz.bench."
                           "command), broken down into start-up, shard, projections, feature visualization, the rest")
    baseline: str = option("3cb6f04", "with --command: the git revision timed against this checkout (default: the "
                           "release before the speed work)")
    command_images: int = option(8, "with --command: images of the timed command", unit="images")
    command_epochs: int = option(4, "with --command: epochs of each side's run (ResNet-20, built-in data)",
                                 unit="epochs")


@dataclass
class ExamplesBench(Bench):
    data: str = option("auto", "the training split is visualized; " + DATA_AUTO)
    images: int = option(10000, "images visualized", unit="images")
    tasks: int = option(4, "array tasks (shards), run one after the other here")
    topk: int = option(9, "images kept per channel", unit="images")
    arch: str = train_option("arch", default="resnet18")
    stem: str = train_option("stem", default="cifar")
    image_size: int = train_option("image_size")
    batch_size: int = train_option("batch_size")
    project_channels: int = option(16, "channels per block whose projections are timed")


@dataclass
class FeatvizBench(Bench):
    run: str = option("", "a trained run: its network and normalisation")
    per_block: int = option(2, "channels per block compared with the baseline")
    baseline: str = option("auto", "auto: Lucent if it imports, else our loop one channel at a time with its "
                           "settings", choices=("auto", "lucent", "loop"))
    baseline_steps: int = option(512, "steps of the baseline (Lucent's default 512)", unit="steps")
    all: bool = option(False, "also time every channel of the network in one call")
    steps: int = option(0, "0 = the default step limit of ours", unit="steps")
    project: bool = option(False, "also project every channel of ResNet-50 at 224 px on one H200 (FLOPs, memory)")
    resnet50_seconds: float = option(0.0, "also time every channel of ResNet-50 at 224 px on --device for this "
                                     "long, block by block, the rest extrapolated by FLOPs (0: no)", unit="s")


@dataclass
class GpuBench(Bench):
    device: str = option("cuda", "the GPU check runs on CUDA", choices=("cuda",))
    data: str = option("auto", DATA_AUTO)
    viz_images: int = option(1024, "images in the one array task measured (what a GPU task holds by default)",
                             unit="images")


@dataclass
class GpuProjectionBench(Bench):
    arch: str = train_option("arch", default="resnet18")
    image_size: int = train_option("image_size")
    images: int = option(10000, "images projected", unit="images")
    steps: int = option(0, "inversion steps every row runs (0 = the inversion's limit: an upper bound)",
                        unit="steps")
    efficiency: float = option(0.4, "share of the H200's dense peak reached (fp32 67, bf16 989 TFLOP/s)")


# name -> (options, help, required options)
BENCHMARKS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "train": (TrainBench, "training step vs a plain loop; time to accuracy", ()),
    "dump": (DumpBench, "shard writer vs raw fsync'ed writes", ()),
    "invert": (InvertBench, "inversion: a batch vs one image at a time, error per block", ()),
    "deconv": (DeconvBench, "deconvnet: every block x 3 paths vs a Captum-style baseline", ()),
    "placement": (PlacementBench, "host/stream vs device-resident data: throughput and memory", ()),
    "viz": (VizBench, "the whole array task per image: the default vs the way of before; --command: the whole "
            "local command against a baseline revision", ()),
    "examples": (ExamplesBench, "dataset examples: the map's cost in an array task, the merge, the projections per "
                 "channel, exactness against a brute-force top-k", ()),
    "featviz": (FeatvizBench, "feature visualization: every channel of a block batched vs Lucent's render_vis one "
                "channel at a time (activation reached, time per channel)", ()),
    "gpu": (GpuBench, "the GPU check: pytest -m gpu and every benchmark on CUDA (< 8 min)", ()),
    "gpu-projection": (GpuProjectionBench, "without a GPU: the array's time for 10,000 images on one H200, "
                       "projected from FLOPs (both stems)", ()),
}

