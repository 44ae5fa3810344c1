"""Feature visualization (Olah, Mordvintsev & Schubert 2017, "Feature Visualization", Distill; Lucid/Lucent):
for each channel of a block, an input optimised to maximise the channel's spatial mean activation at the
block's output, made readable by Lucid's priors.

The image of a row is parameterised, as in Lucid, by
  - a Fourier spectrum (3, H, W//2+1) per row, scaled by 1/max(f, 1/max(H, W))^decay_power (f: frequency in
    cycles per pixel), made an image by an orthonormal inverse real FFT divided by 4 (Lucid's constant): Adam's
    equal steps on every coefficient change low frequencies more (`spectrum_to_image`, `image_to_spectrum`);
  - colour decorrelation: the 3 channels are mixed by a colour matrix (`decorrelate`), by default Lucid's
    ImageNet one (U sqrt(S) of ImageNet's RGB covariance, divided by its largest column norm). CIFAR-10's
    (`color_correlation` of 10,000 training images) differs from it by < 0.02 in every entry, so the default
    needs no data; pass color=color_correlation(pixels) for data far from natural photographs;
  - a sigmoid to the pixel box [0, 1], then the data's normalisation (x - mean) / std: x is always a valid
    image of the network's input space.
Each step every row sees its image through its own random transform (`random_affines`: translation, zoom and
rotation in one bilinear resampling; outside the frame the data's mean colour, like Lucid's grey padding):
the optimum must be robust to them (Lucid's transformation robustness). Their sizes are fractions of the image,
so they mean the same at 32 and 224 px. The transforms and the start are drawn up front from a generator per
row seeded by (seed, block, channel): a row's path does not depend on the other rows; same seed, same result.
The block's final ReLU passes Lucid's redirected gradient (`RedirectedReLU`) to a row whose channel is off
everywhere, which the plain gradient (zero) would leave at its start for good.

All channels of the requested blocks are rows of ONE batched optimisation (Adam per row, torch's update): the
rows of several blocks are stacked along the batch and each block's rows leave the stack at its output
(batch norm folded into the convolutions), so a row of an early block costs only the forward up to its block.
Every `check_every` steps the untransformed activation of the running rows is measured; a row stops at the
first check where it rose by less than `plateau` (relative) over the last `window` steps (a saturated or dead
channel), or after `steps`. Between checks nothing waits on the device. The defaults (128 steps at lr 0.2)
reach at least Lucent's activation (512 steps at lr 0.05) on 95% of the channels of a trained ResNet-20
(`jobs/benchmark.py featviz`).

Why not hpcviz.explain.rowopt.minimise: its objective is a function of (x, rows) with the stopping rule watching the
value of every step; here the objective changes every step (the transforms) and the stopping rule watches
another quantity (the untransformed activation), measured only at checks: with minimise, an extra forward
every step or a noisy plateau test. The loop below is rowopt's Adam on compacted running rows.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, JobError
from .deconv import max_pool
from .forward import ForwardPlan, PlanError, apply
from .inversion import CIFAR10_MEAN, CIFAR10_STD, autocast, resolve_precision

# Lucid's ImageNet colour correlation: U sqrt(S) of the RGB covariance (lucid/optvis/param/color.py)
LUCID_COLOR = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
MAGIC = 4.0  # Lucid divides the FFT image by 4 ("reduces saturation")


class FeatvizError(JobError):
    """The optimisation diverged (one line: block, channel, step and a hint)."""


@dataclass
class FeatvizConfig:
    steps: int = 128                  # at most this many Adam steps per channel
    lr: float = 0.2                   # Adam step size on the (scaled) spectrum coefficients (Lucid: 0.05)
    lr_end: float = 1.0               # the lr is cosine-annealed to lr * lr_end at `steps` (1: constant, Lucid's)
    decay_power: float = 1.0          # the spectrum is scaled by 1 / frequency^decay_power (Lucid's 1)
    init_std: float = 0.01            # std of the initial spectrum coefficients (Lucid's)
    jitter: float = 0.06              # random translation, up to this fraction of the image side, per axis
    scale: float = 0.1                # random zoom, in [1 - scale, 1 + scale]
    rotate: float = 10.0              # random rotation, degrees, in [-rotate, rotate]
    check_every: int = 16             # steps between checks (the untransformed activation; one host sync)
    window: int = 64                  # plateau: a row stops once its untransformed activation rose by less
    plateau: float = 0.02             # than this (relative) over the last `window` steps (0: never)
    redirect: bool = True             # a channel that is off everywhere gets the gradient of its pre-activation
    #                                   through the block's final ReLU until it fires (Lucid's redirected ReLU)
    seed: int = 0
    batch: int = 0                    # rows optimised at once (0: all); more run in groups, one after another
    fast_forward: bool = True         # batch norm folded into the convolutions, channels-last on CPUs
    exact: bool = True                # deterministic max-pool backward on GPUs (ImageNet stem)
    precision: str = "auto"           # of the steps, as the inversion's (auto: bf16 autocast with channels-last
    #                                   on CUDA, exact fp32 elsewhere); the checks and the stored value: fp32


# --------------------------------------------------------------------------------------------
# the parameterisation: spectrum -> image -> colours -> pixels -> network input

def rfft_freqs(h: int, w: int) -> torch.Tensor:
    """|f| in cycles per pixel of every coefficient of an (h, w) real FFT, (h, w//2 + 1)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """Lucid's 1 / max(|f|, 1/max(h, w))^decay_power, (h, w//2 + 1) float32."""
    return (1.0 / rfft_freqs(h, w).clamp_min(1.0 / max(h, w)) ** decay_power).float()


def spectrum_to_image(spec: torch.Tensor, scale: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(R, 3, h, w//2+1, 2) real and imaginary parts -> (R, 3, h, w): irfft2(scale * spec, ortho) / 4."""
    return torch.fft.irfft2(torch.view_as_complex(spec) * scale, s=hw, norm="ortho") / MAGIC


def image_to_spectrum(image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of `spectrum_to_image`: (R, 3, h, w) -> (R, 3, h, w//2+1, 2)."""
    return torch.view_as_real(torch.fft.rfft2(image * MAGIC, norm="ortho") / scale).contiguous()


def color_matrix(color: torch.Tensor | Sequence[Sequence[float]] | None = None) -> torch.Tensor:
    """The mixing matrix (3, 3): a colour correlation (default Lucid's) divided by its largest column norm."""
    c = torch.as_tensor(LUCID_COLOR if color is None else color, dtype=torch.float32)
    if c.shape != (3, 3):
        raise InputError(f"color matrix of shape {tuple(c.shape)}: need (3, 3); hint: color_correlation(pixels)")
    return c / c.norm(dim=0).max()


def color_correlation(pixels: torch.Tensor) -> torch.Tensor:
    """Lucid's colour correlation of a data set: U sqrt(S) of the RGB covariance U S U^T of pixels in [0, 1]
    (uint8 (B, 3, H, W) or float), (3, 3), columns by decreasing variance, each with a positive sum."""
    p = pixels.float() / (255.0 if pixels.dtype == torch.uint8 else 1.0)
    rgb = p.permute(1, 0, 2, 3).reshape(3, -1).double()
    u, s, _ = torch.linalg.svd(torch.cov(rgb))
    u = u * torch.where(u.sum(0) < 0, -1.0, 1.0)
    return (u * s.sqrt()).float()


def decorrelate(t: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Mix the 3 channels of (R, 3, H, W) by color (3, 3): out[:, d] = sum_c color[d, c] t[:, c]."""
    return torch.einsum("dc,rchw->rdhw", color, t)


class Param:
    """Spectrum rows -> normalised network input (see the module docstring); `inverse` goes back."""

    def __init__(self, hw: tuple[int, int], cfg: FeatvizConfig, mean: Sequence[float], std: Sequence[float],
                 color: torch.Tensor | Sequence[Sequence[float]] | None, device: torch.device) -> None:
        self.h, self.w = hw
        self.scale = spectrum_scale(self.h, self.w, cfg.decay_power).to(device)  # (h, w//2+1)
        self.color = color_matrix(color).to(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def pixels(self, spec: torch.Tensor) -> torch.Tensor:
        """(R, 3, h, w//2+1, 2) -> pixels in (0, 1), (R, 3, H, W)."""
        return torch.sigmoid(decorrelate(spectrum_to_image(spec, self.scale, (self.h, self.w)), self.color))

    def __call__(self, spec: torch.Tensor) -> torch.Tensor:
        return (self.pixels(spec) - self.mean) / self.std  # (R, 3, H, W) normalised

    def inverse(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in (0, 1) -> the spectrum whose image they are (for a start from an image, and the tests)."""
        t = decorrelate(torch.logit(pixels.float()), torch.linalg.inv(self.color))
        return image_to_spectrum(t, self.scale)


# --------------------------------------------------------------------------------------------
# transformation robustness: one random affine resampling per row and step

def random_affines(gen: torch.Generator, steps: int, cfg: FeatvizConfig, hw: tuple[int, int]) -> torch.Tensor:
    """(steps, 2, 3) affine_grid matrices of a random translation (up to cfg.jitter of the side), zoom
    (1 +- cfg.scale, > 1 magnifies) and rotation (+- cfg.rotate degrees, in pixel units on any aspect)."""
    u = 2 * torch.rand(steps, 4, generator=gen, dtype=torch.float64) - 1  # (steps, 4) in [-1, 1)
    zoom = 1 + cfg.scale * u[:, 2]
    a = math.radians(cfg.rotate) * u[:, 3]
    h, w = hw
    cos, sin = torch.cos(a) / zoom, torch.sin(a) / zoom
    theta = torch.stack([torch.stack([cos, -sin * h / w, 2 * cfg.jitter * u[:, 0]], 1),
                         torch.stack([sin * w / h, cos, 2 * cfg.jitter * u[:, 1]], 1)], 1)
    return theta.float()


def transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (R, 3, H, W) normalised, resampled through theta (R, 2, 3) (bilinear; outside the frame: 0, the
    data's mean colour, like Lucid's grey padding)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def row_seed(seed: int, block: str, channel: int) -> int:
    """The seed of one row's generator: its start and its transforms depend on (seed, block, channel) only."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{block}:{int(channel)}".encode())) % (2 ** 63)


# --------------------------------------------------------------------------------------------
# the rows and their objective

class RedirectedReLU(torch.autograd.Function):
    """relu(z) whose backward, for a row where the ReLU passes no gradient at all (a channel that is off
    everywhere: its plain gradient is zero and it could never start), lets the gradient through wherever it
    raises z (Lucid's redirected ReLU gradient); other rows get the plain ReLU gradient. z: (r, h, w)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        z, = ctx.saved_tensors
        plain = torch.where(z > 0, g, torch.zeros_like(g))
        redirected = torch.where((z <= 0) & (g < 0), torch.zeros_like(g), g)
        off = plain.flatten(1).abs().amax(1) == 0  # (r,) rows that would get no gradient
        return torch.where(off.view(-1, 1, 1), redirected, plain)


def stacked_pre_relu(plan: ForwardPlan, x: torch.Tensor, wanted: Sequence[str], sizes: Sequence[int],
                     pooling: Any) -> list[torch.Tensor]:
    """`ForwardPlan.stacked`, but each block's rows leave with the block's output BEFORE its final ReLU (the
    same ops, so relu of it is the plain activation bit for bit)."""
    idx = [plan.index(b) for b in wanted]
    out: list[torch.Tensor] = []
    z = apply(plan.stem[:-1], x.to(plan.dtype))  # the stem ends with its ReLU
    k = 0
    for i in range(len(plan.plan) + 1):
        if i:  # the block's input: the previous output after its ReLU (and the stem's max-pool)
            h = F.relu(z) if i > 1 else plan.pool_input(F.relu(z), pooling)
            blk = plan.plan[i - 1]
            z = apply(blk.residual, h) + (apply(blk.shortcut, h) if blk.shortcut else h)
        while k < len(idx) and idx[k] == i:
            out.append(z[:sizes[k]].float())
            z = z[sizes[k]:]
            k += 1
        if k == len(idx):
            break
    return out


class Rows:
    """The rows: (block, channel) pairs, block-major in forward order. `evaluate(x, rows, counts)` returns the
    spatial mean activation of each row's channel at its block, (r,), in one stacked forward; with
    `redirect` its gradient goes through the block's final ReLU as `RedirectedReLU`'s (the value is the same)."""

    def __init__(self, plan: ForwardPlan, names: list[str], channels: list[torch.Tensor], exact: bool,
                 channels_last: bool = False, precision: str = "exact") -> None:
        self.plan, self.names, self.exact, self.channels_last = plan, names, exact, channels_last
        self.precision = precision  # of the steps (`step`); `evaluate` alone runs in fp32
        dev = plan.device
        self.block = torch.cat([torch.full((len(c),), i, dtype=torch.int64) for i, c in enumerate(channels)]).to(dev)
        self.channel = torch.cat(channels).to(dev)

    def counts(self, rows: torch.Tensor) -> list[int]:
        """How many of the (sorted) rows belong to each block (one host sync)."""
        return torch.bincount(self.block[rows], minlength=len(self.names)).tolist()

    def step(self, x: torch.Tensor, rows: torch.Tensor, counts: list[int], redirect: bool) -> torch.Tensor:
        """`evaluate` in the steps' precision (bf16 autocast on GPUs: tensor cores, half the activations'
        bytes; the value that leaves is float32)."""
        with autocast(self.precision, x.device):
            return self.evaluate(x, rows, counts, redirect)

    def evaluate(self, x: torch.Tensor, rows: torch.Tensor, counts: list[int], redirect: bool = False) -> torch.Tensor:
        wanted = [b for b, k in zip(self.names, counts) if k]
        sizes = [k for k in counts if k]
        if self.channels_last:  # oneDNN's faster layout on CPUs (~10%, as the inversion's)
            x = x.contiguous(memory_format=torch.channels_last)
        pool = lambda h, p: max_pool(h, p, self.exact)  # noqa: E731
        acts = (stacked_pre_relu(self.plan, x, wanted, sizes, pool) if redirect else
                self.plan.stacked(x, wanted, sizes, pool))
        out, start = [], 0
        for a in acts:  # (r_b, C, h, w) -> each row's own channel, averaged over space
            one = a[torch.arange(len(a), device=a.device), self.channel[rows[start:start + len(a)]]]  # (r_b, h, w)
            out.append((RedirectedReLU.apply(one) if redirect else one).mean((-2, -1)))
            start += len(a)
        return torch.cat(out)


def channel_means(model: nn.Module | ForwardPlan, blocks: Sequence[str], channels: Sequence[torch.Tensor],
                  x: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """The plain, untransformed objective: each row's channel's spatial mean at its block, (R,) float32, for
    normalised images x (R, 3, H, W) whose rows are block-major (len(channels[k]) rows of blocks[k], in
    forward order). The stored `value` of a visualization, and how the benchmark measures any image."""
    plan = model if isinstance(model, ForwardPlan) else ForwardPlan(model)
    rows = Rows(plan, list(blocks), [torch.as_tensor(c, dtype=torch.int64) for c in channels], exact)
    with torch.no_grad():
        return rows.evaluate(x.to(plan.device, plan.dtype), torch.arange(len(x), device=plan.device),
                             [len(c) for c in channels]).float()


def row_bytes(model: nn.Module, blocks: Sequence[str], image_size: int | tuple[int, int] = 32) -> dict[str, int]:
    """{block: the bytes autograd keeps for one more row's step at that block} (float32: what its backward
    needs, the bulk of a row's memory), counted on the meta device: nothing is computed or allocated. What
    every row shares (the weights a convolution keeps for its backward: 45 MB for ResNet-18, more than a row
    of it at 32 px) is not a row's: the count is two rows' less one row's. `model`: on the meta device (e.g.
    built under `with torch.device("meta")`). Sizes the rows optimised at once."""
    hw = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    plan = ForwardPlan(model).folded()
    out = {}
    for b in blocks:
        kept = []
        for n in (1, 2):
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
                saved[id(t)] = t.numel() * t.element_size()  # a tensor saved twice counts once
                return t
            x = torch.zeros(n, 3, *hw, device="meta", requires_grad=True)
            rows = Rows(plan, [b], [torch.zeros(n, dtype=torch.int64, device="meta")], exact=False)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                f = rows.evaluate(x, torch.arange(n, device="meta"), [n], redirect=True)
            torch.autograd.grad(f.sum(), x)
            kept.append(sum(saved.values()))
        out[b] = int(kept[1] - kept[0])
    return out


def _requests(plan: ForwardPlan, blocks: Mapping[str, Sequence[int] | None] | Sequence[str] | str,
              hw: tuple[int, int]) -> tuple[list[str], list[torch.Tensor]]:
    """(block names in forward order, each one's channels (int64)): validated by one probe forward."""
    wanted: dict[str, Sequence[int] | None] = ({blocks: None} if isinstance(blocks, str) else
                                               dict(blocks) if isinstance(blocks, Mapping) else dict.fromkeys(blocks))
    if not wanted:
        raise InputError("featviz: no blocks given; hint: e.g. blocks=['layer1.0'] or {'layer1.0': [0, 3]}")
    for b in wanted:
        plan.index(b)  # PlanError (an InputError) naming the valid blocks
    names = [b for b in plan.blocks if b in wanted]
    with torch.no_grad():
        probe = torch.zeros(1, 3, *hw, device=plan.device, dtype=plan.dtype)
        try:
            acts = plan.run(probe, names[-1], lambda h, p: max_pool(h, p, False))
        except RuntimeError as e:
            raise InputError(f"image_size {hw}: too small for this model ({e}); hint: the training size") from None
    chans = []
    for b in names:
        n = acts[b].shape[1]
        c = torch.arange(n) if wanted[b] is None else torch.as_tensor(list(wanted[b] or []), dtype=torch.int64)
        if c.numel() == 0 or c.dim() != 1 or int(c.min()) < 0 or int(c.max()) >= n:
            raise InputError(f"channels {list(wanted[b] or [])} of block {b}: need a non-empty list in 0..{n - 1}")
        chans.append(c)
    return names, chans


# --------------------------------------------------------------------------------------------
# the optimisation

def _optimise(rows: Rows, param: Param, spec: torch.Tensor, theta: torch.Tensor, cfg: FeatvizConfig,
              progress: Callable[[int, int, int, int], None] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam ascent of every row's transformed activation; the running rows' state is kept compact (rows that
    stop leave it at a check). Returns (final spectra (R, ...), steps (R,), the untransformed value at the
    start and at each check (R, 1 + checks))."""
    n, every = len(spec), cfg.check_every
    curve = spec.new_full((n, 1 + math.ceil(cfg.steps / every)), float("nan"))  # column 0: the start
    out, steps = spec.clone(), torch.full((n,), cfg.steps, dtype=torch.int64)
    active = torch.arange(n, device=spec.device)
    counts = rows.counts(active)
    with torch.no_grad():
        curve[:, 0] = rows.evaluate(param(spec), active, counts)
    p, m, v = spec.clone(), torch.zeros_like(spec), torch.zeros_like(spec)
    b1, b2, eps, back = 0.9, 0.999, 1e-8, cfg.window // every
    for step in range(cfg.steps):
        lr = cfg.lr * (cfg.lr_end + (1 - cfg.lr_end) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        p.requires_grad_(True)
        f = rows.step(transform(param(p), theta[:, step]), active, counts, cfg.redirect)
        g, = torch.autograd.grad(f.sum(), p)
        p = p.detach()
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2 ** (step + 1))).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=lr / (1 - b1 ** (step + 1)))  # ascent: maximise the activation
        if (step + 1) % every and step + 1 < cfg.steps:
            continue
        k = 1 + step // every
        with torch.no_grad():
            val = rows.evaluate(param(p), active, counts)
        curve[active, k] = val
        if not bool(torch.isfinite(val).all()):
            bad = int(active[~torch.isfinite(val)][0])
            raise FeatvizError(f"feature visualization of block {rows.names[int(rows.block[bad])]} channel "
                               f"{int(rows.channel[bad])} diverged at step {step + 1}; hint: lower lr (now {cfg.lr:g})")
        keep = torch.ones_like(val, dtype=torch.bool)
        if cfg.plateau > 0 and back and k >= back:
            prev = curve[active, k - back]
            keep = (val - prev) > cfg.plateau * prev.abs()
        if step + 1 == cfg.steps:
            keep = torch.zeros_like(keep)
        if progress is not None:
            progress(step + 1, cfg.steps, int(keep.sum()), n)
        if bool(keep.all()):
            continue
        done = active[~keep]
        out[done], steps[done.cpu()] = p[~keep], step + 1
        active, p, m, v, theta = active[keep], p[keep], m[keep], v[keep], theta[keep]
        if not len(active):
            break
        counts = rows.counts(active)
    last = torch.where(torch.isnan(curve), -torch.inf, torch.arange(curve.shape[1], device=curve.device)).argmax(1)
    curve = torch.where(torch.isnan(curve), curve.gather(1, last[:, None]), curve)  # held once a row stopped
    return out, steps, curve


def _start(names: list[str], chans: list[torch.Tensor], cfg: FeatvizConfig, hw: tuple[int, int],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's initial spectrum (R, 3, h, w//2+1, 2) and transforms (R, steps, 2, 3), from its own generator."""
    specs, thetas = [], []
    for b, cs in zip(names, chans):
        for c in cs.tolist():
            g = torch.Generator().manual_seed(row_seed(cfg.seed, b, c))
            specs.append(cfg.init_std * torch.randn(3, hw[0], hw[1] // 2 + 1, 2, generator=g))
            thetas.append(random_affines(g, cfg.steps, cfg, hw))
    return torch.stack(specs).to(device), torch.stack(thetas).to(device)


def visualize(model: nn.Module, blocks: Mapping[str, Sequence[int] | None] | Sequence[str] | str,
              cfg: FeatvizConfig | None = None, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD, image_size: int | tuple[int, int] = 32,
              color: torch.Tensor | Sequence[Sequence[float]] | None = None,
              progress: Callable[[int, int, int, int], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Feature visualizations of channels of `blocks` (a block, a list of blocks: all their channels, or
    {block: channels or None}), all rows of one optimisation. mean/std: the data's normalisation; color: a
    colour correlation (3, 3) (default Lucid's ImageNet one; see `color_correlation`). Returns {block: {"x":
    (C, 3, H, W) float32, normalised input space; "value": (C,) the channel's spatial mean activation at the
    block's output for x, untransformed (a plain forward of x gives it); "steps": (C,) int64 steps taken;
    "channels": (C,) int64; "curve": (C, 1 + checks) the untransformed value at the start and at each check,
    held once the row stopped}}, on the CPU. progress(step, steps, running, rows) is called at each check
    (of each group of cfg.batch rows)."""
    cfg = cfg or FeatvizConfig()
    if cfg.steps < 1 or cfg.check_every < 1 or cfg.window % cfg.check_every:
        raise InputError(f"featviz steps {cfg.steps}, check_every {cfg.check_every}, window {cfg.window}: need "
                         "steps >= 1, check_every >= 1 and window a multiple of check_every")
    hw = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    try:
        plan = ForwardPlan(model)
    except PlanError as e:
        raise InputError(str(e)) from None
    precision = resolve_precision(cfg.precision, plan.device)
    cl = cfg.fast_forward and (plan.device.type == "cpu" or precision == "bf16")
    fast = plan.folded(channels_last=cl) if cfg.fast_forward else plan
    names, chans = _requests(plan, blocks, hw)
    param = Param(hw, cfg, mean, std, color, plan.device)
    flat = [(i, c) for i, cs in enumerate(chans) for c in cs.tolist()]  # every row: (block number, channel)
    size = cfg.batch or len(flat)
    xs, values, steps, curves = [], [], [], []
    for g0 in range(0, len(flat), size):  # groups of rows one after another (memory); the same rows alike
        part = flat[g0:g0 + size]
        idx = sorted({i for i, _ in part})
        g_names, g_chans = [names[i] for i in idx], [torch.tensor([c for j, c in part if j == i]) for i in idx]
        spec, theta = _start(g_names, g_chans, cfg, hw, plan.device)
        out, st, cu = _optimise(Rows(fast, g_names, g_chans, cfg.exact, cl, precision), param, spec, theta, cfg,
                                progress)
        with torch.no_grad():
            x = param(out)
        values.append(channel_means(plan, g_names, g_chans, x, cfg.exact).cpu())
        xs.append(x.float().cpu())
        steps.append(st)
        curves.append(cu.float().cpu())
    x, value, steps_all, curve = torch.cat(xs), torch.cat(values), torch.cat(steps), torch.cat(curves)
    res, start = {}, 0
    for b, cs in zip(names, chans):
        sl = slice(start, start + len(cs))
        res[b] = {"x": x[sl], "value": value[sl], "steps": steps_all[sl], "channels": cs.clone(),
                  "curve": curve[sl]}
        start += len(cs)
    return res


def visualize_channels(model: nn.Module, block: str, channels: Sequence[int] | None = None,
                       cfg: FeatvizConfig | None = None, mean: Sequence[float] = CIFAR10_MEAN,
                       std: Sequence[float] = CIFAR10_STD, image_size: int | tuple[int, int] = 32,
                       color: torch.Tensor | Sequence[Sequence[float]] | None = None,
                       progress: Callable[[int, int, int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """`visualize` of one block's channels (default: all of them): {"x", "value", "steps", "channels", "curve"}."""
    return visualize(model, {block: channels}, cfg, mean, std, image_size, color, progress)[block]
