"""ResNets with stable block names and torchvision's parameter names.

- resnet18/34/50: torchvision's own ResNet class, so a checkpoint loads into
  `torchvision.models.resnetXX` and torchvision's weights can initialise training.
  Stem `imagenet` = 7x7 stride-2 conv1 + 3x3 stride-2 max-pool (the course report's);
  stem `cifar` = 3x3 stride-1 conv1 and no max-pool (an nn.Identity keeps the name).
- resnet20/32/56: the CIFAR ResNets of He et al. 2016 (three stages of 16/32/64
  channels, 3 n BasicBlocks each), built from torchvision's BasicBlock with 1x1
  projection shortcuts where the shape changes (the paper's option B), so the
  parameter names follow the same scheme (`layerX.Y.conv1`, `...downsample.0`, `fc`).

Every model has the modules conv1, bn1, relu, maxpool, layer1..layerN, avgpool, fc;
`block_names` lists the explainable blocks: 'conv1' (the stem after its ReLU) and
each residual block by module name ('layer1.0', ...).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tvr

from .config import ARCHS, STEMS, default_stem
from .errors import InputError

log = logging.getLogger("hpcviz")

_TORCHVISION = {"resnet18": (tvr.BasicBlock, [2, 2, 2, 2]),
                "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
                "resnet50": (tvr.Bottleneck, [3, 4, 6, 3])}
_CIFAR_DEPTH = {"resnet20": 3, "resnet32": 5, "resnet56": 9}


class UnknownArchError(InputError):
    """An architecture or stem name that is not offered."""


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet (6n+2 layers), with torchvision's module names."""

    def __init__(self, n: int, num_classes: int = 10, stem: str = "cifar", width: int = 16) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1, self.maxpool = _make_stem(stem, 3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, n, stride=1)
        self.layer2 = self._make_layer(2 * width, n, stride=2)
        self.layer3 = self._make_layer(4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [tvr.BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [tvr.BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_stem(stem: str, in_ch: int, width: int) -> tuple[nn.Conv2d, nn.Module]:
    if stem == "imagenet":
        return (nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
    return (nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.Identity())


def _init_weights(model: nn.Module) -> None:
    # torchvision's initialisation, so that all archs start alike
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(arch: str, num_classes: int, stem: str = "") -> nn.Module:
    """A fresh model; stem '' picks the arch's own (imagenet for 18/34/50, cifar for 20/32/56)."""
    if arch not in ARCHS:
        raise UnknownArchError(f"--arch {arch!r}: not one of {', '.join(ARCHS)}; hint: e.g. --arch resnet18")
    stem = stem or default_stem(arch)
    if stem not in STEMS:
        raise UnknownArchError(f"--stem {stem!r}: not one of {', '.join(STEMS)}; "
                               "hint: e.g. --stem cifar for 32 px images")
    if arch in _CIFAR_DEPTH:
        return CifarResNet(_CIFAR_DEPTH[arch], num_classes, stem)
    block, layers = _TORCHVISION[arch]
    torch_model = tvr.ResNet(block, layers, num_classes=num_classes)
    if stem == "cifar":
        torch_model.conv1, torch_model.maxpool = _make_stem("cifar", 3, 64)
        nn.init.kaiming_normal_(torch_model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return torch_model


@functools.lru_cache(maxsize=16)
def shape_model(arch: str, num_classes: int = 10, stem: str = "") -> nn.Module:
    """The architecture on the meta device, in eval mode, for shapes and costs (nothing is computed): built
    once per architecture (its initialisation on meta costs ~0.07 s, asked for by every part and check).
    Shared: read it, hook it (and remove the hooks), never change it."""
    with torch.device("meta"):
        return build_model(arch, num_classes, stem).eval()


def from_checkpoint(state: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a checkpoint (checkpoint.load_checkpoint's dict), in eval mode on `device`."""
    cfg = state["config"]
    model = build_model(cfg["arch"], len(state["classes"]), cfg.get("stem", ""))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def block_names(model: nn.Module) -> list[str]:
    """'conv1' (the stem) then every residual block in forward order: ['conv1', 'layer1.0', ...]."""
    names = ["conv1"]
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}", None)
        if layer is not None:
            names += [f"layer{i}.{j}" for j in range(len(layer))]
    return names


def load_init(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Initialise from a torchvision-format state dict; tensors whose shape differs
    (fc for another class count, conv1 for the CIFAR stem) are skipped and named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    skipped = [k for k in own if k in state and state[k].shape != own[k].shape]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    if len(usable) < len(own) // 2:
        raise UnknownArchError(f"--init: the file matches only {len(usable)} of {len(own)} tensors "
                               "of this model; hint: pass a state dict of the same --arch")
    model.load_state_dict(usable, strict=False)
    if skipped or missing:
        log.warning("--init: kept the fresh values of %d tensors (shape or name differs): %s",
                    len(skipped) + len(missing), ", ".join((skipped + missing)[:6]))
    return skipped + missing
