"""Deconvnet reconstructions (Zeiler & Fergus 2014) with a path choice at every residual block.

A block's activation is taken back into the network's input space (the *normalised* image the
network sees) by an explicit, batched backward pass; no autograd, no hooks:

- convolution -> transposed convolution with the same kernel, with the output padding that gives
  exactly the forward input's size (stride 2, odd sizes); biases are ignored;
- eval-mode batch norm -> the transpose of its linear part: signal * gamma / sqrt(running_var + eps)
  (folded into the preceding convolution's transposed kernel when there is one);
- ReLU -> ReLU of the backward signal (not the forward mask): the deconvnet rule;
- max-pool -> unpooling to the switches recorded on the way up. The signal of every pooling window
  is *added* at its argmax (scatter-add), so a position that wins two overlapping windows (3x3/2
  pooling) receives both: the exact transpose of the pooling selection, as autograd does it;
  `F.max_unpool2d` would overwrite instead and differ there;
- identity / adaptive layers -> identity (nothing after the last block is ever needed).

With path `both` everywhere and the seed "all", `reconstruct(block)` equals Captum's Deconvolution
seeded with the activation A: the input-gradient of <A, A.detach()> in a network whose every ReLU
backward is replaced by ReLU-of-gradient.

Residual blocks. The backward signal g arriving at a block's output first passes the block's final
ReLU (g <- relu(g)), then goes
  both:     through the residual branch AND the shortcut, summed at the block input;
  residual: through the residual branch only (the shortcut's share is dropped);
  shortcut: through the shortcut only. An identity shortcut passes g unchanged; a projection
            shortcut (`downsample` = 1x1 conv + bn) is transposed: bn, then the 1x1 conv.
The path is chosen for every residual block on the way back (one of PATHS), or per block
('layer4.1=shortcut,layer4.0=residual'; blocks not named take "both").

Block names are `models.block_names`: 'conv1' is the stem's output after its ReLU and before the
max-pool of the ImageNet stem; 'layerX.Y' the output of a residual block after its final ReLU.
'conv1' has no residual block on its way back, so its reconstruction is the same for every path;
`reconstruct_all` computes it once and returns it under every requested path key.

The forward pass is done functionally with the modules' weights, always in eval mode (batch norm
with running statistics), whatever the model's train/eval flag; the model is never modified, its
weights are read at each `forward`. torchvision's blocks call one (in-place) ReLU module twice,
which is why no module is called and no hook registered here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

from ..config import PATHS
from ..errors import InputError
from .forward import Block, ForwardPlan, Op, PlanError, apply, bn_op, bn_scale, conv_op, relu_op

__all__ = ["PATHS", "SEEDS", "DeconvError", "Deconvnet", "conv_transpose", "bn_scale", "bn_transpose", "unpool",
           "max_pool", "soft_max_pool", "overlap", "seed_signal", "parse_paths", "apply", "conv_op", "bn_op", "relu_op",
           "transpose_ops"]

SEEDS = ("all", "channel", "topk")
_PATH_HINT = "hint: e.g. 'both', or per block 'layer4.1=shortcut,layer4.0=residual' (blocks not named: both)"


class DeconvError(InputError):
    """A bad block, path or seed (one line, with the valid choices and a hint), or an unsupported model."""


# ---------------------------------------------------------------------------------------------
# primitives: each is the transpose (adjoint) of the linear part of a forward op

def conv_transpose(signal: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int],
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of `conv` (without bias): (B, C_out, h, w) -> (B, C_in, *input_shape[2:]);
    `weight` replaces conv.weight (e.g. with the following batch norm's slope folded in).

    `F.conv_transpose2d` with the output padding that restores the forward input's exact size
    (what `torch.nn.grad.conv2d_input` computes, but that one is several times slower on CPU)."""
    padding = cast(tuple[int, ...], conv.padding)  # numeric padding only ('same'/'valid': see forward.conv_op)
    pad = []
    for i in range(2):
        k = conv.kernel_size[i]
        size = (signal.shape[2 + i] - 1) * conv.stride[i] - 2 * padding[i] + conv.dilation[i] * (k - 1) + 1
        pad.append(int(input_shape[2 + i]) - size)
    weight = conv.weight if weight is None else weight
    if not all(0 <= p < max(conv.stride[i], conv.dilation[i]) for i, p in enumerate(pad)):
        return conv2d_input(list(input_shape), weight, signal, conv.stride, padding, conv.dilation,
                            conv.groups)
    return F.conv_transpose2d(signal, weight, None, conv.stride, padding, tuple(pad), conv.groups,
                              conv.dilation)


def bn_transpose(signal: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The transpose of eval-mode batch norm's linear part: signal * scale, per channel."""
    return signal * scale.view(1, -1, 1, 1)


def overlap(pool: nn.MaxPool2d) -> tuple[int, int]:
    """(my, mx): windows whose output rows (columns) differ by a multiple of my (mx) never overlap."""
    k, s, d = (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.dilation))
    return tuple(-(-(d[i] * (k[i] - 1) + 1) // s[i]) for i in range(2))  # type: ignore[return-value]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def unpool(signal: torch.Tensor, indices: torch.Tensor, input_shape: Sequence[int],
           overlap: tuple[int, int] | None = None) -> torch.Tensor:
    """Max-unpooling to the switches: each window's signal is added at its argmax (flat index into
    the input plane, as returned by `F.max_pool2d(..., return_indices=True)`).

    overlap=None: one scatter-add (on a GPU its atomic adds come in no fixed order: the last bits vary
    from run to run). overlap=(my, mx) (see `overlap`): deterministic everywhere. The windows are split
    into my*mx classes of non-overlapping windows; each class is a plain scatter (no two windows of a
    class share a target) and the classes are summed in a fixed order."""
    b, c, h, w = input_shape
    if overlap is None:
        out = signal.new_zeros(b, c, h * w)
        out.scatter_add_(2, indices.flatten(2), signal.flatten(2))
        return out.view(b, c, h, w)
    my, mx = overlap
    out = signal.new_zeros(b, c, h * w)
    for a in range(my):
        for e in range(mx):
            part = signal.new_zeros(b, c, h * w)
            part.scatter_(2, indices[:, :, a::my, e::mx].flatten(2), signal[:, :, a::my, e::mx].flatten(2))
            out += part
    return out.view(b, c, h, w)


class _MaxPool(torch.autograd.Function):
    """max-pool whose backward is the deterministic `unpool` (the built-in one adds atomically on GPUs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        out, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                ceil_mode=pool.ceil_mode, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.shape, ctx.overlap = tuple(x.shape), overlap(pool)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        idx, = ctx.saved_tensors
        return unpool(grad, idx, ctx.shape, ctx.overlap), None


def max_pool(x: torch.Tensor, pool: nn.MaxPool2d, exact: bool = True) -> torch.Tensor:
    """pool(x) with autograd; `exact`: a deterministic backward (see unpool), else torch's (faster on GPUs)."""
    if exact and x.requires_grad:
        return _MaxPool.apply(x, pool)
    return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)


def soft_max_pool(x: torch.Tensor, pool: nn.MaxPool2d, temperature: torch.Tensor,
                  straight_through: bool = False) -> torch.Tensor:
    """Log-sum-exp pooling over the windows of `pool`: t * log(sum over a window of exp(x / t)) at the
    temperature t (> 0, broadcastable to the output), which tends to the max as t -> 0 and gives every member
    of a window gradient by its softmax weight, where the max-pool gives it all to the argmax (the inversion's
    homotopy: pixels that do not win a window yet still move). straight_through: the max-pool's value with
    that gradient. Computed against each window's max (exp <= 1: no overflow at any t)."""
    k, st, d, p = (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.dilation),
                   _pair(pool.padding))
    top = max_pool(x.detach(), pool)  # no gradient through it: log-sum-exp does not depend on the shift
    oh, ow = top.shape[-2:]
    need = [(n - 1) * st[i] + d[i] * (k[i] - 1) + 1 for i, n in enumerate((oh, ow))]  # padded extent used
    xp = F.pad(x, (p[1], max(0, need[1] - x.shape[-1] - p[1]), p[0], max(0, need[0] - x.shape[-2] - p[0])),
               value=float("-inf"))
    z = torch.zeros_like(top)
    for a in range(k[0]):
        for b in range(k[1]):
            member = xp[..., a * d[0]:a * d[0] + (oh - 1) * st[0] + 1:st[0],
                        b * d[1]:b * d[1] + (ow - 1) * st[1] + 1:st[1]]
            z = z + torch.exp((member - top) / temperature)
    soft = top + temperature * torch.log(z)
    return top + (soft - soft.detach()) if straight_through else soft


def seed_signal(act: torch.Tensor, seed: str = "all", channel: int | None = None, k: int = 1) -> torch.Tensor:
    """The signal a reconstruction starts from, (B, C, h, w): "all" = the activation, "channel" = only
    channel `channel` (zero elsewhere), "topk" = per image the k channels of largest mean activation."""
    n = act.shape[1]
    if seed == "all":
        return act
    if seed == "channel":
        if channel is None or isinstance(channel, bool) or not 0 <= int(channel) < n:
            raise DeconvError(f"seed 'channel' with channel={channel!r}: need an integer in 0..{n - 1}; "
                              "hint: reconstruct(block, seed='channel', channel=0)")
        out = torch.zeros_like(act)
        out[:, int(channel)] = act[:, int(channel)]
        return out
    if seed == "topk":
        if isinstance(k, bool) or not 1 <= int(k) <= n:
            raise DeconvError(f"seed 'topk' with k={k!r}: need an integer in 1..{n}; "
                              "hint: reconstruct(block, seed='topk', k=3)")
        top = act.mean(dim=(2, 3)).topk(int(k), dim=1).indices  # (B, k)
        mask = torch.zeros(act.shape[:2], dtype=act.dtype, device=act.device).scatter_(1, top, 1.0)
        return act * mask[:, :, None, None]
    raise DeconvError(f"seed {seed!r}: not one of {', '.join(SEEDS)}; hint: seed='all' (the whole activation)")


def parse_paths(spec: str | Mapping[str, str], blocks: Sequence[str]) -> dict[str, str]:
    """{residual block: path} for every residual block of `blocks` ('conv1' is not one).

    spec: one of PATHS for every block; or 'block=path,...' (blocks not named: "both"; one bare
    path among the items sets that default instead, e.g. 'shortcut,layer1.0=both'); or a mapping
    {block: path}. An unknown block or path is a DeconvError."""
    residual = [b for b in blocks if b != "conv1"]
    default = "both"
    chosen: dict[str, str] = {}
    if isinstance(spec, Mapping):
        items = [(str(b), str(p)) for b, p in spec.items()]
    elif isinstance(spec, str):
        items, bare = [], []
        for tok in (t.strip() for t in spec.split(",")):
            if "=" in tok:
                b, p = (s.strip() for s in tok.split("=", 1))
                items.append((b, p))
            elif tok:
                bare.append(tok)
        if len(bare) > 1 or (not bare and not items):
            raise DeconvError(f"path {spec!r}: give one of {', '.join(PATHS)} or block=path items; {_PATH_HINT}")
        if bare:
            default = bare[0]
    else:
        raise DeconvError(f"path {spec!r}: a string or a mapping {{block: path}}; {_PATH_HINT}")
    bad_paths = sorted({p for _, p in items if p not in PATHS} | ({default} - set(PATHS)))
    if bad_paths:
        raise DeconvError(f"path {','.join(bad_paths)}: not one of {', '.join(PATHS)}; {_PATH_HINT}")
    unknown = [b for b, _ in items if b not in residual]
    if unknown:
        raise DeconvError(f"path spec block {','.join(unknown)}: not a residual block of this model; valid: "
                          f"{', '.join(residual)}; {_PATH_HINT}")
    for b, p in items:
        if chosen.setdefault(b, p) != p:
            raise DeconvError(f"path spec {spec!r}: block {b} given twice with different paths; {_PATH_HINT}")
    return {b: chosen.get(b, default) for b in residual}


# ---------------------------------------------------------------------------------------------
# the tape of one forward (the forward itself is hpcviz.forward's plan)

@dataclass
class _Tape:
    """What one forward leaves for the backward passes: shapes, bn slopes, switches, activations."""
    upto: str
    input_shape: tuple[int, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # conv key -> its input's shape
    scales: dict[str, torch.Tensor] = field(default_factory=dict)     # bn key -> gamma/sqrt(var+eps)
    folded: dict[str, torch.Tensor] = field(default_factory=dict)     # conv key -> weight * next bn's slope
    pool_indices: torch.Tensor | None = None
    pool_input_shape: tuple[int, ...] = ()
    acts: dict[str, torch.Tensor] = field(default_factory=dict)

    def note(self, ops: list[Op], i: int, h: torch.Tensor) -> None:
        op = ops[i]
        if op.kind == "conv":
            self.shapes[op.key] = tuple(h.shape)
        elif op.kind == "bn":
            scale = self.scales[op.key] = bn_scale(cast(nn.BatchNorm2d, op.module))
            if i > 0 and ops[i - 1].kind == "conv":  # bn^T then conv^T = conv^T with the slope in its kernel
                self.folded[ops[i - 1].key] = cast(nn.Conv2d, ops[i - 1].module).weight * scale.view(-1, 1, 1, 1)

    def pool(self, h: torch.Tensor, p: nn.MaxPool2d) -> torch.Tensor:
        """The stem's max-pool, recording its switches for the unpooling."""
        self.pool_input_shape = tuple(h.shape)
        out, self.pool_indices = F.max_pool2d(h, p.kernel_size, p.stride, p.padding, p.dilation,
                                              ceil_mode=p.ceil_mode, return_indices=True)
        return out


def transpose_ops(ops: list[Op], g: torch.Tensor, tape: _Tape, conv_t: Any = conv_transpose) -> torch.Tensor:
    """The ops' transposes on g, last op first; `conv_t(g, conv, input_shape, weight)` transposes a convolution
    (hpcviz.explain.window passes one that follows a window)."""
    skip = False
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if skip:
            skip = False
        elif op.kind == "bn" and i > 0 and ops[i - 1].key in tape.folded:
            conv = cast(nn.Conv2d, ops[i - 1].module)
            g = conv_t(g, conv, tape.shapes[ops[i - 1].key], tape.folded[ops[i - 1].key])
            skip = True
        elif op.kind == "conv":
            g = conv_t(g, cast(nn.Conv2d, op.module), tape.shapes[op.key])
        elif op.kind == "bn":
            g = bn_transpose(g, tape.scales[op.key])
        else:
            g = F.relu(g)
    return g


class Deconvnet:
    """Deconvnet for one of the project's ResNets (ResNet-18/34/50, either stem; ResNet-20/32/56).

    Usage: `acts = d.forward(x)` once per batch, then `d.reconstruct(block, path, seed)` as often as
    needed; or `d.reconstruct_all(x, blocks, paths)`. Runs on the model's device, in its dtype
    (reconstructions are returned as float32). The model is not modified: batch norm always uses the
    running statistics (eval mode), whatever `model.training` says."""

    def __init__(self, model: nn.Module, exact: bool = True) -> None:
        self.model = model
        self.exact = exact  # deterministic unpooling (see `unpool`); False: one atomic scatter-add on GPUs
        try:
            self.plan = ForwardPlan(model)
        except PlanError as e:
            raise DeconvError(str(e)) from None
        self.blocks = self.plan.blocks
        self._tape: _Tape | None = None

    # --- checks -------------------------------------------------------------------------------
    def _check_block(self, block: str) -> int:
        if block not in self.blocks:
            raise DeconvError(f"block {block!r}: not a block of this model; valid: {', '.join(self.blocks)}; "
                              "hint: names as in hpcviz.models.block_names, e.g. 'conv1' or 'layer1.0'")
        return self.blocks.index(block)

    def _paths(self, path: str | Mapping[str, str]) -> dict[str, str]:
        return parse_paths(path, self.blocks)

    # --- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, upto: str | None = None) -> dict[str, torch.Tensor]:
        """Runs once up to block `upto` (default: the last), recording the switches and shapes the
        reconstructions need; returns {block: activation (B, C, h, w) float32} for every block up to
        `upto` (for a float32 model the very tensors the seeds are taken from: do not modify them in
        place). x: the normalised input (B, C_in, H, W), moved to the model's device and dtype."""
        upto = self.blocks[-1] if upto is None else upto
        self._check_block(upto)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.plan.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DeconvError(f"input of shape {shape}: need (B, {self.plan.in_channels}, H, W); "
                              "hint: pass a normalised image batch")
        self._tape = None
        conv1 = cast(nn.Conv2d, self.model.conv1)  # the weights as they are now (they may have moved)
        x = x.to(device=conv1.weight.device, dtype=conv1.weight.dtype)
        tape = _Tape(upto=upto, input_shape=tuple(x.shape))
        tape.acts = self.plan.run(x, upto, tape.pool, tape)
        self._tape = tape
        return {n: a.float() for n, a in tape.acts.items()}

    def activations(self, block: str) -> torch.Tensor:
        """`block`'s activation (B, C, h, w) of the last forward (after `take`, its rows)."""
        return self._need_tape(block).acts[block]

    def take(self, rows: torch.Tensor) -> None:
        """Make the last forward's tape that of the forward of x[rows] (rows may repeat), without running it
        again: the projections of many channels' top images forward each image once."""
        tape = self._need_tape(self._tape.upto if self._tape is not None else self.blocks[-1])
        n = len(rows)
        rows = rows.to(next(iter(tape.acts.values())).device)
        tape.acts = {k: a[rows] for k, a in tape.acts.items()}
        tape.shapes = {k: (n, *s[1:]) for k, s in tape.shapes.items()}
        tape.input_shape = (n, *tape.input_shape[1:])
        if tape.pool_indices is not None:
            tape.pool_indices = tape.pool_indices[rows]
            tape.pool_input_shape = (n, *tape.pool_input_shape[1:])

    # --- backward -----------------------------------------------------------------------------
    def tape(self, block: str) -> _Tape:
        """The last forward's tape (shapes, bn slopes, switches, activations), checked to reach `block`."""
        return self._need_tape(block)

    def _need_tape(self, block: str) -> _Tape:
        i = self._check_block(block)
        tape = self._tape
        if tape is None or i > self.blocks.index(tape.upto):
            raise DeconvError(f"block {block!r}: the last forward did not reach it; "
                              f"hint: call forward(x, upto={block!r}) (or forward(x)) first")
        return tape

    def _block_back(self, blk: Block, g: torch.Tensor, path: str, tape: _Tape) -> torch.Tensor:
        g = F.relu(g)  # the block's final ReLU
        if path == "shortcut":
            return transpose_ops(blk.shortcut, g, tape)
        r = transpose_ops(blk.residual, g, tape)
        if path == "residual":
            return r
        return r + transpose_ops(blk.shortcut, g, tape)

    @torch.no_grad()
    def backward_block(self, block: str, signal: torch.Tensor, path: str = "both") -> torch.Tensor:
        """The signal at residual block `block`'s output (B, C, h, w) taken back to its input (last forward)."""
        tape = self._need_tape(block)
        if block == "conv1":
            raise DeconvError("block 'conv1': not a residual block; hint: use backward('conv1', signal)")
        if path not in PATHS:
            raise DeconvError(f"path {path!r}: not one of {', '.join(PATHS)}; hint: path='both'")
        return self._block_back(self.plan.plan[self.blocks.index(block) - 1], signal, path, tape)

    @torch.no_grad()
    def backward(self, block: str, signal: torch.Tensor, path: str | Mapping[str, str] = "both") -> torch.Tensor:
        """Any signal at `block`'s output (B, C, h, w) taken back to the input space (B, 3, H, W), in
        the model's dtype; uses the switches and shapes of the last forward."""
        tape = self._need_tape(block)
        paths = self._paths(path)
        # on CPU, oneDNN's transposed convolutions are several times faster in channels-last
        g = signal.contiguous(memory_format=torch.channels_last) if signal.device.type == "cpu" else signal
        for blk in reversed(self.plan.plan[:self.blocks.index(block)]):
            g = self._block_back(blk, g, paths[blk.name], tape)
        if block != "conv1" and tape.pool_indices is not None:
            g = unpool(g, tape.pool_indices, tape.pool_input_shape,
                       overlap(self.plan.pool) if self.exact and self.plan.pool is not None else None)
        return transpose_ops(self.plan.stem, g, tape).contiguous()  # the stem's ReLU, bn1, conv1

    @torch.no_grad()
    def reconstruct(self, block: str, path: str | Mapping[str, str] = "both", seed: str = "all",
                    channel: int | None = None, k: int = 1) -> torch.Tensor:
        """The deconvnet reconstruction (B, 3, H, W) float32 of `block`'s activation from the last
        forward, seeded by `seed` ("all" | "channel" | "topk", see `seed_signal`), going back by `path`
        (one of PATHS for every residual block, or per block: see `parse_paths`)."""
        tape = self._need_tape(block)
        paths = self._paths(path)
        return self.backward(block, seed_signal(tape.acts[block], seed, channel, k), paths).float()

    def reconstruct_all(self, x: torch.Tensor, blocks: Sequence[str] | None = None,
                        paths: Sequence[str] = PATHS, seed: str = "all", channel: int | None = None,
                        k: int = 1) -> dict[tuple[str, str], torch.Tensor]:
        """{(block, path): (B, 3, H, W) float32} after ONE forward up to the deepest requested block.

        blocks: names (default: all), returned in forward order; paths: entries of PATHS (or per-block
        spec strings, keyed as given). 'conv1' has no residual block on its way back: its
        reconstruction is computed once and returned (the same tensor) under every requested path."""
        blocks = [blocks] if isinstance(blocks, str) else blocks
        paths = [paths] if isinstance(paths, str) else paths
        names = self.blocks if not blocks else [b for b in self.blocks if b in set(blocks)]
        for b in blocks or ():
            self._check_block(b)
        paths = list(dict.fromkeys(paths))
        if not paths:
            raise DeconvError(f"paths: empty; hint: one or more of {', '.join(PATHS)}")
        parsed = {p: self._paths(p) for p in paths}
        if seed not in SEEDS:
            seed_signal(torch.zeros(1, 1, 1, 1), seed)  # raises the one-line error
        self.forward(x, upto=names[-1])
        out: dict[tuple[str, str], torch.Tensor] = {}
        with torch.no_grad():
            for b in names:
                if b == "conv1":
                    r = self.reconstruct(b, "both", seed, channel, k)
                    out.update({(b, p): r for p in paths})
                else:
                    out.update({(b, p): self.reconstruct(b, parsed[p], seed, channel, k) for p in paths})
        return out
