"""How many images one `invert` call can take on a device: a per-row memory model of the inversion.

A row is one (block, image) pair. While the rows optimise, what a call holds is

  fixed       the folded forward's copy of the weights (and, under bf16 autocast, their bf16 casts; the
              model's own weights are on the device already);
  per image   the targets of every block twice (the task's static buffers and this batch's);
  per row     its start and final point (2 D floats), its objective curve and err record (2 x steps);
  per slot    (a row's place in the padded layout) the L-BFGS history, 2 x history x D floats (Adam:
              its two moments), and the step's vectors: the point, gradient, free mask, direction, trial
              point and the new gradient, plus the history update's temporaries (_VECTORS x D floats);
              the activations the stacked forward saves for its backward, up to the row's block (measured
              exactly on the meta device: no memory, no compute), the backward's gradients of the largest
              activations (_BACKWARD x the largest), and the priors' saved terms (_PRIOR x D floats);

with D = 3 H W. On a GPU the layout pads each block's rows to one shared power of two
(rowopt.shared_pow2), so the model sizes batches as powers of two: no padding at the start, where memory
peaks. The constants were measured (tests/explain/test_invmem.py holds the model within 25% of the peak a CPU
run allocates, for ResNet-20 at 32 px and ResNet-50 at 224 px).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .deconv import max_pool
from .forward import ForwardPlan

_VECTORS = 10    # D-float vectors per slot besides the history, at the step's peak (rowopt._lbfgs)
_BACKWARD = 2    # the largest activation's gradients alive at once in the backward
_PRIOR = 6       # D-float tensors the alpha-norm and TV terms save for their backward
_GRAPHS = 4      # static x and gradient of every captured shape: the shapes' sizes sum to about twice the first
HEADROOM = 0.85  # of the free memory: the allocator's fragmentation, cuDNN workspaces, CUDA graphs' pools


@dataclass
class Footprint:
    fixed: int                        # bytes whatever the batch
    per_image: dict[str, int]         # bytes per image of each block: its row, its slot and its targets

    def total(self, images: int, slots_per_image: float = 1.0) -> int:
        """Bytes of a call with `images` images (slots_per_image > 1: padding)."""
        return self.fixed + int(images * slots_per_image * sum(self.per_image.values()))


def footprint(model: nn.Module, blocks: Sequence[str], hw: tuple[int, int], steps: int, history: int,
              solver: str = "lbfgs", precision: str = "exact", fast_forward: bool = True,
              graphs: bool = False) -> Footprint:
    """The memory model of inverting `blocks` of `model` at input size hw (precision: "exact" | "tf32" |
    "bf16", as the optimisation runs, see hpcviz.explain.inversion.resolve_precision; graphs: CUDA graphs, whose
    static inputs and outputs hold _GRAPHS more D-float vectors per slot over all the shapes captured)."""
    low = precision == "bf16"
    meta = copy.deepcopy(model).to("meta")
    if low:
        meta = meta.to(torch.bfloat16)
    plan = ForwardPlan(meta)
    plan = plan.folded(channels_last=fast_forward) if fast_forward else plan
    d = 3 * hw[0] * hw[1]
    weights = sum(p.numel() * 4 for p in model.parameters())
    fixed = (weights if fast_forward else 0) + (weights // 2 if low else 0)  # the folded copy, the bf16 casts
    state = 2 * history * d * 4 if solver == "lbfgs" else 2 * d * 4
    per_image = {}
    for b in blocks:
        saved, largest, target = _activations(plan, b, hw, fast_forward)
        row = 2 * d * 4 + 2 * steps * 4
        slot = state + (_VECTORS + _PRIOR + (_GRAPHS if graphs else 0)) * d * 4 + saved + _BACKWARD * largest
        per_image[b] = row + slot + 2 * target
    return Footprint(fixed, per_image)


def _activations(plan: ForwardPlan, block: str, hw: tuple[int, int], channels_last: bool) -> tuple[int, int, int]:
    """(bytes saved for the backward, bytes of the largest saved activation, fp32 bytes of the target) of one
    row of `block`: forwards of 1 and 2 rows on the meta device, the difference per row (the weights that
    the convolutions save too are the same whatever the rows)."""
    def probe(rows: int) -> tuple[int, int, int]:
        saved: dict[int, int] = {}
        largest = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal largest
            n = t.numel() * t.element_size()
            saved[id(t)] = n
            if t.dim() == 4 and t.shape[0] == rows and id(t) not in weights:
                largest = max(largest, n // rows)
            return t
        x = torch.zeros(rows, 3, *hw, device="meta", dtype=plan.dtype, requires_grad=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = plan.stacked(x, [block], [rows], lambda h, p: max_pool(h, p, True))[0]
        return sum(saved.values()), largest, out[0].numel() * 4
    weights = {id(w) for op in _ops(plan) for w in (op.weight, op.bias, *(op.module.parameters() if op.module
                                                                           else ())) if w is not None}
    one, largest, target = probe(1)
    two, _, _ = probe(2)
    return two - one, largest, target


def _ops(plan: ForwardPlan) -> list:
    return [*plan.stem, *(op for b in plan.plan for op in (*b.residual, *b.shortcut))]


def batch_images(fp: Footprint, free_bytes: int, most: int = 1 << 16) -> int:
    """The largest power of two of images whose call fits HEADROOM of `free_bytes` (at least 1)."""
    n = 1
    while n * 2 <= most and fp.total(n * 2) <= HEADROOM * free_bytes:
        n *= 2
    return n
