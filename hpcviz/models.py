"""ResNets with stable block names and torchvision's parameter names.

- resnet18/34/50: torchvision's ResNets, module for module (`ResNet` with `BasicBlock` or `Bottleneck`): the
  same parameter names, initialisation (the same weights for a seed) and forward, so a checkpoint loads into
  `torchvision.models.resnetXX` and torchvision's weights can initialise training (both tested).
  Stem `imagenet` = 7x7 stride-2 conv1 + 3x3 stride-2 max-pool (the course report's);
  stem `cifar` = 3x3 stride-1 conv1 and no max-pool (an nn.Identity keeps the name).
- resnet20/32/56: the CIFAR ResNets of He et al. 2016 (three stages of 16/32/64
  channels, 3 n BasicBlocks each), with 1x1 projection shortcuts where the shape changes (the paper's
  option B), so the parameter names follow the same scheme (`layerX.Y.conv1`, `...downsample.0`, `fc`).

The classes are the project's own, not torchvision's, because importing torchvision costs every process
~1 s on 2 cores (its ops import torch._dynamo); torchvision is imported only where its data code is used.

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

from .config import ARCHS, STEMS, default_stem
from .errors import InputError

log = logging.getLogger("hpcviz")


class UnknownArchError(InputError):
    """An architecture or stem name that is not offered."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, batch norm, ReLU, and the shortcut (`downsample` where the shape changes)."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()  # the modules in torchvision's order: the same parameter names and random draws
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, inplanes, H, W) -> (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1, 3x3 (with the stride), 1x1 to 4x the width, and the shortcut (torchvision's ResNet v1.5)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, inplanes, H, W) -> (B, 4 planes, H/s, W/s)
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A stem, len(layers) stages of blocks (widths width, 2 width, ...; every stage after the first halves the
    resolution), global average pooling and the classifier, with torchvision's module names."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 10,
                 stem: str = "imagenet", width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1, self.maxpool = _make_stem(stem, 3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        for i, n in enumerate(layers):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width << i, n, stride=2 if i else 1))
        self.depth = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear((width << (len(layers) - 1)) * block.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_TORCHVISION: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3])}
_CIFAR_DEPTH = {"resnet20": 3, "resnet32": 5, "resnet56": 9}


def _make_stem(stem: str, in_ch: int, width: int) -> tuple[nn.Conv2d, nn.Module]:
    if stem == "imagenet":
        return (nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
    return (nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.Identity())


def _init_conv(conv: nn.Conv2d) -> None:
    if not conv.weight.is_meta:  # (shape_model) on meta, normal_ would import torch._dynamo: ~1 s
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def _init_weights(model: nn.Module) -> None:
    # torchvision's initialisation, so that all archs start alike
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _init_conv(m)
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
        return ResNet(BasicBlock, [_CIFAR_DEPTH[arch]] * 3, num_classes, stem, width=16)
    model = ResNet(*_TORCHVISION[arch], num_classes=num_classes)
    if stem == "cifar":  # swapped in after the ImageNet stem's draws: the same weights for a seed as before
        model.conv1, model.maxpool = _make_stem("cifar", 3, 64)
        _init_conv(model.conv1)
    return model


@functools.lru_cache(maxsize=16)
def shape_model(arch: str, num_classes: int = 10, stem: str = "") -> nn.Module:
    """The architecture for shapes and costs, in eval mode, its tensors on the CPU and never initialised (built on
    meta, then given empty CPU tensors: nothing is drawn, no page is touched); an empty batch's forward
    (dataset_examples.forward_hooked) gives every shape without computing. Not left on the meta device: the first
    op there (to_empty's too) imports sympy and torch._dynamo, ~1.4 s of every process that plans costs. Built
    once per architecture, asked for by every part and check. Shared: read it, hook it (and remove the hooks),
    never change it."""
    with torch.device("meta"):
        model = build_model(arch, num_classes, stem)
    model.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()},
                          assign=True)
    return model.eval()


def from_checkpoint(state: Mapping[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a checkpoint (checkpoint.load_checkpoint's dict), in eval mode on `device`, its
    tensors in the default (NCHW) layout whatever layout training saved. Built on the meta device and given the
    checkpoint's tensors (shared with `state` where already NCHW): no weight is drawn to be overwritten (0.3 s
    for ResNet-50 on 2 cores, in every task and part)."""
    cfg = state["config"]
    with torch.device("meta"):
        model = build_model(cfg["arch"], len(state["classes"]), cfg.get("stem", ""))
    model.load_state_dict({k: v.contiguous() for k, v in state["model"].items()}, assign=True)
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
