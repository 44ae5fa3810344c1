"""Dataset examples (Zeiler & Fergus 2014, Fig. 2): what every channel of every block responds to, over all
the visualized images, as a map-reduce over the visualization array.

- map (`TopK`, in every array task): per block and channel, the k images of largest spatial-max activation
  (value, position in the split, (y, x) of the max), and per class the sum and count of each channel's
  spatial-mean activation. Exact, ties broken by the smaller position; O(k x channels) memory; it reads each
  activation once, as the forward computes it: the top-k in the float16 rounding the shard stores (so a
  brute-force top-k over the stored activations gives the same lists), the means from the float32 values.
- reduce (`merge_topk`, `merge_class_means`, `selectivity`, at collation): the shards' lists merged into the
  top-k over all images, the class means combined by their counts, and each channel's class selectivity
  (mu_max - mu_rest) / (mu_max + mu_rest) (Morcos et al. 2018).
- projection (`receptive_field`, `crop`, `project`, at aggregation): for each channel's top images, the deconvnet
  projection seeded with that channel's strongest activation only, and the input patch under its receptive
  field, computed from the architecture.

Pure: tensors and arrays in and out; hpcviz.viz reads and writes the files.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models import block_names
from .activations import block_modules
from .forward import ForwardPlan

__all__ = ["TopK", "merge_topk", "merge_class_means", "selectivity", "reduce_summaries",
           "receptive_field", "block_channels", "split_channels", "forward_hooked", "per_image", "field_box", "crop",
           "shrink", "project", "projection_footprint",
           "TOPK_FIELDS"]

TOPK_FIELDS = ("value", "index", "y", "x")  # topk/<block>/<field>, each (C, k)


class ExamplesError(InputError):
    """A dataset-examples request that does not fit (a bad k, a block without a receptive field)."""


def _rank(values: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the columns of the k largest values, ties by the smaller position: (C, M) -> (C, min(k, M))."""
    by_pos = positions.argsort(dim=1, stable=True)
    v = values.gather(1, by_pos)
    order = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return by_pos.gather(1, order)


class TopK:
    """The map: running per-channel top-k and per-class sums of every block, on the activations' device."""

    def __init__(self, k: int, n_classes: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ExamplesError(f"--topk {k!r}: need an integer >= 1 (images kept per channel); hint: --topk 9")
        self.k, self.n_classes = k, n_classes
        self._lists: dict[str, dict[str, torch.Tensor]] = {}  # block -> value/index/flat (C, <=k), width
        self._sums: dict[str, torch.Tensor] = {}               # block -> (K, C) float64
        self.count: torch.Tensor | None = None                 # (K,) int64, images per class

    @torch.no_grad()
    def update(self, block: str, act: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
               full: torch.Tensor | None = None) -> None:
        """Fold in one batch: act (B, C, h, w) as stored (float16), positions and labels (B,) on its device;
        `full`: the same activation in float32, if at hand (class means from it: ~10x faster on CPUs)."""
        b, c, _, w = act.shape
        maps = act.flatten(2)  # (B, C, hw)
        peak = torch.nan_to_num(maps.amax(dim=2).float(), nan=float("-inf"))  # (B, C); a NaN ranks last
        values, pos = peak.T, positions.view(1, b).expand(c, b)  # (C, B)
        old = self._lists.get(block)
        width = 0 if old is None else old["value"].shape[1]
        if old is not None:
            values, pos = torch.cat([old["value"], values], 1), torch.cat([old["index"], pos], 1)
        keep = _rank(values, pos, self.k)  # (C, k')
        # where each kept maximum is: the first in row-major order, found only for the maps that were kept
        # (an argmax over every map costs 30x the maximum on CPUs), with no host sync
        fresh = keep >= width
        img = (keep - width).clamp(min=0)
        where = maps[img, torch.arange(c, device=act.device)[:, None]].float().argmax(dim=2)  # (C, k')
        if old is not None:
            where = torch.where(fresh, where, old["flat"].gather(1, keep.clamp(max=width - 1)))
        self._lists[block] = {"value": values.gather(1, keep), "index": pos.gather(1, keep), "flat": where,
                              "width": torch.tensor(w)}
        means = (act.float() if full is None else full).mean(dim=(2, 3)).double()  # (B, C)
        sums = self._sums.setdefault(block, torch.zeros(self.n_classes, c, dtype=torch.float64, device=act.device))
        # a one-hot matmul, not index_add_: on GPUs index_add_ adds floats with atomics, in an order that changes
        # from run to run (a retried shard must give the same class means); no host sync either
        classes = torch.arange(self.n_classes, device=act.device)
        sums += (labels.to(act.device)[:, None] == classes).to(torch.float64).T @ means  # (K, B) @ (B, C)
        if block == next(iter(self._lists)):  # count the images once per batch, at the first block
            add = torch.bincount(labels.to(act.device), minlength=self.n_classes)[:self.n_classes]
            self.count = add if self.count is None else self.count + add

    def results(self) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]]:
        """{dataset name: (array, dims, attrs)}: topk/<block>/{value,index,y,x} (C, k'), k' = min(k, images),
        class_mean/<block> (K, C) (NaN for a class without images) and class_count (K,)."""
        out: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {}
        count: np.ndarray = self.count.cpu().numpy() if self.count is not None else np.zeros(self.n_classes, np.int64)
        for block, lists in self._lists.items():
            w, flat = int(lists["width"]), lists["flat"].cpu().numpy()
            arrays: dict[str, np.ndarray] = {"value": lists["value"].cpu().numpy().astype(np.float32),
                                             "index": lists["index"].cpu().numpy().astype(np.int64),
                                             "y": (flat // w).astype(np.int32), "x": (flat % w).astype(np.int32)}
            for name, a in arrays.items():
                out[f"topk/{block}/{name}"] = (a, ("channel", "rank"), _TOPK_ATTRS[name] | {"block": block})
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = self._sums[block].cpu().numpy() / count[:, None]
            out[f"class_mean/{block}"] = (mean, ("class", "channel"), {"block": block, "what": _MEAN_WHAT})
        out["class_count"] = (count.astype(np.int64), ("class",), {"what": "images per class"})
        return out


_TOPK_ATTRS = {"value": {"what": "the channel's spatial-max activation (float16 as stored), largest first"},
               "index": {"what": "the image's position in the split (as /index); ties: the smaller first"},
               "y": {"what": "row of the maximum in the block's feature map (the first in row-major order)"},
               "x": {"what": "column of the maximum in the block's feature map"}}
_MEAN_WHAT = "mean over the class's images of the channel's spatial-mean activation"


# ============================================================ reduce
def merge_topk(parts: Sequence[Mapping[str, np.ndarray]], k: int) -> dict[str, np.ndarray]:
    """The top-k over the union of several top-k lists ({value,index,y,x} (C, k_i) each): exactly the
    top-k of all their images, provided each list is its images' own top-min(k, n_i)."""
    cat = {f: np.concatenate([np.asarray(p[f]) for p in parts], axis=1) for f in TOPK_FIELDS}
    order = np.lexsort((cat["index"], -cat["value"].astype(np.float64)), axis=1)[:, :k]  # value desc, index asc
    return {f: np.take_along_axis(a, order, axis=1) for f, a in cat.items()}


def merge_class_means(means: Sequence[np.ndarray], counts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(class means (K, C), counts (K,)) over shards, each shard's means weighted by its class counts."""
    count = np.sum([np.asarray(c, np.int64) for c in counts], axis=0)
    total = np.zeros_like(np.asarray(means[0], np.float64))
    for m, c in zip(means, counts):
        c = np.asarray(c)[:, None]
        total += np.where(c > 0, np.nan_to_num(np.asarray(m, np.float64)), 0.0) * c
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count[:, None], count


def selectivity(class_mean: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(selectivity (C,) in [0, 1] for non-negative activations, the class of the largest mean (C,)):
    (mu_max - mu_rest) / (mu_max + mu_rest) over the classes that have images, mu_rest the mean of the other
    classes' means; 0 for a channel that is zero everywhere, NaN with fewer than two classes."""
    have = np.flatnonzero(np.asarray(count) > 0)
    if len(have) < 2:
        return np.full(class_mean.shape[1], np.nan, np.float32), np.full(class_mean.shape[1], -1, np.int64)
    m = np.asarray(class_mean, np.float64)[have]  # (K', C)
    top = m.argmax(axis=0)
    mu_max = m.max(axis=0)
    mu_rest = (m.sum(axis=0) - mu_max) / (len(have) - 1)
    denom = mu_max + mu_rest
    with np.errstate(invalid="ignore", divide="ignore"):
        sel = np.where(denom != 0, (mu_max - mu_rest) / np.where(denom != 0, denom, 1.0), 0.0)
    return sel.astype(np.float32), have[top].astype(np.int64)


def reduce_summaries(parts: Sequence[Mapping[str, np.ndarray]], blocks: Sequence[str], k: int,
                     missing: Mapping[str, str]) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]]:
    """The reduce of collation: the shards' summaries ({name: array} each) -> viz.h5's merged datasets
    topk/<block>/*, class_mean/<block>, class_count, selectivity/<block> and selective_class/<block>. With
    shards missing (`missing`: name -> reason) the merge is over the others and every dataset says so."""
    n = int(sum(np.asarray(p["class_count"]).sum() for p in parts))
    status = {"complete": not missing, "n_images": n, "missing_shards": sorted(missing)}
    note = "" if not missing else f" (INCOMPLETE: {len(missing)} shard(s) missing)"
    out: dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]] = {}
    count = np.sum([np.asarray(p["class_count"], np.int64) for p in parts], axis=0)
    out["class_count"] = (count, ("class",), {**status, "what": "images per class"})
    for block in blocks:
        merged = merge_topk([{f: p[f"topk/{block}/{f}"] for f in TOPK_FIELDS} for p in parts], k)
        for f, a in merged.items():
            out[f"topk/{block}/{f}"] = (a, ("channel", "rank"), {**_TOPK_ATTRS[f], **status, "block": block, "k": k,
                                                                "merged": f"the top {k} over {n} images{note}"})
        means, _ = merge_class_means([p[f"class_mean/{block}"] for p in parts], [p["class_count"] for p in parts])
        sel, top = selectivity(means, count)
        out[f"class_mean/{block}"] = (means, ("class", "channel"), {**status, "block": block, "what": _MEAN_WHAT})
        out[f"selectivity/{block}"] = (sel, ("channel",), {**status, "block": block, "what": _SEL_WHAT})
        out[f"selective_class/{block}"] = (top, ("channel",), {**status, "block": block,
                                                              "what": "the class of the largest mean activation"})
    return out


_SEL_WHAT = "class selectivity (mu_max - mu_rest) / (mu_max + mu_rest) of the class means (Morcos et al. 2018)"


# ============================================================ projection
def block_channels(model: nn.Module) -> dict[str, int]:
    """{block: its output channels}, from the architecture (no forward pass)."""
    plan = ForwardPlan(model)
    convs = [[op.module for op in plan.stem if op.kind == "conv"]]
    convs += [[op.module for op in blk.residual if op.kind == "conv"] for blk in plan.plan]
    return {b: int(cast(nn.Conv2d, c[-1]).out_channels) for b, c in zip(plan.blocks, convs)}


def split_channels(channels: Mapping[str, int], parts: int,
                   cost: Mapping[str, float] | None = None) -> list[tuple[str, int, int]]:
    """(block, first channel, end) ranges for about `parts` projection tasks of similar cost: `cost` is a
    channel's at each block (default: i + 1 at the i-th block, whose projection runs through every block
    before it); every block gets at least one range."""
    per = cost if cost is not None else {b: float(i + 1) for i, b in enumerate(channels)}
    weight = {b: c * per[b] for b, c in channels.items()}
    total = sum(weight.values())
    out = []
    for b, c in channels.items():
        n = max(1, min(c, round(parts * weight[b] / total)))
        edges = np.linspace(0, c, n + 1).round().astype(int)
        out += [(b, int(lo), int(hi)) for lo, hi in zip(edges, edges[1:])]
    return out


def receptive_field(model: nn.Module, block: str) -> tuple[int, int, int]:
    """(size, stride, offset) of `block`'s receptive field in input pixels, from the architecture: the output
    at (y, x) sees input rows offset + y * stride ... offset + y * stride + size - 1 (and columns alike; an
    offset < 0 is padding). At a residual block, the union of its residual branch and its shortcut."""
    plan = ForwardPlan(model)
    if block not in plan.blocks:
        raise ExamplesError(f"block {block!r}: not a block of this model; valid: {', '.join(plan.blocks)}")
    field = _through([op.module for op in plan.stem if op.kind == "conv"], (0, 1, 1))
    if block == "conv1":
        return field[2], field[1], field[0]
    if plan.pool is not None:
        field = _through([plan.pool], field)
    for blk in plan.plan[:plan.blocks.index(block)]:
        res = _through([op.module for op in blk.residual if op.kind == "conv"], field)
        short = _through([op.module for op in blk.shortcut if op.kind == "conv"], field)
        left = min(res[0], short[0])
        field = (left, res[1], max(res[0] + res[2], short[0] + short[2]) - left)
    return field[2], field[1], field[0]


def _through(layers: Sequence[Any], field: tuple[int, int, int]) -> tuple[int, int, int]:
    """(offset, jump, size) after a chain of convolutions / poolings (square kernels assumed equal per axis)."""
    left, jump, size = field
    for m in layers:
        k, s, p, d = (_first(getattr(m, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
        left, size, jump = left - p * jump, size + (k - 1) * d * jump, jump * s
    return left, jump, size


def _first(v: Any) -> int:
    if isinstance(v, str):  # 'same' / 'valid' padding
        raise ExamplesError(f"padding {v!r}: the receptive field needs numeric padding")
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def field_box(field: tuple[int, int, int], y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(R, 4) int32 boxes (y0, x0, y1, x1), y1/x1 exclusive, of the receptive field at (y, x) (may leave the image)."""
    size, stride, offset = field
    y0, x0 = offset + np.asarray(y) * stride, offset + np.asarray(x) * stride
    return np.stack([y0, x0, y0 + size, x0 + size], axis=-1).astype(np.int32)


def crop(images: torch.Tensor, boxes: np.ndarray, fill: Sequence[float] | float = 0.0) -> torch.Tensor:
    """The patches (R, C, P, Q) under boxes (R, 4) of images (R, C, H, W), P = min(box height, H): a box that
    fits in height is cut out exactly, off-image parts filled with `fill` (per channel); a taller box (a field
    larger than the image) gives the whole height. Columns alike."""
    r, c, h, w = images.shape
    size_y, size_x = int(boxes[0, 2] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 1])
    p, q = min(size_y, h), min(size_x, w)
    out = torch.empty(r, c, p, q, dtype=images.dtype, device=images.device)
    out[:] = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    for i, (y0, x0, _, _) in enumerate(np.asarray(boxes).tolist()):
        y0, x0 = (y0 if size_y <= h else 0), (x0 if size_x <= w else 0)
        ys, ye, xs, xe = max(y0, 0), min(y0 + p, h), max(x0, 0), min(x0 + q, w)
        if ye > ys and xe > xs:
            out[i, :, ys - y0:ye - y0, xs - x0:xe - x0] = images[i, :, ys:ye, xs:xe]
    return out


def shrink(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Tiles (R, C, P, Q) at most `size` pixels a side, by area averaging (aspect kept); uint8 stays uint8."""
    p, q = tiles.shape[-2:]
    if max(p, q) <= size:
        return tiles
    out = (max(1, round(p * size / max(p, q))), max(1, round(q * size / max(p, q))))
    small = torch.nn.functional.interpolate(tiles.float(), size=out, mode="area")
    return small.round().clamp(0, 255).to(torch.uint8) if tiles.dtype == torch.uint8 else small.to(tiles.dtype)


_TRANSIENT = 5  # the largest layer output's copies alive at once in a projection's forward and backward (measured)


@torch.no_grad()
def projection_footprint(model: nn.Module, block: str, hw: tuple[int, int]) -> tuple[int, int]:
    """(fixed, per row) bytes of `project` from `block` in float32. Fixed: the tape's BN-folded copy of every
    convolution's weights up to the block, and two of the largest (a transposed convolution's weights in
    another layout, for a moment). Per row: every block's activation up to the block (the tape keeps them),
    the stem max-pool's int64 switches, and _TRANSIENT copies of the largest layer output. From the shapes of
    an empty batch's forward (forward_hooked: nothing is computed). Within 25% of the peak a CPU run allocates for
    ResNet-20 at 32 px, ResNet-18 at 64 px and ResNet-50 at 224 px (tests/viz/test_projection.py)."""
    names, mods = block_names(model), block_modules(model)
    seen: dict[str, int] = {"acts": 0, "largest": 0, "pool": 0, "weights": 0, "widest": 0}
    done = [False]

    def leaf(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if done[0]:
            return
        seen["largest"] = max(seen["largest"], per_image(out))
        if isinstance(module, nn.MaxPool2d):
            seen["pool"] += per_image(out)
        if isinstance(module, nn.Conv2d):
            seen["weights"] += module.weight.numel()
            seen["widest"] = max(seen["widest"], module.weight.numel())

    def at_block(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if not done[0]:
                seen["acts"] += per_image(out)
                done[0] = name == block
        return hook
    hooks = [m.register_forward_hook(leaf) for m in model.modules() if not any(m.children())]
    hooks += [mods[n].register_forward_hook(at_block(n)) for n in names[:names.index(block) + 1]]
    forward_hooked(model, hw, hooks)
    fixed = 4 * (seen["weights"] + 2 * seen["widest"])
    return fixed, 4 * seen["acts"] + 8 * seen["pool"] + 4 * _TRANSIENT * seen["largest"]


def forward_hooked(model: nn.Module, hw: tuple[int, int], hooks: Sequence[Any]) -> None:
    """One forward of an empty (0, 3, H, W) batch, which computes nothing but every output's shape, on the model's
    device for the forward `hooks` registered on it (which count per image: `per_image`); removed after, whatever
    happens."""
    try:
        p = next(model.parameters())
        model(torch.empty(0, 3, *hw, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()


def per_image(out: torch.Tensor) -> int:
    """Elements of one image's share of a batch's output (B, ...)."""
    return math.prod(out.shape[1:])


@torch.no_grad()
def project(deconvnet: Any, x: torch.Tensor, block: str, channel: torch.Tensor, y: torch.Tensor,
            xpos: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(projections (R, 3, H, W) float32, the seed values (R,)): row r is the deconvnet projection (path
    both) of image x[rows[r]] (normalised; rows None: x[r]) seeded with channel[r]'s activation at (y[r],
    xpos[r]) only, all else zero. Each image of x goes forward once, however many rows use it."""
    flushed = torch.set_flush_denormal(True)  # a single seed leaves subnormal dust: ~30x slower on CPUs (measured)
    try:
        return _project(deconvnet, x, block, channel, y, xpos, rows)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _project(deconvnet: Any, x: torch.Tensor, block: str, channel: torch.Tensor, y: torch.Tensor,
             xpos: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    deconvnet.forward(x, upto=block)
    if rows is not None:
        deconvnet.take(rows)
    act = deconvnet.activations(block)  # (R, C, h, w)
    r = torch.arange(act.shape[0], device=act.device)
    ch, yy, xx = (t.to(act.device) for t in (channel, y, xpos))
    value = act[r, ch, yy, xx]
    seed = torch.zeros_like(act)
    seed[r, ch, yy, xx] = value
    return deconvnet.backward(block, seed, "both").float(), value.float()
