"""Deconvnet projections from one position, computed inside that position's receptive field only.

A projection seeded at one position (y, x) of a block is zero outside the position's receptive field: each op
of the deconvnet's backward is local. A transposed convolution spreads a position over its kernel's footprint,
ReLU and batch norm act per position, the unpooling moves a pooling window's signal to its switch inside the
window. So the backward can run on a window that follows the signal's support from the seed (1 x 1) down to the
input, where it is the receptive field: the very box (`dataset_examples.field_box`) the projection is cropped
to. `project_field` returns `crop(project(...), boxes, 0)`, equal to float rounding (tests/explain/test_window.py),
at the cost of the windows' areas instead of the maps'. Where the field is larger than the image (the deep
blocks of a small image), or about as large (over half the image's area), a window saves nothing: the full
projection is computed and cropped.

Every row has its own window, at its own place: origin = seed * stride + offset (stride and offset are the
same for every row, python ints, so no host sync), the same size for all rows; positions of a window that
leave the map are zeroed after each transposed convolution (the full backward has no such positions).
"""
from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..models import block_names
from .activations import block_modules
from .dataset_examples import crop, field_box, forward_hooked, per_image, project, receptive_field
from .deconv import Deconvnet, overlap, transpose_ops

__all__ = ["project_field", "windowed", "projection_macs"]

# a window's bookkeeping (clipping, the union of a block's two paths) costs more than it saves beyond this share
# of the image's area: ResNet-18 at 224 px, per row, layer3.0 (field 147) 1.4x faster, layer3.1 (211) 0.7x
_MOST_AREA = 0.5


class _Frame:
    """Where each row's window lies in the current map, per axis: origin = base * scale + shift (base: the
    seed's position (R,), scale and shift: python ints)."""

    def __init__(self, base_y: torch.Tensor, base_x: torch.Tensor, scale: tuple[int, int] = (1, 1),
                 shift: tuple[int, int] = (0, 0)) -> None:
        self.base, self.scale, self.shift = (base_y, base_x), scale, shift

    def fork(self) -> _Frame:
        return _Frame(*self.base, self.scale, self.shift)

    def step(self, stride: tuple[int, int], padding: tuple[int, int]) -> None:
        """The window's frame one strided layer down (its input): origin * stride - padding."""
        self.scale = (self.scale[0] * stride[0], self.scale[1] * stride[1])
        self.shift = (self.shift[0] * stride[0] - padding[0], self.shift[1] * stride[1] - padding[1])

    def positions(self, axis: int, n: int) -> torch.Tensor:
        """(R, n) the map coordinates of the window's n rows (axis 0) or columns (axis 1)."""
        base = self.base[axis]
        return base[:, None] * self.scale[axis] + self.shift[axis] + torch.arange(n, device=base.device)

    def clip(self, g: torch.Tensor, hw: tuple[int, ...]) -> torch.Tensor:
        """g (R, C, n, m) with the positions that leave the map (hw) zeroed."""
        ys, xs = self.positions(0, g.shape[2]), self.positions(1, g.shape[3])
        inside = ((ys >= 0) & (ys < hw[0]))[:, None, :, None] & ((xs >= 0) & (xs < hw[1]))[:, None, None, :]
        return g * inside.to(g.dtype)

    def conv_transpose(self, g: torch.Tensor, conv: nn.Conv2d, input_shape: tuple[int, ...],
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """deconv.conv_transpose on the window: no padding (the window keeps every tap), then the frame moves."""
        w = conv.weight if weight is None else weight
        g = F.conv_transpose2d(g, w, None, conv.stride, 0, 0, conv.groups, conv.dilation)
        self.step(cast(tuple[int, int], conv.stride), cast(tuple[int, int], conv.padding))
        return self.clip(g, input_shape[2:])


def _union(a: torch.Tensor, fa: _Frame, b: torch.Tensor, fb: _Frame) -> tuple[torch.Tensor, _Frame]:
    """a + b, two windows of one map (a residual block's two paths) placed in the window that holds both."""
    assert fa.scale == fb.scale, "a block's two paths have the same stride"
    lo = (min(fa.shift[0], fb.shift[0]), min(fa.shift[1], fb.shift[1]))
    hi = tuple(max(f.shift[i] + t.shape[2 + i] for f, t in ((fa, a), (fb, b))) for i in range(2))
    out = a.new_zeros(*a.shape[:2], hi[0] - lo[0], hi[1] - lo[1])
    for f, t in ((fa, a), (fb, b)):
        y, x = f.shift[0] - lo[0], f.shift[1] - lo[1]
        out[:, :, y:y + t.shape[2], x:x + t.shape[3]] += t
    return out, _Frame(*fa.base, fa.scale, lo)


def _unpool(g: torch.Tensor, frame: _Frame, indices: torch.Tensor, input_shape: tuple[int, ...],
            pool: nn.MaxPool2d, exact: bool) -> torch.Tensor:
    """deconv.unpool on the window: each position's signal added at its switch, inside the window below.
    exact: the windows in classes that never share a target, summed in a fixed order (as deconv.unpool)."""
    r, c, n, m = g.shape
    h, w = indices.shape[2:]
    ys, xs = frame.positions(0, n).clamp(0, h - 1), frame.positions(1, m).clamp(0, w - 1)  # (R, n), (R, m)
    rows = torch.arange(r, device=g.device)[:, None, None]
    switch = indices[rows, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # (R, C, n, m) flat indices
    k, s, p, d = (_pair(getattr(pool, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
    frame.step(s if pool.stride else k, p)
    size = ((n - 1) * (s if pool.stride else k)[0] + d[0] * (k[0] - 1) + 1,
            (m - 1) * (s if pool.stride else k)[1] + d[1] * (k[1] - 1) + 1)
    oy, ox = frame.positions(0, 1), frame.positions(1, 1)  # (R, 1) the new window's origin
    local = (switch // input_shape[3] - oy[:, :, None, None]) * size[1] + switch % input_shape[3] \
        - ox[:, :, None, None]
    local = local.clamp(0, size[0] * size[1] - 1)  # positions off the map carry 0; their switch is clamped
    out = g.new_zeros(r, c, size[0] * size[1])
    my, mx = overlap(pool) if exact else (1, 1)
    for a in range(my):
        for e in range(mx):
            part = g.new_zeros(r, c, size[0] * size[1]) if exact else out
            part.scatter_add_(2, local[:, :, a::my, e::mx].flatten(2), g[:, :, a::my, e::mx].flatten(2))
            if exact:
                out += part
    return out.view(r, c, *size)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def windowed(deconvnet: Deconvnet, block: str, seed: torch.Tensor, y: torch.Tensor,
             x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deconvnet backward (path both) of `seed` (R, C) placed at (y, x) of `block` (each (R,)), on the
    last forward's tape, inside the receptive field only. Returns (window (R, 3, n, m), its origins y0, x0 (R,)
    in the input: row r covers rows y0[r] ... y0[r] + n - 1 of the image, zero where it leaves the image)."""
    tape = deconvnet.tape(block)
    plan = deconvnet.plan
    g = seed[:, :, None, None]  # (R, C, 1, 1)
    if g.device.type == "cpu":  # oneDNN's transposed convolutions are several times faster in channels-last
        g = g.contiguous(memory_format=torch.channels_last)
    frame = _Frame(y, x)
    for blk in reversed(plan.plan[:plan.blocks.index(block)]):
        g = F.relu(g)  # the block's final ReLU
        fr = frame.fork()
        res = transpose_ops(blk.residual, g, tape, fr.conv_transpose)
        fs = frame.fork()
        short = transpose_ops(blk.shortcut, g, tape, fs.conv_transpose) if blk.shortcut else g
        g, frame = _union(res, fr, short, fs)
    if block != "conv1" and tape.pool_indices is not None and plan.pool is not None:
        g = _unpool(g, frame, tape.pool_indices, tape.pool_input_shape, plan.pool, deconvnet.exact)
    g = transpose_ops(plan.stem, g, tape, frame.conv_transpose)
    return g, frame.positions(0, 1)[:, 0], frame.positions(1, 1)[:, 0]


@torch.no_grad()
def project_field(deconvnet: Deconvnet, x: torch.Tensor, block: str, channel: torch.Tensor, y: torch.Tensor,
                  xpos: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles (R, 3, P, Q) float32, seed values (R,)): `crop(project(...)[0], field_box(...), 0)` for the same
    arguments (see dataset_examples.project), computed in the receptive field only when it fits in the image."""
    field = receptive_field(deconvnet.model, block)
    h, w = x.shape[-2:]
    if field[0] * field[0] > _MOST_AREA * h * w:  # the windows would be about the maps' size: no faster
        rec, value = project(deconvnet, x, block, channel, y, xpos, rows)
        return crop(rec, field_box(field, y.cpu().numpy(), xpos.cpu().numpy()), 0.0), value
    flushed = torch.set_flush_denormal(True)  # as dataset_examples.project: a single seed leaves subnormal dust
    try:
        deconvnet.forward(x, upto=block)
        if rows is not None:
            deconvnet.take(rows)
        act = deconvnet.tape(block).acts[block]  # (R, C, h, w)
        r = torch.arange(act.shape[0], device=act.device)
        ch, yy, xx = (t.to(act.device) for t in (channel, y, xpos))
        value = act[r, ch, yy, xx]
        seed = torch.zeros(act.shape[:2], dtype=act.dtype, device=act.device)
        seed[r, ch] = value
        tiles, _, _ = windowed(deconvnet, block, seed, yy, xx)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    assert tiles.shape[-1] == field[0], "the last window is the receptive field"
    return tiles.float().contiguous(), value.float()



@torch.no_grad()
def projection_macs(model: nn.Module, hw: tuple[int, int]) -> dict[str, float]:
    """{block: multiply-adds of one projection (a row) from it}, about: its transposed convolutions are the
    forward's convolutions up to the block, at the share of the image `project_field` computes (its receptive
    field's area, where it windows). From the shapes of an empty batch's forward (nothing is computed)."""
    names, mods = block_names(model), block_modules(model)
    macs, seen = [0.0], dict[str, float]()

    def conv(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        w = cast(nn.Conv2d, module).weight
        macs[0] += per_image(out) * w[0].numel()  # per output element: C_in / groups * kh * kw

    def at(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, macs[0])
        return hook
    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [mods[n].register_forward_hook(at(n)) for n in names]
    forward_hooked(model, hw, hooks)
    out = {}
    for name in names:
        area = receptive_field(model, name)[0] ** 2
        out[name] = seen[name] * (area / (hw[0] * hw[1]) if area <= _MOST_AREA * hw[0] * hw[1] else 1.0)
    return out
