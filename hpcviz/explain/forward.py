"""The project's ResNets as a plan of functional ops: one forward, shared by the deconvnet and the inversion.

`ForwardPlan(model)` reads a model of hpcviz.models once: the stem (conv1, bn1, its ReLU), the max-pool of
the ImageNet stem (or none), and for every residual block its residual ops and its shortcut ops (none for
an identity). Running it applies the modules' weights with torch.nn.functional, always in eval mode
(batch norm with the running statistics), whatever the model's train flag: no module is called (torchvision's
blocks call one in-place ReLU twice) and no hook is registered, so the model is never modified.

- `run(x, upto)`: every block's activation up to `upto`, for the deconvnet, which records what its backward
  passes need on a tape passed along (`Tape`).
- `stacked(x, wanted, sizes)`: several blocks' activations in ONE pass over a stacked batch, each block's
  rows leaving the stack at its output: the inversion's forward.
- `folded()`: the same function with each batch norm fused into the convolution before it
  (W * gamma/sigma, bias beta - mu * gamma/sigma): half the ops, for the inversion's hundreds of
  differentiable passes (equal to the unfolded forward to float rounding, tested).

Block names are `models.block_names`: 'conv1' is the stem's output after its ReLU (before the max-pool),
'layerX.Y' a residual block's output after its final ReLU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models import BasicBlock, Bottleneck, block_names

_TORCHVISION = "torchvision.models.resnet"
_HINT = "hint: the deconvnet and the inversion support the ResNets of hpcviz.models"


class PlanError(InputError):
    """A model that is not one of the project's ResNets (one line, naming the module)."""


@dataclass
class Op:
    kind: str                          # "conv" | "bn" | "relu"
    key: str                           # the module's name: the tape's key
    module: nn.Module | None = None
    weight: torch.Tensor | None = None  # a folded conv's own weight and bias (None: the module's)
    bias: torch.Tensor | None = None


@dataclass
class Block:
    name: str
    residual: list[Op]
    shortcut: list[Op] = field(default_factory=list)  # [] = identity


class Tape(Protocol):
    """What the deconvnet records while the forward runs (see hpcviz.deconv)."""

    def note(self, ops: list[Op], i: int, h: torch.Tensor) -> None: ...


def conv_op(module: nn.Module, key: str) -> Op:
    if not isinstance(module, nn.Conv2d) or isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise PlanError(f"{key}: {type(module).__name__} is not a zero-padded nn.Conv2d; {_HINT}")
    return Op("conv", key, module)


def bn_op(module: nn.Module, key: str) -> Op:
    if not isinstance(module, nn.BatchNorm2d) or module.running_var is None:
        raise PlanError(f"{key}: {type(module).__name__} is not a BatchNorm2d with running statistics; {_HINT}")
    return Op("bn", key, module)


def relu_op(module: nn.Module, key: str) -> Op:
    if not isinstance(module, nn.ReLU):
        raise PlanError(f"{key}: {type(module).__name__} is not an nn.ReLU; {_HINT}")
    return Op("relu", key)


def _block(name: str, block: nn.Module) -> Block:
    convs: tuple[str, ...]
    kind = type(block).__name__  # torchvision's own blocks, not imported here (see hpcviz.models), work alike
    if isinstance(block, Bottleneck) or (kind == "Bottleneck" and type(block).__module__ == _TORCHVISION):
        convs = ("conv1", "conv2", "conv3")
    elif isinstance(block, BasicBlock) or (kind == "BasicBlock" and type(block).__module__ == _TORCHVISION):
        convs = ("conv1", "conv2")
    else:
        raise PlanError(f"{name}: {kind} is not a BasicBlock or Bottleneck of hpcviz.models or torchvision; {_HINT}")
    residual: list[Op] = []
    relu, downsample = cast(nn.Module, block.relu), cast("nn.Module | None", block.downsample)
    for i, c in enumerate(convs, 1):
        if i > 1:
            residual.append(relu_op(relu, f"{name}.relu"))
        residual += [conv_op(getattr(block, c), f"{name}.{c}"), bn_op(getattr(block, f"bn{i}"), f"{name}.bn{i}")]
    relu_op(relu, f"{name}.relu")
    shortcut: list[Op] = []
    if downsample is not None:
        parts = downsample.children() if isinstance(downsample, nn.Sequential) else [downsample]
        for j, m in enumerate(parts):
            key = f"{name}.downsample.{j}"
            shortcut.append(conv_op(m, key) if isinstance(m, nn.Conv2d) else bn_op(m, key))
    return Block(name, residual, shortcut)


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """gamma / sqrt(running_var + eps), (C,): the slope of eval-mode batch norm."""
    scale = torch.rsqrt(cast(torch.Tensor, bn.running_var) + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def apply(ops: list[Op], h: torch.Tensor, tape: Tape | None = None, relu: Any = F.relu) -> torch.Tensor:
    """The ops on h, functionally (eval-mode batch norm); `tape.note` sees each op's input first; `relu`: the
    rectifier to use (the inversion's homotopy may soften it)."""
    for i, op in enumerate(ops):
        if tape is not None:
            tape.note(ops, i, h)
        if op.kind == "conv":
            c = cast(nn.Conv2d, op.module)
            w = op.weight if op.weight is not None else c.weight
            b = op.bias if op.weight is not None else c.bias
            h = F.conv2d(h, w, b, c.stride, c.padding, c.dilation, c.groups)
        elif op.kind == "bn":
            bn = cast(nn.BatchNorm2d, op.module)
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            h = relu(h)
    return h


def _fold(ops: list[Op]) -> list[Op]:
    """Each conv followed by a batch norm as one conv with the norm's slope and offset built in."""
    out: list[Op] = []
    for op in ops:
        if op.kind == "bn" and out and out[-1].kind == "conv" and out[-1].weight is None:
            conv, bn = cast(nn.Conv2d, out[-1].module), cast(nn.BatchNorm2d, op.module)
            with torch.no_grad():
                scale = bn_scale(bn)  # (C,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                shift = bn.bias if bn.bias is not None else torch.zeros_like(scale)
                out[-1] = replace(out[-1], weight=conv.weight * scale.view(-1, 1, 1, 1),
                                  bias=shift + (bias - cast(torch.Tensor, bn.running_mean)) * scale)
        else:
            out.append(op)
    return out


class ForwardPlan:
    """One of the project's ResNets as functional ops (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = block_names(model)
        try:  # submodules as nn.Module (mypy: Tensor | Module); the op helpers check their real types
            self.stem = [conv_op(cast(nn.Module, model.conv1), "conv1"), bn_op(cast(nn.Module, model.bn1), "bn1"),
                         relu_op(cast(nn.Module, model.relu), "relu")]
            pool = model.maxpool
        except AttributeError as e:
            raise PlanError(f"model {type(model).__name__}: {e}; {_HINT}") from None
        if isinstance(pool, nn.MaxPool2d):
            self.pool: nn.MaxPool2d | None = pool
        elif isinstance(pool, nn.Identity):
            self.pool = None
        else:
            raise PlanError(f"maxpool: {type(pool).__name__} is neither nn.MaxPool2d nor nn.Identity; {_HINT}")
        self.plan = [_block(n, model.get_submodule(n)) for n in self.blocks[1:]]
        conv1 = cast(nn.Conv2d, model.conv1)
        self.in_channels, self.device, self.dtype = conv1.in_channels, conv1.weight.device, conv1.weight.dtype

    def folded(self, channels_last: bool = False) -> ForwardPlan:
        """A copy whose convolutions carry the batch norms after them (see the module docstring);
        channels_last: their weights in that layout too (oneDNN on CPUs: ~10% faster per pass, measured)."""
        out = object.__new__(ForwardPlan)
        out.__dict__.update(self.__dict__)
        out.stem = _fold(self.stem)
        out.plan = [Block(b.name, _fold(b.residual), _fold(b.shortcut)) for b in self.plan]
        if channels_last:
            for op in [*out.stem, *(op for b in out.plan for op in (*b.residual, *b.shortcut))]:
                if op.weight is not None:
                    op.weight = op.weight.contiguous(memory_format=torch.channels_last)
        return out

    def index(self, block: str) -> int:
        if block not in self.blocks:
            raise PlanError(f"block {block!r}: not a block of this model; valid: {', '.join(self.blocks)}; "
                            "hint: names as in hpcviz.models.block_names, e.g. 'conv1' or 'layer1.0'")
        return self.blocks.index(block)

    def residual_block(self, blk: Block, h: torch.Tensor, tape: Tape | None = None, relu: Any = F.relu) -> torch.Tensor:
        r = apply(blk.residual, h, tape, relu)
        return relu(r + (apply(blk.shortcut, h, tape, relu) if blk.shortcut else h))

    def pool_input(self, h: torch.Tensor, pooling: Any) -> torch.Tensor:
        """The stem's output on its way to layer1: `pooling(h, pool)` when the stem has a max-pool."""
        return pooling(h, self.pool) if self.pool is not None else h

    def run(self, x: torch.Tensor, upto: str, pooling: Any, tape: Tape | None = None) -> dict[str, torch.Tensor]:
        """{block: activation} of every block up to `upto`, in the plan's dtype (the deconvnet keeps them on its
        tape; `pooling(h, pool)` is the max-pool, which it makes record its switches)."""
        last = self.index(upto)
        h = apply(self.stem, x, tape)
        acts = {"conv1": h}
        if last > 0:
            h = self.pool_input(h, pooling)
        for blk in self.plan[:last]:
            h = acts[blk.name] = self.residual_block(blk, h, tape)
        return acts

    def stacked(self, x: torch.Tensor, wanted: Sequence[str], sizes: Sequence[int], pooling: Any,
                relu: Any = F.relu) -> list[torch.Tensor]:
        """Activations of several blocks in one pass. x: (sum(sizes), C, H, W), the rows of `wanted[k]` being
        the k-th slice (blocks in forward order); each slice leaves the stack at its block. `pooling(h, pool)`
        is the max-pool to use (the inversion's deterministic one), `relu` the rectifier. Returns one
        (sizes[k], C, h, w) per block."""
        idx = [self.index(b) for b in wanted]
        out: list[torch.Tensor] = []
        k = 0
        h = apply(self.stem, x.to(self.dtype), relu=relu)

        def leave(i: int) -> None:
            nonlocal h, k
            while k < len(idx) and idx[k] == i:
                # split, not two slices: a slice's backward is a zero-filled contiguous tensor, which turns
                # every gradient before it out of channels-last (mixed layouts: ~6x slower elementwise ops)
                leaving, h = h.split([sizes[k], len(h) - sizes[k]]) if sizes[k] < len(h) else (h, h[:0])
                out.append(leaving.float())
                k += 1
        leave(0)
        if k < len(idx):
            h = self.pool_input(h, pooling)
        for i, blk in enumerate(self.plan, 1):
            if k == len(idx):
                break
            h = self.residual_block(blk, h, relu=relu)
            leave(i)
        return out
