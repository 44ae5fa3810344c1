"""Feature inversion (Mahendran & Vedaldi 2015, 2016): recover an input from a block's activation.

Given target activations phi0 = phi(x0) at a block (from images, or stored), find x that minimises,
per image,

    E(x) = ||phi(x) - phi0||^2 / ||phi0||^2  +  lam_a * ||x||_alpha^alpha  +  lam_v * TV_beta(x)

with prior "tv" (the 2016 objective), or with prior "none" the course report's plain sum of squared
errors ||phi(x) - phi0||^2 (no normalisation, no regulariser).

- ||x||_alpha^alpha = sum over channels and pixels of |x|^alpha (`alpha_norm`);
- TV_beta(x) = sum over channels and pixels of (dx^2 + dy^2)^(beta/2), with forward differences
  dx = x[., ., u, v+1] - x[., ., u, v], dy = x[., ., u+1, v] - x[., ., u, v] over height and width and
  the Neumann (replicate) boundary: dx = 0 in the last column, dy = 0 in the last row, so every
  difference of the image is counted exactly once (`tv_norm`).

Scaling to the data range (2016 paper, sec. "balancing the terms"). The network input is normalised
per channel, pixel range [0, 1] -> [(0 - m_c)/s_c, (1 - m_c)/s_c], of width r_c = 1/s_c. With
r = mean_c r_c the paper's constants (B = 80 typical pixel value for a range of width 255, V = B/6.5
typical difference) become

    B = (80/255) * r,        V = B / 6.5,
    lam_a = lambda_alpha / (C*H*W * B^alpha),      lam_v = lambda_tv / (C*H*W * V^beta),

so that each regulariser is ~ lambda * O(1) for a natural image of that range and size, like the
normalised feature loss; `lambda_alpha`/`lambda_tv` of the config are dimensionless multipliers that
need no per-layer tuning. The learning rate is also relative to the range: Adam's step is lr * r.
x is projected onto the valid box [(0 - m)/s, (1 - m)/s] after every step (`clamp`, default on).

Optimisation: Adam on x (one variable per block and image), x0 = small seeded noise (the same for every
image and block, so that a batched run and one-image runs start alike), step decay of the learning rate
(x0.1 at each fraction in `milestones`), jitter (the same random roll of up to `jitter` px for the
whole batch each step, applied to the feature term only; off after `jitter_stop` of the steps).
Batched: each image has its own objective; they are summed for the optimiser (Adam is elementwise, so
the images do not interact). Several blocks are inverted in one call with ONE forward per step: the
variables of all blocks are stacked along the batch and each block's slice leaves the stack at its
block's output. The forward is functional (deconv's plan: eval-mode batch norm, the model is neither
modified nor hooked), on the model's device.

A non-finite loss or x blowing up raises InversionError naming the block, step and loss.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .config import PRIORS
from .deconv import Deconvnet, max_pool
from .errors import InputError, JobError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_B_RATIO = 80.0 / 255.0     # the 2016 paper's typical pixel value B = 80 on a 0..255 range
_V_RATIO = 1.0 / 6.5        # V = B / 6.5
_CHECK_EVERY = 10           # steps between divergence checks (a device sync each)
_BLOWUP = 1e4               # |x| > _BLOWUP * range width counts as divergence


class InversionError(JobError, FloatingPointError):
    """The optimisation diverged (one line: block, step, loss and a hint)."""


@dataclass
class InversionConfig:
    steps: int = 1000                 # optimiser steps (1000: median error <= 0.07 at every ResNet-20 block)
    lr: float = 0.015                 # Adam step size, in units of the data range width r = mean(1/std)
    alpha: float = 6.0                # exponent of the alpha-norm prior
    beta: float = 2.0                 # exponent of the TV prior
    lambda_alpha: float = 1e-5        # multiplier of the range-normalised alpha-norm, 1/(C H W B^alpha)
    lambda_tv: float = 1e-4           # multiplier of the range-normalised TV, 1/(C H W V^beta)
    jitter: int = 0                   # px: random roll of up to +-jitter each step (1 costs accuracy)
    jitter_stop: float = 0.6          # fraction of the steps after which jitter is off (fine convergence)
    milestones: tuple[float, ...] = (0.8, 0.95)   # fractions of the steps where lr is multiplied by gamma
    gamma: float = 0.1                # step-decay factor
    prior: str = "tv"                 # one of PRIORS
    clamp: bool = True                # project x onto the valid pixel box after each step
    init_scale: float = 0.01          # x0 noise std, in units of the range width
    seed: int = 0
    exact: bool = True                # deterministic max-pool backward on GPUs (False: torch's atomic one, faster)


# --------------------------------------------------------------------------------------------
# the terms, per image

def alpha_norm(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """||x||_alpha^alpha per image: sum over channels and pixels of |x|^alpha, (B,)."""
    return x.abs().pow(alpha).flatten(1).sum(1)


def tv_norm(x: torch.Tensor, beta: float) -> torch.Tensor:
    """TV_beta per image, (B,): sum over channels and pixels of (dx^2 + dy^2)^(beta/2), forward
    differences over width (dx) and height (dy), zero past the last column / row (Neumann boundary)."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    sq = dx * dx + dy * dy
    if beta == 2:
        t = sq
    else:  # the gradient of s^(beta/2) is infinite at 0 for beta < 2: a tiny floor keeps it finite
        t = (sq + (1e-12 if beta < 2 else 0.0)).pow(beta / 2)
    return t.flatten(1).sum(1)


def relative_error(phi: torch.Tensor, phi0: torch.Tensor) -> torch.Tensor:
    """||phi - phi0|| / ||phi0|| per image, (B,) (an all-zero phi0 counts as norm 1e-12)."""
    d = (phi.float() - phi0.float()).flatten(1).norm(dim=1)
    return d / phi0.float().flatten(1).norm(dim=1).clamp_min(1e-12)


def data_scale(mean: Sequence[float], std: Sequence[float]) -> tuple[float, float, float]:
    """(r, B, V): the mean range width 1/std, the typical pixel value and the typical difference."""
    r = float(sum(1.0 / float(s) for s in std) / len(std))
    b = _B_RATIO * r
    return r, b, _V_RATIO * b


# --------------------------------------------------------------------------------------------
# the functional forward (deconv's plan, with autograd)

def _apply(ops, h: torch.Tensor) -> torch.Tensor:
    for op in ops:
        m = op.module
        if op.kind == "conv":
            h = F.conv2d(h, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif op.kind == "bn":
            h = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        else:
            h = F.relu(h)
    return h


class _Forward:
    """phi for several blocks at once: the batch is the stack of the blocks' slices, shallowest first;
    each slice leaves the stack at its block's output."""

    def __init__(self, model: nn.Module, exact: bool = True) -> None:
        self.deconv = d = Deconvnet(model, exact)
        self.exact = exact
        self.blocks, self.stem, self.pool, self.plan = d.blocks, d._stem, d._pool, d._plan
        w = cast(nn.Conv2d, model.conv1).weight  # Deconvnet checked conv1 is an nn.Conv2d
        self.device, self.dtype = w.device, w.dtype

    def __call__(self, x: torch.Tensor, wanted: Sequence[str], sizes: Sequence[int]) -> list[torch.Tensor]:
        """x: (sum(sizes), 3, H, W), slices in the order of `wanted` (forward order)."""
        idx = [self.blocks.index(b) for b in wanted]
        out: list[torch.Tensor] = []
        k = 0
        h = _apply(self.stem, x.to(self.dtype))
        if idx[k] == 0:
            while k < len(idx) and idx[k] == 0:
                out.append(h[:sizes[k]].float())
                h = h[sizes[k]:]
                k += 1
        if k == len(idx):
            return out
        if self.pool is not None:
            h = max_pool(h, self.pool, self.exact)
        for i, blk in enumerate(self.plan, 1):
            r = _apply(blk.residual, h)
            h = F.relu(r + (_apply(blk.shortcut, h) if blk.shortcut else h))
            while k < len(idx) and idx[k] == i:
                out.append(h[:sizes[k]].float())
                h = h[sizes[k]:]
                k += 1
            if k == len(idx):
                break
        return out


def _input_size(fwd: _Forward, block: str, hw: tuple[int, int]) -> tuple[int, int]:
    """The input (H, W) whose activation at `block` has spatial size hw (probe: stride at 64 px)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, 64, 64, device=fwd.device, dtype=fwd.dtype)
        s = 64 // fwd(probe, [block], [1])[0].shape[-1]
        size = (hw[0] * s, hw[1] * s)
        got = fwd(torch.zeros(1, 3, *size, device=fwd.device, dtype=fwd.dtype), [block], [1])[0].shape[-2:]
    if tuple(got) != tuple(hw):
        raise InputError(f"targets of block {block}: cannot infer the input size from {tuple(hw)}; "
                         "hint: pass images=, or input_size=(H, W)")
    return size


# --------------------------------------------------------------------------------------------

def invert(model: nn.Module, targets: Mapping[str, torch.Tensor] | None = None,
           images: torch.Tensor | None = None, blocks: Sequence[str] | str | None = None,
           cfg: InversionConfig | None = None, mean: Sequence[float] = CIFAR10_MEAN,
           std: Sequence[float] = CIFAR10_STD, input_size: tuple[int, int] | None = None,
           ) -> dict[str, dict[str, torch.Tensor]]:
    """Inversions of `blocks` (default: the keys of `targets`, else every block) for a batch.

    images: the normalised network input (B, 3, H, W) the targets are taken from; or targets:
    {block: (B, C, h, w)} stored activations (H, W from `input_size` or inferred). mean/std: the
    per-channel normalisation of the input (the data range; see the module doc for the lambdas).
    Returns {block: {"x": (B, 3, H, W) float32 on the CPU, normalised input space; "error": (B,)
    relative feature error ||phi(x)-phi0||/||phi0|| of the final x (no jitter); "loss": (B, steps)
    objective per image and step}}. Raises InversionError if it diverges, InputError on bad input."""
    cfg = cfg or InversionConfig()
    if cfg.prior not in PRIORS:
        raise InputError(f"prior {cfg.prior!r}: not one of {', '.join(PRIORS)}; hint: prior='tv'")
    if cfg.steps < 1:
        raise InputError(f"steps {cfg.steps}: need >= 1")
    fwd = _Forward(model, cfg.exact)
    if isinstance(blocks, str):
        blocks = [blocks]
    if not blocks:
        blocks = list(targets) if targets else fwd.blocks
    unknown = [b for b in blocks if b not in fwd.blocks]
    if unknown:
        raise InputError(f"blocks {','.join(unknown)}: not blocks of this model; valid: {', '.join(fwd.blocks)}")
    names = [b for b in fwd.blocks if b in set(blocks)]
    dev = fwd.device

    if images is not None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images of shape {tuple(images.shape)}: need (B, 3, H, W) normalised input")
        acts = fwd.deconv.forward(images, upto=names[-1])   # one no-grad forward, every block
        phi0 = {b: acts[b].detach() for b in names}
        del acts
        n, (H, W) = images.shape[0], images.shape[-2:]
    elif targets:
        missing = [b for b in names if b not in targets]
        if missing:
            raise InputError(f"targets lack blocks {','.join(missing)}; hint: pass images= instead")
        phi0 = {b: targets[b].to(dev, torch.float32) for b in names}
        n = phi0[names[0]].shape[0]
        if any(p.shape[0] != n for p in phi0.values()):
            raise InputError("targets: blocks with different batch sizes")
        hw = phi0[names[0]].shape
        H, W = input_size or _input_size(fwd, names[0], (int(hw[-2]), int(hw[-1])))
    else:
        raise InputError("invert: give images= (normalised input) or targets= {block: activation}")

    nb, C = len(names), 3
    r, bval, vval = data_scale(mean, std)
    lam_a = cfg.lambda_alpha / (C * H * W * bval ** cfg.alpha)
    lam_v = cfg.lambda_tv / (C * H * W * vval ** cfg.beta)
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    lo, hi = (0 - m) / s, (1 - m) / s

    # deterministic start: the same seeded noise for every image and block
    g = torch.Generator().manual_seed(int(cfg.seed))
    noise = (cfg.init_scale * r) * torch.randn(1, C, H, W, generator=g)
    x = noise.to(dev).expand(nb * n, C, H, W).clone()
    if cfg.clamp:
        x = torch.maximum(torch.minimum(x, hi), lo)
    x.requires_grad_(True)
    norms = torch.cat([phi0[b].flatten(1).pow(2).sum(1) for b in names]).clamp_min(1e-12)  # (nb*n,)
    opt = torch.optim.Adam([x], lr=cfg.lr * r)
    cuts = sorted({max(1, min(cfg.steps, round(f * cfg.steps))) for f in cfg.milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cuts, cfg.gamma)
    rng = random.Random(int(cfg.seed))
    jitter_steps = int(round(cfg.jitter_stop * cfg.steps)) if cfg.jitter > 0 else 0
    losses = torch.empty(cfg.steps, nb * n, device=dev)
    sizes = [n] * nb

    def objective(xx: torch.Tensor, shift: tuple[int, int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        xin = torch.roll(xx, shift, dims=(2, 3)) if shift and shift != (0, 0) else xx
        phis = fwd(xin, names, sizes)
        sse = torch.cat([(p - phi0[b]).flatten(1).pow(2).sum(1) for b, p in zip(names, phis)])
        if cfg.prior == "none":
            return sse, phis
        return sse / norms + lam_a * alpha_norm(xx, cfg.alpha) + lam_v * tv_norm(xx, cfg.beta), phis

    def check(upto: int) -> None:
        seg = losses[:upto]
        bad = ~torch.isfinite(seg)
        big = (x.detach().abs().amax() > _BLOWUP * r).item() if upto else False
        if bad.any().item() or big:
            if bad.any().item():
                step, col = (int(v) for v in bad.nonzero()[0])
                what = f"loss {seg[step, col].item()}"
            else:
                step, col = upto - 1, int(x.detach().abs().flatten(1).amax(1).argmax())
                what = f"|x| {x.detach()[col].abs().max().item():.3g} beyond {_BLOWUP:g} x the data range"
            raise InversionError(
                f"inversion of block {names[col // n]} diverged at step {step + 1}/{cfg.steps} "
                f"(image {col % n}, {what}); hint: lower lr (now {cfg.lr:g}) or raise lambda_tv "
                f"(now {cfg.lambda_tv:g}), or keep clamp=True")

    for step in range(cfg.steps):
        shift = None
        if step < jitter_steps:
            shift = (rng.randint(-cfg.jitter, cfg.jitter), rng.randint(-cfg.jitter, cfg.jitter))
        per_image, _ = objective(x, shift)
        losses[step] = per_image.detach()
        grad, = torch.autograd.grad(per_image.sum(), x)
        x.grad = grad
        opt.step()
        sched.step()
        if cfg.clamp:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        if (step + 1) % _CHECK_EVERY == 0 or step + 1 == cfg.steps:
            check(step + 1)

    with torch.no_grad():
        xf = x.detach()
        phis = fwd(xf, names, sizes)
        if not torch.isfinite(xf).all().item():
            check(cfg.steps)
            raise InversionError(f"inversion of blocks {','.join(names)}: non-finite x after {cfg.steps} steps; "
                                 "hint: lower lr or raise lambda_tv")
    out: dict[str, dict[str, torch.Tensor]] = {}
    curves = losses.t().float().cpu()
    for j, b in enumerate(names):
        sl = slice(j * n, (j + 1) * n)
        out[b] = {"x": xf[sl].float().cpu(), "error": relative_error(phis[j], phi0[b]).cpu(),
                  "loss": curves[sl].contiguous()}
    return out
