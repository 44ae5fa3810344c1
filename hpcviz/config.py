"""Configs of every stage, as dataclasses: each option defined once, with its default, help and unit.

A config is the whole truth about how an artifact was made: it is written into every checkpoint,
`config.json`, the viz plan and every shard, and a later stage rebuilds everything from it. The
command-line parsers are derived from these fields (`hpcviz.cli.add_options`), and each config's
`validate()` checks a whole request before anything on disk changes (`ConfigError`, exit 2).
Recipes are named sets of training defaults; explicit flags always win.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InputError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet56")
CIFAR_ARCHS = ("resnet20", "resnet32", "resnet56")  # their own stem is cifar; torchvision's are imagenet
STEMS = ("imagenet", "cifar")
SCHEDULES = ("onecycle", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
PLACEMENTS = ("auto", "device", "host", "stream")
CLUSTERS = ("auto", "slurm", "local", "debug", "inline")
SPLITS = ("val", "train")
PATHS = ("both", "residual", "shortcut")  # deconvnet paths at a residual block
PRIORS = ("tv", "none")                   # inversion regulariser
COMPRESSIONS = ("", "gzip", "lzf")        # HDF5 filter of the shards ("" = none)
DATA_HELP = "builtin | builtin:N | cifar10:DIR | cifar10-test:DIR | DIR (<class>/*.jpg) | FILE.h5 (packed)"

C = TypeVar("C")


class ConfigError(InputError):
    """A config value that is not one of the valid choices, or out of its range."""


def option(default: Any = None, help: str = "", *, flag: str = "", unit: str = "", choices: Sequence[str] = (),
           factory: Any = None, cli: bool = True, const: Any = None, metavar: str = "") -> Any:
    """A config field and its command-line option: `flag` (default --<name with dashes>), `help`, `unit`,
    `choices` (shown in the help and checked by validate), `const`: the value of the flag given without one
    (`--resume` alone), `metavar`. `cli=False`: not an option."""
    meta = {"help": help, "flag": flag, "unit": unit, "choices": tuple(choices), "cli": cli, "const": const,
            "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def default_stem(arch: str) -> str:
    """The architecture's own stem: cifar for ResNet-20/32/56, imagenet for torchvision's."""
    return "cifar" if arch in CIFAR_ARCHS else "imagenet"


def check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        shown = [c or "''" for c in choices]
        raise ConfigError(f"{flag} {value!r}: not one of {', '.join(shown)}; hint: pick one of those, "
                          f"e.g. {flag} {shown[0]}")


def _num(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _bound(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_range(flag: str, value: float, low: float | None = None, high: float | None = None,
                high_open: bool = False, hint: str = "") -> None:
    """low <= value <= high (or < high when high_open); one ConfigError line otherwise."""
    bad = (low is not None and not value >= low) or (high is not None and not (
        value < high if high_open else value <= high))
    if bad:
        span = (f"at least {_bound(low)}" if high is None else
                f"in [{_bound(low)}, {_bound(high)}{')' if high_open else ']'}" if low is not None else
                f"at most {_bound(high)}")
        raise ConfigError(f"{flag} {_num(value)}: must be {span}; hint: {hint or 'drop it for the default'}")


def _checks(cfg: Any, ranges: Mapping[str, tuple[float | None, float | None]], prefix: str = "") -> None:
    """The choices of every field that has them, and the (low, high) ranges given per field name; flags
    are named as the command spells them (`prefix`, see flag_of)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("choices") and isinstance(value, str):
            check_choice(flag_of(f, prefix), value, f.metadata["choices"])
        if f.name in ranges and value is not None:
            check_range(flag_of(f, prefix), value, *ranges[f.name])


# Every seed: what numpy's generators (any integer >= 0) and torch.manual_seed (< 2**64) both accept, and no more
# than the legacy np.random.seed takes, so a seed means one stream everywhere
SEED_MAX = 2 ** 32 - 1


def check_seeds(cfg: Any, names: Sequence[str], prefix: str = "") -> None:
    """The seeds `names` of `cfg` in 0..SEED_MAX, refused with their option's name (e.g. --viz-seed)."""
    for f in dataclasses.fields(cfg):
        if f.name in names:
            value = getattr(cfg, f.name)
            flag = flag_of(f, prefix)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
                raise ConfigError(f"{flag} {value}: a seed is a whole number in [0, {SEED_MAX}] (what numpy's and "
                                  f"torch's generators all accept); hint: e.g. {flag} 0")


# options that training and visualization both have: where both are on one command line (the pipeline)
# the visualization's get a prefix, --viz-batch-size and so on
SHARED = ("split", "batch_size", "device", "seed")


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    """The option of field `f`; `prefix` goes before the names in SHARED."""
    name = f.name.replace("_", "-")
    return f.metadata.get("flag") or (f"--{prefix}{name}" if prefix and f.name in SHARED else f"--{name}")


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    data: str = option("builtin", DATA_HELP)
    image_size: int = option(32, "images are resized to this, square", unit="px")
    val_fraction: float = option(0.1, "share of the source carved out for validation, per class")
    split_seed: int = option(0, "seed of the train/val split (apart from --seed, so runs stay comparable)")
    skip_bad: bool = option(False, "skip unreadable image files (one warning with their count)")
    download: bool = option(False, "cifar10: download when missing (needs internet)")
    augment: bool = option(True, "random crop (pad 4 px) + horizontal flip", flag="--no-augment")
    data_placement: str = option("auto", "where the images live: the whole set on each device, one copy per node "
                                 "in shared memory, or streamed from the packed file", choices=PLACEMENTS)
    data_workers: int = option(2, "threads gathering batches ahead (host, stream placements)")
    arch: str = option("resnet18", "architecture", choices=ARCHS)
    stem: str = option("", "imagenet (7x7/2 conv + max-pool) | cifar (3x3/1); '' = the arch's own "
                       "(imagenet for resnet18/34/50, cifar for resnet20/32/56)", choices=("",) + STEMS)
    init: str = option("", "torchvision-format state dict to start from (e.g. pretrained weights)")
    epochs: int = option(30, "passes over the training split")
    batch_size: int = option(256, "GLOBAL images per step, split evenly over the processes", unit="images")
    lr: float = option(0.2, "peak learning rate for the global batch")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum", flag="--no-nesterov")
    weight_decay: float = option(5e-4, "L2 on conv/linear weights only (not BN, not biases)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    schedule: str = option("onecycle", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warm-up from lr/10 (onecycle, cosine)", unit="epochs")
    seed: int = option(0, "one seed for initialisation, order and augmentation")
    device: str = option("auto", "where to train", choices=DEVICES)
    amp: str = option("auto", "auto = bf16 autocast on GPUs with native bf16, else fp32", choices=AMP_MODES)
    channels_last: bool = option(True, "NHWC memory layout", flag="--no-channels-last")
    compile: bool = option(False, "torch.compile the model")
    eval_batch_size: int = option(1024, "images per rank per evaluation step", unit="images")
    log_every: int = option(50, "steps between progress lines in log files", unit="steps")
    checkpoint_every: int = option(0, "steps between checkpoints inside an epoch (0 = only at epoch ends)",
                                   unit="steps")
    checkpoint_minutes: float = option(10.0, "a checkpoint at the first epoch end this long after the last one (0 = "
                                       "every epoch); always at the end and on a stop signal (time limit, "
                                       "preemption, requeue)", unit="minutes")
    dist_timeout_min: float = option(30.0, "the rendezvous and the first collective (ranks may still be "
                                     "loading data)", flag="--dist-timeout", unit="minutes")
    collective_timeout_min: float = option(10.0, "every later collective (a hung rank ends the job)",
                                           flag="--collective-timeout", unit="minutes")
    recipe: str = option("default", "default | seed: named defaults, that explicit options override; seed = the "
                         "course report (ResNet-18, lr 0.0005, batch 256, 900 epochs, no schedule)")
    resume: str = option("", "continue the run's last checkpoint (--resume alone: auto), or the checkpoint given "
                         "('' = a fresh run)", const="auto", metavar="PATH")
    run_dir: str = option("results/default", "the run directory (default results/<arch>-<data>)", flag="--run")

    def resolved_stem(self) -> str:
        return self.stem or default_stem(self.arch)

    def validate(self) -> TrainConfig:
        _checks(self, {"image_size": (1, None), "epochs": (1, None), "batch_size": (1, None),
                       "eval_batch_size": (1, None), "data_workers": (1, None), "log_every": (1, None),
                       "checkpoint_every": (0, None), "checkpoint_minutes": (0, None), "momentum": (0, 1),
                       "weight_decay": (0, None),
                       "warmup_epochs": (0, None)})
        check_seeds(self, ("seed", "split_seed"))
        check_range("--val-fraction", self.val_fraction, 0, 1, high_open=True, hint="e.g. --val-fraction 0.1")
        if self.val_fraction <= 0:
            raise ConfigError(f"--val-fraction {_num(self.val_fraction)}: must be above 0 (the validation split "
                              "would be empty); hint: e.g. --val-fraction 0.1")
        check_range("--label-smoothing", self.label_smoothing, 0, 1, high_open=True, hint="e.g. --label-smoothing 0.1")
        for flag, value in (("--lr", self.lr), ("--dist-timeout", self.dist_timeout_min),
                            ("--collective-timeout", self.collective_timeout_min)):
            if not value > 0:
                raise ConfigError(f"{flag} {_num(value)}: must be positive; hint: drop it for the default")
        if self.init and not os.path.isfile(self.init):
            raise ConfigError(f"--init {self.init}: no such file; hint: a torchvision-format state dict saved with "
                              "torch.save(model.state_dict(), PATH)")
        return self


# Named recipes: defaults that a user asks for by name; explicit flags override them.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The course report exactly: SGD momentum 0.9, lr 0.0005, batch 256, 900 epochs,
    # no schedule, no weight decay, no label smoothing, ResNet-18 with the 7x7 stride-2 stem.
    "seed": dict(arch="resnet18", stem="imagenet", lr=0.0005, momentum=0.9, nesterov=False,
                 batch_size=256, epochs=900, schedule="constant", warmup_epochs=0.0,
                 weight_decay=0.0, label_smoothing=0.0),
}


def make_train_config(overrides: Mapping[str, Any], recipe: str = "default") -> TrainConfig:
    """Build a TrainConfig: dataclass defaults < recipe < explicit overrides (None = not given)."""
    check_choice("--recipe", recipe, tuple(RECIPES))
    values: dict[str, Any] = dict(RECIPES[recipe])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["recipe"] = recipe
    return config_from_dict(TrainConfig, values).validate()


# ------------------------------------------------------------------------------------------ launching
@dataclass
class LaunchConfig:
    cluster: str = option("auto", "auto = slurm where sbatch exists, else local; local = subprocesses here; "
                          "debug = this process; inline = one rank of srun/torchrun", choices=CLUSTERS)
    gpus: int | None = option(None, "GPUs per node, one task each (default: 1 where there is a GPU, else 0)")
    nproc: int = option(1, "CPU processes per node when --gpus 0 (gloo DDP)")
    nodes: int = option(1, "nodes")
    cpus_per_task: int = option(0, "CPUs per task (0 = the profile's)")
    mem_gb: int = option(0, "memory per node (0 = the profile's)", unit="GiB")
    time_min: int = option(0, "wall-clock limit (0 = the profile's on SLURM, none locally)", flag="--time",
                           unit="minutes")
    partition: str = option("", "SLURM partition (default: the profile's)")
    account: str = option("", "SLURM account")
    qos: str = option("", "SLURM QOS")
    constraint: str = option("", "SLURM node constraint")
    profile: str = option("", "cluster profile: a name in slurm/profiles/ or a path to an .ini "
                          "(default $HPCVIZ_PROFILE or default)")
    wait: bool = option(False, "follow the job until it ends and exit with its outcome")
    throttle: int = option(0, "at most this many array tasks at once (SLURM; 0 = no limit)")
    extra: dict[str, str] = option(factory=dict, help="raw extra sbatch options", cli=False)

    def tasks_per_node(self) -> int:
        """One task per GPU, else --nproc CPU processes."""
        return self.gpus if self.gpus else max(1, self.nproc)

    def job_device(self, device: str) -> str:
        """The device a job is told to use: cpu where this launch (resolved) asks for no GPU, so that a CPU run never
        initialises CUDA, even on a node whose GPUs it can see; else `device`."""
        return "cpu" if device == "auto" and self.gpus == 0 else device

    def validate(self) -> LaunchConfig:
        _checks(self, {"nproc": (1, None), "nodes": (1, None), "cpus_per_task": (0, None), "mem_gb": (0, None),
                       "time_min": (0, None), "throttle": (0, None), "gpus": (0, None)})
        return self


# ------------------------------------------------------------------------------------------ visualization

GPU_TASK_IMAGES = 1024  # images of 32 px per GPU array task by default (see default_per_task)


def default_per_task(gpu: bool, image_size: int) -> int:
    """Images per array task when neither --tasks nor --per-task says. CPU: 100 (~2 min of work at the
    default inversion's ~1.1 s per image, measured, beside a start of a few seconds). GPU: an image's work
    shrinks by orders of magnitude while a task's start (interpreter, torch, CUDA context, weights, data)
    does not, so a task holds the work of GPU_TASK_IMAGES images at 32 px: fewer for larger images (the
    work grows with the pixels), at least 16 (not measured on a GPU yet: --per-task and --tasks win)."""
    if not gpu:
        return 100
    return max(16, GPU_TASK_IMAGES * 32 * 32 // max(1, image_size * image_size))


@dataclass
class VizConfig:
    run_dir: str = option("", "a trained run directory (holds checkpoints/)", flag="--run")
    split: str = option("val", "the split of the run's data the images come from", choices=SPLITS)
    images: int = option(200, "images in a class-balanced, seeded sample of the split")
    indices: list[int] = option(factory=list, help="explicit comma-separated positions in the split "
                                "(overrides --images)")
    tasks: int | None = option(None, "array tasks = shards (default: from --per-task)")
    per_task: int | None = option(None, "images per task when --tasks is not given (default: by the task-size rule: "
                                          "100 on a CPU, on a GPU 1024 at 32 px and fewer for larger images)")
    batch_size: int = option(64, "images per forward pass", unit="images")
    blocks: list[str] = option(factory=list, help="blocks to dump, comma-separated (default: every block)")
    deconv_blocks: list[str] = option(factory=lambda: ["all"], help="blocks to reconstruct with the deconvnet: "
                                      "all | none | names")
    paths: list[str] = option(factory=lambda: list(PATHS), help=f"deconvnet paths at residual blocks: "
                              f"{', '.join(PATHS)}")
    topk: int = option(9, "dataset examples: the images kept per channel of every dumped block, those of its "
                       "largest spatial-max activation (0 = none)", unit="images")
    example_size: int = option(64, "dataset examples: patches and projections are stored at most this many pixels "
                               "a side (a larger receptive field is downsampled)", unit="pixels")
    invert_blocks: list[str] = option(factory=lambda: ["default"], help="blocks to invert: default (conv1 + "
                                      "each stage's last block) | all | none | names")
    invert_steps: int = option(0, "at most this many optimisation steps per inversion (0 = the inversion's "
                               "default, 800)", unit="steps")
    invert_target: float = option(0.05, "an inversion stops once its relative feature error is at most this "
                                  "(0 = run every step)")
    invert_solver: str = option("lbfgs", "the inversion's optimiser (see hpcviz.rowopt)", choices=("lbfgs", "adam"))
    invert_batch_size: int = option(0, "images inverted together (0 = 64 on a CPU; on a GPU the most, up to 1024, "
                                    "that fit its free memory: explain.invmem)", unit="images")
    prior: str = option("tv", "tv (Mahendran & Vedaldi) | none (plain sum of squared errors)", choices=PRIORS)
    featviz_blocks: list[str] = option(factory=lambda: ["auto"], help="feature visualization: the blocks whose every "
                                       "channel gets an input optimised to excite it (an array of its own, split by "
                                       "channels): all | none | names | auto (all, but none in a local run on CPUs, "
                                       "where it costs minutes to hours: --featviz-blocks all asks for it there)")
    featviz_steps: int = option(0, "feature visualization: at most this many steps per channel (0 = its default, 128; "
                                "a channel stops earlier once its activation stops rising)", unit="steps")
    featviz_batch_size: int = option(0, "feature visualization: channels optimised at once (0 = as many as fit in half "
                                     "the free memory)", unit="channels")
    compression: str = option("", "HDF5 filter of the shards ('' = none, fastest)", choices=COMPRESSIONS)
    device: str = option("auto", "where each task computes", choices=DEVICES)
    seed: int = option(0, "seed of the image sample")
    fast: bool = option(False, "GPUs: TF32 convolutions and atomic unpooling (faster; ~1e-3 off the exact default)")
    exact: bool = option(False, "GPUs: the inversion's and the feature visualization's optimisation in exact fp32 "
                         "too (default: bf16 autocast, channels-last; the stored errors and values are recomputed "
                         "exactly either way)")

    def n_tasks(self, gpu: bool = False, image_size: int = 32) -> int:
        """Array tasks: --tasks, else enough tasks of --per-task images (default_per_task when not given); never more
        than there are images."""
        n = len(self.indices) or self.images
        return min(self.tasks or -(-n // (self.per_task or default_per_task(gpu, image_size))), n)

    def sized(self, gpu: bool, image_size: int) -> VizConfig:
        """This request with --per-task resolved (default_per_task when not given), so that whoever plans it again
        (the pipeline's training job, a retry) splits the images the same way."""
        return self if self.per_task else dataclasses.replace(self, per_task=default_per_task(gpu, image_size))

    def featviz_here(self, cluster: str) -> VizConfig:
        """--featviz-blocks auto resolved for a launch on `cluster`, with `device` already the job's: every block,
        but none in a local (or debug) run on CPUs. There it is most of the run and grows with the network, not
        the images: 45 s of a 60 s 8-image ResNet-20 run on 2 cores, hours for ResNet-18 at 224 px."""
        if self.featviz_blocks != ["auto"]:
            return self
        cpu_here = cluster in ("local", "debug") and self.device == "cpu"
        if cpu_here:
            logging.getLogger("hpcviz").info("feature visualization: off by default in a local run on CPUs (minutes "
                                             "to hours); --featviz-blocks all computes it for every channel")
        return dataclasses.replace(self, featviz_blocks=[] if cpu_here else ["all"])

    def validate(self, prefix: str = "") -> VizConfig:
        """`prefix`: how the shared flags are spelt in this command (the pipeline's --viz-batch-size)."""
        _checks(self, {"images": (1, None), "tasks": (1, None), "per_task": (1, None), "batch_size": (1, None),
                       "invert_steps": (0, None), "invert_target": (0, 1), "invert_batch_size": (0, None),
                       "topk": (0, None), "example_size": (8, None), "featviz_steps": (0, None),
                       "featviz_batch_size": (0, None)}, prefix)
        check_seeds(self, ("seed",), prefix)
        if any(i < 0 for i in self.indices):
            raise ConfigError(f"--indices {min(self.indices)}: positions start at 0; hint: --indices 0,1,2")
        bad = [p for p in self.paths if p not in PATHS]
        if bad or (self.deconv_blocks and not self.paths):
            raise ConfigError(f"--paths {','.join(self.paths) or 'none'}: valid paths are {', '.join(PATHS)}; "
                              "hint: --paths both")
        return self


# ------------------------------------------------------------------------------------------ report
@dataclass
class AggregateConfig:
    run_dir: str = option("", "the run directory (results/<run>)", flag="--run")
    images: int = option(3, "images shown in the feature-map and deconvnet figures", flag="--report-images")
    invert_images: int = option(4, "images in the inversion figure")
    channels: int = option(8, "strongest channels per block in the feature-map figures")
    example_channels: int = option(4, "most class-selective channels per block shown in the dataset-examples "
                                   "section (every block's full grid is linked)")
    projections: bool = option(True, "project each channel's top activations with the deconvnet where the "
                               "projection array left them undone (viz/examples/part-*.h5)", flag="--no-projections")
    featviz: bool = option(True, "compute the feature visualizations that the featviz array left undone "
                           "(viz/featviz/part-*.h5)", flag="--no-featviz")
    projection_device: str = option("auto", "where the projections and feature visualizations are computed",
                                    choices=DEVICES)
    embed: bool = option(True, "report.html embeds its figures (self-contained)", flag="--no-embed")
    dpi: int = option(100, "PNG resolution", unit="dots per inch", cli=False)

    def validate(self) -> AggregateConfig:
        _checks(self, {"images": (1, None), "invert_images": (1, None), "channels": (1, None), "dpi": (10, None),
                       "example_channels": (1, None)})
        return self


# ------------------------------------------------------------------------------------------ evaluation
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class EvalConfig:
    run_dir: str = option("", "run directory holding checkpoints/", flag="--run")
    data: str = option("", DATA_HELP)
    name: str = option("", "the result goes to eval-<name>.json in the run (default: from --data)")
    device: str = option("auto", "where to evaluate", choices=DEVICES)
    batch_size: int = option(512, "images per step", unit="images")

    def validate(self) -> EvalConfig:
        _checks(self, {"batch_size": (1, None)})
        if not self.data:
            raise ConfigError("--data: required; hint: e.g. --data cifar10-test:DIR")
        if not _NAME.fullmatch(self.name) or ".." in self.name:
            raise ConfigError(f"--name {self.name!r}: letters, digits, '_', '.' and '-' only, not starting with "
                              "'.' or '-' (it names eval-<name>.json inside the run); hint: e.g. --name test")
        return self


def default_eval_name(data: str) -> str:
    """A --name from --data: 'cifar10-test:/d/x' -> 'x', '/data/heldout/' -> 'heldout'."""
    base = os.path.basename(data.rstrip("/").split(":")[-1]) or data
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(base)[0]).lstrip("._-") or "data"


# ------------------------------------------------------------------------------------------ packing
@dataclass
class PackConfig:
    data: str = option("", f"image set to pack: {DATA_HELP}")
    out: str = option("", "the packed .h5 file to write")
    image_size: int | None = option(None, "resize to S x S (default: keep; builtin: 32)", unit="px")
    skip_bad: bool = option(False, "skip unreadable image files (one warning with their count)")
    download: bool = option(False, "cifar10:DIR: download when missing")
    seed: int = option(0, "seed of the builtin set")
    force: bool = option(False, "overwrite an existing --out")

    def validate(self) -> PackConfig:
        _checks(self, {"image_size": (1, None)})
        check_seeds(self, ("seed",))
        for flag, value in (("--data", self.data), ("--out", self.out)):
            if not value:
                raise ConfigError(f"{flag}: required; hint: python jobs/pack_data.py --data DIR --out FILE.h5")
        if not self.out.lower().endswith((".h5", ".hdf5")):
            raise ConfigError(f"--out {self.out}: must end in .h5 (it is read back by that name); "
                              "hint: e.g. --out data/cifar10-train.h5")
        return self


# ------------------------------------------------------------------------------------------ (de)serialising
def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Rebuild a config dataclass from a dict, refusing unknown keys (a typo is an error)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; valid fields: {', '.join(sorted(names))}")
    return cls(**dict(values))


def dumps(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------ importing
NORMALIZATIONS = ("imagenet", "data", "custom")
# torchvision's ImageNet statistics, on the [0, 1] scale: what the weights of torchvision.models expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Triple = tuple[float, float, float]


def train_option(name: str, **changes: Any) -> Any:
    """TrainConfig's option `name` (default, help, flag, unit, choices), with `changes`: an option that means the
    same in both commands is defined once, and an imported run records the keys a trained run has."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    meta = {**f.metadata, "default": f.default, **changes}
    return option(meta["default"], meta["help"], flag=meta["flag"], unit=meta["unit"], choices=meta["choices"])


def _triple(flag: str, text: str, low: float, low_open: bool) -> Triple:
    """'R,G,B' as three floats on the [0, 1] scale (above `low` when low_open); one ConfigError line otherwise."""
    try:
        r, g, b = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: three comma-separated numbers R,G,B on the [0, 1] scale expected; "
                          f"hint: e.g. {flag} {','.join(map(str, IMAGENET_MEAN if flag == '--mean' else IMAGENET_STD))}"
                          ) from None
    for v in (r, g, b):
        if not (low < v if low_open else low <= v) or not v <= 1:  # NaN fails both
            raise ConfigError(f"{flag} {text}: each value must be in {'(' if low_open else '['}{low:g}, 1] (the "
                              "[0, 1] pixel scale, not 0..255); hint: divide 0..255 statistics by 255")
    return r, g, b


@dataclass
class ImportConfig:
    weights: str = option("", "the state dict to import, in torchvision's layout: plain, or under a 'state_dict' or "
                          "'model' entry; 'module.' prefixes (DataParallel) are dropped")
    arch: str = train_option("arch")
    stem: str = train_option("stem")
    data: str = train_option("data", help=f"the data the model classifies: its classes, and the validation split "
                              f"carved as training would: {DATA_HELP}")
    image_size: int = train_option("image_size")
    val_fraction: float = train_option("val_fraction")
    split_seed: int = train_option("split_seed")
    skip_bad: bool = train_option("skip_bad")
    download: bool = train_option("download")
    normalize: str = option("imagenet", "the input normalisation the weights expect: imagenet = torchvision's "
                            "mean/std (its pretrained weights); data = the training split's statistics, as training "
                            "computes them (weights trained by hpcviz); custom = --mean and --std",
                            choices=NORMALIZATIONS)
    mean: str = option("", "--normalize custom: per-channel mean R,G,B on the [0, 1] scale, e.g. 0.5,0.5,0.5")
    std: str = option("", "--normalize custom: per-channel std R,G,B on the [0, 1] scale, e.g. 0.25,0.25,0.25")
    evaluate: bool = option(True, "evaluate on the validation and training splits (eval.json), as training does at "
                            "its end", flag="--no-eval")
    device: str = option("auto", "where to evaluate", choices=DEVICES)
    eval_batch_size: int = train_option("eval_batch_size")
    run_dir: str = option("", "the run directory to make (it must not hold a run yet)", flag="--run")

    def stats(self) -> tuple[Triple, Triple] | None:
        """(mean, std) of --normalize imagenet or custom; None for data (the training split's, computed then)."""
        if self.normalize != "custom":
            if self.mean or self.std:
                raise ConfigError(f"--mean/--std with --normalize {self.normalize}: they are read only with "
                                  "--normalize custom; hint: add --normalize custom, or drop them")
            return (IMAGENET_MEAN, IMAGENET_STD) if self.normalize == "imagenet" else None
        if not (self.mean and self.std):
            raise ConfigError("--normalize custom needs --mean and --std; hint: e.g. --mean 0.5,0.5,0.5 "
                              "--std 0.25,0.25,0.25")
        return _triple("--mean", self.mean, 0.0, False), _triple("--std", self.std, 0.0, True)

    def train_config(self) -> TrainConfig:
        """The "train" config the imported run records: every TrainConfig key, this request's values where they
        mean the same, training's defaults elsewhere; `init` names the weights and `recipe` says 'import' (the
        report's training table shows it), since no epoch ran here."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(self, f.name)}
        return TrainConfig(**shared, init=self.weights, recipe="import").validate()

    def validate(self) -> ImportConfig:
        _checks(self, {"eval_batch_size": (1, None)})
        for flag, value in (("--weights", self.weights), ("--run", self.run_dir)):
            if not value:
                raise ConfigError(f"{flag}: required; hint: python jobs/import_model.py --weights FILE --arch "
                                  "resnet50 --data SOURCE --run DIR")
        if not os.path.isfile(self.weights):
            raise ConfigError(f"--weights {self.weights}: no such file; hint: save one with "
                              "torch.save(model.state_dict(), FILE)")
        self.stats()
        self.train_config()  # the options shared with training, checked as training checks them
        return self
