"""Configs of every stage, as dataclasses with units in comments.

A config is the whole truth about how an artifact was made: it is written into
every checkpoint and into `config.json`, and a later stage rebuilds everything
from it. Recipes are named sets of defaults; explicit flags always win.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet20", "resnet32", "resnet56")
STEMS = ("imagenet", "cifar")
SCHEDULES = ("onecycle", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
PLACEMENTS = ("auto", "device", "host", "stream")


class ConfigError(ValueError):
    """A config value that is not one of the valid choices."""


@dataclass
class TrainConfig:
    # data
    data: str = "builtin"             # builtin | builtin:N | cifar10:DIR | DIR | FILE.h5
    image_size: int = 32              # px, square; images are resized to this
    val_fraction: float = 0.1         # share of the source carved out for validation
    split_seed: int = 0               # seed of the train/val split (apart from --seed, so runs stay comparable)
    skip_bad: bool = False            # skip unreadable image files (warn with a count) instead of stopping
    download: bool = False            # cifar10: download when missing (needs internet)
    augment: bool = True              # random crop (pad 4 px) + horizontal flip, batched on the device
    data_placement: str = "auto"      # auto | device | host | stream: where the images live (hpcviz.placement)
    data_workers: int = 2             # threads gathering batches ahead (host, stream placements)
    # model
    arch: str = "resnet18"            # one of ARCHS
    stem: str = ""                    # imagenet | cifar; "" = imagenet for resnet18/34/50, cifar for resnet20/32/56
    init: str = ""                    # path of a torchvision-format state dict to start from ("" = random)
    # optimisation
    epochs: int = 30                  # passes over the training split
    batch_size: int = 256             # images per step, GLOBAL (split evenly over the ranks)
    lr: float = 0.2                   # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4        # L2 on conv/linear weights only (not BN, not biases)
    label_smoothing: float = 0.1
    schedule: str = "onecycle"        # one of SCHEDULES
    warmup_epochs: float = 1.0        # epochs of linear warm-up from lr/10 (onecycle, cosine)
    # execution
    seed: int = 0                     # one seed for initialisation, order and augmentation
    device: str = "auto"              # auto | cpu | cuda
    amp: str = "auto"                 # auto = bf16 autocast on GPUs with native bf16, else fp32
    channels_last: bool = True        # NHWC memory layout (faster on GPUs and on CPUs with oneDNN)
    compile: bool = False             # torch.compile the model
    eval_batch_size: int = 1024       # images per rank per evaluation step
    log_every: int = 50               # steps between progress lines in log files
    checkpoint_every: int = 0         # steps between checkpoints inside an epoch (0 = only at epoch ends)
    dist_timeout_min: float = 30.0    # minutes: rendezvous and first collective (ranks may still be loading data)
    collective_timeout_min: float = 10.0  # minutes: every later collective (a hung rank ends the job)
    recipe: str = "default"           # name of the recipe the defaults came from
    resume: str = ""                  # "" = fresh run, "auto" = continue run_dir's last checkpoint, or a checkpoint path
    # where
    run_dir: str = "results/default"  # the run directory; created if missing

    def resolved_stem(self) -> str:
        if self.stem:
            return self.stem
        return "cifar" if self.arch in ("resnet20", "resnet32", "resnet56") else "imagenet"

    def validate(self) -> "TrainConfig":
        _check_choice("--arch", self.arch, ARCHS)
        if self.stem:
            _check_choice("--stem", self.stem, STEMS)
        _check_choice("--schedule", self.schedule, SCHEDULES)
        _check_choice("--amp", self.amp, AMP_MODES)
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--data-placement", self.data_placement, PLACEMENTS)
        for name, minutes in (("--dist-timeout", self.dist_timeout_min),
                              ("--collective-timeout", self.collective_timeout_min)):
            if not minutes > 0:
                raise ConfigError(f"{name} {minutes}: minutes, must be positive; hint: e.g. {name} 30")
        if self.data_workers < 1:
            raise ConfigError(f"--data-workers {self.data_workers}: must be at least 1; hint: e.g. --data-workers 2")
        for name, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--image-size", self.image_size), ("--eval-batch-size", self.eval_batch_size)):
            if value < 1:
                raise ConfigError(f"{name} {value}: must be a positive integer")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.1")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be positive, e.g. 0.1")
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


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value!r}: not one of {', '.join(choices)}; "
                          f"hint: pick one of those, e.g. {flag} {choices[0]}")


def make_train_config(overrides: Mapping[str, Any], recipe: str = "default") -> TrainConfig:
    """Build a TrainConfig: dataclass defaults < recipe < explicit overrides (None = not given)."""
    _check_choice("--recipe", recipe, tuple(RECIPES))
    values: dict[str, Any] = dict(RECIPES[recipe])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["recipe"] = recipe
    return config_from_dict(TrainConfig, values).validate()


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass from a dict, refusing unknown keys (a typo is an error)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; valid fields: {', '.join(sorted(names))}")
    return cls(**dict(values))


def dumps(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2, sort_keys=True)


@dataclass
class LaunchConfig:
    cluster: str = "auto"             # auto | slurm | local | debug
    gpus: int | None = None           # GPUs per node (one task per GPU); 0 = CPU; None = launch.resolve_gpus
    nproc: int = 1                    # CPU processes per node when gpus == 0 (gloo DDP)
    nodes: int = 1
    cpus_per_task: int = 0            # 0 = profile default
    mem_gb: int = 0                   # per node, GiB; 0 = profile default
    time_min: int = 0                 # wall-clock limit, minutes; 0 = profile default
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    profile: str = ""                 # name or path of a cluster profile (slurm/profiles/*.ini)
    wait: bool = False                # follow the job until it ends
    extra: dict[str, str] = field(default_factory=dict)  # raw extra sbatch options
