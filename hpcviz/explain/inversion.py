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

Optimisation (hpcviz.rowopt): every (block, image) pair is its own problem, one row of one batch; they
never interact, and each row stops on its own once its relative feature error is at most `target`
(0.05), once it cannot reach it at its recent rate of progress within `steps` steps (a plateau; see
hpcviz.rowopt), or after `steps` steps, whichever comes first: a batch does not wait for its slowest
image, and the steps and the final error of every row are returned. The default solver is L-BFGS per
row, kept in the valid box by projection (one forward and backward per step once its unit steps are
accepted), which reaches a given error in several times fewer passes than Adam (4.6x faster per image on a
trained ResNet-20, measured by `jobs/benchmark.py viz`); `solver="adam"` is Adam with step decay, x
projected onto the box. x0 = small seeded noise, the same for every image and block, so a
batched run and one-image runs start alike.

A homotopy (default on) gives the optimisation gradient where the hard functions give none: for the first
`soft_steps` (30%) of the steps every ReLU is a softplus t*softplus(h/t) (t = 0.5 in units of the folded
batch norm's output) and the ImageNet stem's max-pool passes the gradient of a log-sum-exp at 2 std of its
input (straight-through: the max's value), both annealed linearly to the hard functions; the rows run at
least that long and then 5 steps (one check) on the hard network before their first verdict, and the stored
error is always the hard network's. Measured on 16 held-out images
(median / 90th percentile relative error at the last block, without -> with): a ResNet-20 after 2 epochs
(35% val) 0.284/0.481 -> 0.051/0.083; trained (85.8%) 0.102/0.226 -> 0.052/0.105; a ResNet-18 with the
ImageNet stem (80%), the block after the max-pool, layer1.1: 0.124/0.153 -> docs/benchmarks.md. Dead units
are why the plain ReLU stalls: a pixel change that would switch a unit on has zero gradient until it does.
(A straight-through ReLU was measured too: it stalls at once.)

Several blocks are inverted in one call with ONE forward per
step: the rows of all blocks are stacked along the batch and each block's rows leave the stack at its
output (`ForwardPlan.stacked`, with batch norm folded into the convolutions: the same function with half
the ops). The forward is functional (eval-mode batch norm; the model is neither modified nor hooked), on
the model's device; on CUDA each step's forward and backward is a replayed CUDA graph (`graphs`, see
hpcviz.explain.cuda_graphs).

The API is split in three: `make_targets` (phi0 of every block, from images or stored activations),
`Objective` (the per-row objective and error) and `invert` (the optimisation, per row).

A non-finite loss or x blowing up raises InversionError naming the block, step and loss.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..config import PRIORS
from ..errors import InputError, JobError
from .cuda_graphs import StepCache
from .deconv import max_pool, soft_max_pool
from .forward import ForwardPlan, PlanError
from .rowopt import RowOptConfig, minimise

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_B_RATIO = 80.0 / 255.0     # the 2016 paper's typical pixel value B = 80 on a 0..255 range
_V_RATIO = 1.0 / 6.5        # V = B / 6.5
SOLVERS = ("lbfgs", "adam")
PRECISIONS = ("auto", "exact", "bf16", "tf32")  # of the optimisation; the stored errors are always exact
GPU_PRECISION = "bf16"      # what "auto" means on CUDA
_EXACT_CHUNK = 64           # images per pass of the final exact errors
_CHECK = 5                  # rowopt's check_every
_SOFT_STAGE = 25            # steps between the homotopy's temperatures (each change: one more evaluation)


class InversionError(JobError, FloatingPointError):
    """The optimisation diverged (one line: block, step, loss and a hint)."""


@dataclass
class InversionConfig:
    solver: str = "lbfgs"             # lbfgs | adam (see hpcviz.rowopt)
    steps: int = 800                  # at most this many steps per image and block
    target: float = 0.05              # a row stops once ||phi(x) - phi0|| / ||phi0|| <= target (0: never)
    plateau: float = 1e-3             # ... or once its objective improved less than this (relative), or its
    window: int = 100                 # error's rate over this many steps misses the target (0: never)
    history: int = 20                 # lbfgs: curvature pairs per row
    lr: float = 0.015                 # adam: step size, in units of the data range width r = mean(1/std)
    milestones: tuple[float, ...] = (0.8, 0.95)   # adam: fractions of the steps where lr is multiplied by gamma
    gamma: float = 0.1                # adam: step-decay factor
    alpha: float = 6.0                # exponent of the alpha-norm prior
    beta: float = 2.0                 # exponent of the TV prior
    lambda_alpha: float = 1e-5        # multiplier of the range-normalised alpha-norm, 1/(C H W B^alpha)
    lambda_tv: float = 1e-4           # multiplier of the range-normalised TV, 1/(C H W V^beta)
    prior: str = "tv"                 # one of PRIORS
    clamp: bool = True                # keep x in the valid pixel box (projected after every step)
    init_scale: float = 0.01          # x0 noise std, in units of the range width
    seed: int = 0
    exact: bool = True                # deterministic max-pool backward on GPUs (False: torch's atomic one, faster)
    fast_forward: bool = True         # batch norm folded into the convolutions, channels-last on CPUs (False:
    #                                   the plain functional forward of before, for the benchmark's baseline)
    graphs: bool = True               # on CUDA: each step a replayed CUDA graph (hpcviz.explain.cuda_graphs)
    precision: str = "auto"           # of the optimisation, one of PRECISIONS (auto: bf16 autocast on CUDA,
    #                                   exact fp32 elsewhere); the stored error is recomputed in exact fp32
    soft_pool: float = 2.0            # the stem's max-pool as a log-sum-exp at this temperature at first, in
    #                                   units of its input's std per channel, annealed to the max (0: the max)
    soft_steps: float = 0.3           # ... linearly over this fraction of `steps` (the hard functions after); the
    #                                   rows of the blocks it changes run at least that long (see _holds)
    soft_mode: str = "st"             # the soft max-pool: st, the max's value with the log-sum-exp's gradient;
    #                                   soft, the log-sum-exp itself (the soft ReLU is always the softplus)
    soft_relu: float = 0.5            # every ReLU as t softplus(h / t) at first, t this (in units of the folded
    #                                   batch norm's output), annealed to the ReLU like soft_pool (0: the ReLU)
    precondition: float = 0.0         # lbfgs: its initial inverse Hessian a low-pass filter whose spectrum falls
    #                                   as (f_min / f)^(2 this), f the spatial frequency (0: the identity)


# --------------------------------------------------------------------------------------------
# the terms, per image

def alpha_norm(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """||x||_alpha^alpha per image: sum over channels and pixels of |x|^alpha, (B,)."""
    return _row_sum(x.abs().pow(alpha))


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
    return _row_sum(t)


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all but the first dimension, (B,): no flatten, which copies a channels-last tensor and makes
    its gradient contiguous (every backward op before it then mixes layouts, several times slower on CPUs)."""
    return t.sum(tuple(range(1, t.dim())))


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
# the targets, the objective, the optimisation

def make_targets(plan: ForwardPlan, blocks: Sequence[str] | str | None, images: torch.Tensor | None = None,
            stored: Mapping[str, torch.Tensor] | None = None,
            input_size: tuple[int, int] | None = None) -> tuple[list[str], dict[str, torch.Tensor], tuple[int, int]]:
    """(block names in forward order, {block: phi0 (B, C, h, w) float32}, the input's (H, W)): from the
    normalised images (one no-grad forward up to the deepest block) or from stored activations."""
    blocks = [blocks] if isinstance(blocks, str) else blocks
    if not blocks:
        blocks = list(stored) if stored else plan.blocks
    unknown = [b for b in blocks if b not in plan.blocks]
    if unknown:
        raise InputError(f"blocks {','.join(unknown)}: not blocks of this model; valid: {', '.join(plan.blocks)}")
    names = [b for b in plan.blocks if b in set(blocks)]
    if images is not None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images of shape {tuple(images.shape)}: need (B, 3, H, W) normalised input")
        with torch.no_grad():
            acts = plan.run(images.to(plan.device, plan.dtype), names[-1], lambda h, p: max_pool(h, p, False))
        return names, {b: acts[b].float() for b in names}, (int(images.shape[-2]), int(images.shape[-1]))
    if not stored:
        raise InputError("invert: give images= (normalised input) or targets= {block: activation}")
    missing = [b for b in names if b not in stored]
    if missing:
        raise InputError(f"targets lack blocks {','.join(missing)}; hint: pass images= instead")
    phi0 = {b: stored[b].to(plan.device, torch.float32) for b in names}
    if len({p.shape[0] for p in phi0.values()}) > 1:
        raise InputError("targets: blocks with different batch sizes")
    hw = phi0[names[0]].shape
    return names, phi0, input_size or _input_size(plan, names[0], (int(hw[-2]), int(hw[-1])))


def _input_size(plan: ForwardPlan, block: str, hw: tuple[int, int]) -> tuple[int, int]:
    """The input (H, W) whose activation at `block` has spatial size hw (probe: stride at 64 px)."""
    pool = lambda h, p: max_pool(h, p, False)  # noqa: E731
    with torch.no_grad():
        probe = torch.zeros(1, 3, 64, 64, device=plan.device, dtype=plan.dtype)
        s = 64 // plan.stacked(probe, [block], [1], pool)[0].shape[-1]
        size = (hw[0] * s, hw[1] * s)
        got = plan.stacked(torch.zeros(1, 3, *size, device=plan.device, dtype=plan.dtype), [block], [1], pool)
    if tuple(got[0].shape[-2:]) != tuple(hw):
        raise InputError(f"targets of block {block}: cannot infer the input size from {tuple(hw)}; "
                         "hint: pass images=, or input_size=(H, W)")
    return size


class Objective:
    """The per-row objective: rows are (block, image) pairs, block-major in forward order; row k is block
    names[k // n], image k % n. `evaluate(x, images, sizes)` returns (E (r,), relative error (r,)) of x
    (r, 3, H, W) in one stacked forward, sizes[j] rows being block names[j]'s and `images` their images.
    The targets live in static buffers of `capacity` images that each batch's targets are copied into
    (`load`), so a captured step serves every batch of a task."""

    def __init__(self, plan: ForwardPlan, names: list[str], shapes: Sequence[Sequence[int]], capacity: int,
                 hw: tuple[int, int], cfg: InversionConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        self.plan, self.names, self.cfg, self.capacity, self.n = plan, names, cfg, capacity, 0
        dev = plan.device
        self.channels_last = channels_last(cfg, dev)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format  # the activations' layout
        self.targets = [torch.zeros(capacity, *s, device=dev).contiguous(memory_format=fmt)
                        for s in shapes]  # per block (N, C, h, w)
        self.norms = torch.ones(len(names), capacity, device=dev)               # ||phi0||^2 per block, image
        c, (h, w) = 3, hw
        r, bval, vval = data_scale(mean, std)
        self.r = r
        self.lam_a = cfg.lambda_alpha / (c * h * w * bval ** cfg.alpha)
        self.lam_v = cfg.lambda_tv / (c * h * w * vval ** cfg.beta)
        m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.lo, self.hi = (0 - m) / s, (1 - m) / s
        self.precision = resolve_precision(cfg.precision, dev)
        self.anneal = torch.ones((), device=dev)  # the soft max-pool's temperature factor, set at the checks
        self.phase, self.factor = "hard", 0.0      # "soft" while the homotopy runs (part of a step's key)

    def soft_span(self) -> int:
        """Steps of the homotopy's soft phase (0: none): soft_steps of the steps, a multiple of the checks'."""
        cfg = self.cfg
        if not (cfg.soft_relu > 0 or (cfg.soft_pool > 0 and self.plan.pool is not None)):
            return 0
        return min(cfg.steps, _CHECK * round(cfg.soft_steps * cfg.steps / _CHECK))

    def at_step(self, step: int) -> bool:
        """The homotopy's state for the steps from `step` on (called at the checks: no sync, a fill): the
        temperature falls linearly in stages of _SOFT_STAGE steps, to the hard functions after the soft span.
        Returns whether the objective changed."""
        span = self.soft_span()
        factor = 1 - (step // _SOFT_STAGE) * _SOFT_STAGE / span if step < span else 0.0
        phase = "soft" if factor > 0 else "hard"
        changed = (phase, factor) != (self.phase, self.factor)
        self.phase, self.factor = phase, factor
        if phase == "soft":
            self.anneal.fill_(factor)
        return changed

    def relu(self, h: torch.Tensor) -> torch.Tensor:
        """The ReLU as the optimisation sees it (see soft_relu)."""
        if self.phase == "hard" or self.cfg.soft_relu <= 0:
            return F.relu(h)
        t = (self.cfg.soft_relu * self.anneal).to(h.dtype)
        return t * F.softplus(h / t)

    def pool(self, h: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        """The stem's max-pool as the optimisation sees it (see soft_pool)."""
        if self.phase == "hard" or self.cfg.soft_pool <= 0:
            return max_pool(h, pool, self.cfg.exact)
        std = h.detach().float().flatten(2).std(2).clamp_min(1e-6)[..., None, None]  # (r, C, 1, 1)
        temperature = (self.cfg.soft_pool * self.anneal) * std
        return soft_max_pool(h, pool, temperature.to(h.dtype), self.cfg.soft_mode == "st")

    def load(self, phi0: dict[str, torch.Tensor]) -> None:
        """This batch's targets into the static buffers."""
        n = self.n = phi0[self.names[0]].shape[0]
        assert n <= self.capacity, (n, self.capacity)
        for j, b in enumerate(self.names):
            self.targets[j][:n] = phi0[b]
            self.norms[j, :n] = phi0[b].flatten(1).pow(2).sum(1).clamp_min(1e-12)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor,
                 sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.evaluate(x, rows % self.n, sizes)

    def evaluate(self, x: torch.Tensor, images: torch.Tensor,
                 sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, error) of the rows: no host sync (a CUDA graph can capture it)."""
        which = [j for j, k in enumerate(sizes) if k]
        # the network in channels-last, the priors on x as it comes (slicing a channels-last x would give
        # its gradient a second layout)
        net_x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with autocast(self.precision, x.device):
            phis = self.plan.stacked(net_x, [self.names[j] for j in which], [sizes[j] for j in which], self.pool,
                                     self.relu)
        sse, norms, start = [], [], 0
        for j, p in zip(which, phis):
            im = images[start:start + len(p)]
            sse.append(_row_sum((p - self.targets[j][im]).pow(2)))
            norms.append(self.norms[j][im])
            start += len(p)
        err2 = torch.cat(sse)
        rel = err2 / torch.cat(norms)
        error = rel.detach().sqrt()
        if self.cfg.prior == "none":
            return err2, error
        return rel + self.lam_a * alpha_norm(x, self.cfg.alpha) + self.lam_v * tv_norm(x, self.cfg.beta), error

    def exact_error(self, x: torch.Tensor) -> torch.Tensor:
        """The relative feature error of every row of x (R, 3, H, W), recomputed in exact fp32 (no TF32, no
        autocast) with the hard max-pool: what is stored, whatever the optimisation used."""
        n, k = self.n, len(self.names)
        errors = torch.zeros(k, n, device=self.plan.device)
        for i in range(0, n, _EXACT_CHUNK):  # no gradient: a chunk of images at a time bounds the memory
            m = min(n, i + _EXACT_CHUNK) - i
            xs = torch.cat([x[j * n + i:j * n + i + m] for j in range(k)]).to(self.plan.device)
            with torch.no_grad(), dist.numerics(exact=True):
                phis = self.plan.stacked(xs, self.names, [m] * k, lambda h, p: max_pool(h, p, False))
            for j, p in enumerate(phis):
                errors[j, i:i + m] = relative_error(p, self.targets[j][i:i + m])
        return errors.flatten()


def low_pass(hw: tuple[int, int], decay: float, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The preconditioner K of `precondition`: per channel, the spectrum times (f_min / max(f, f_min))^(2 decay)
    (f in cycles per pixel, f_min = 1 / max(H, W)), an orthonormal real FFT: symmetric positive definite, so
    gamma K is a valid initial inverse Hessian; it moves coarse structure first (images' spectra fall as 1/f)."""
    if decay <= 0:
        return None
    h, w = hw
    f_min = 1.0 / max(h, w)
    f = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2).clamp_min(f_min)
    spectrum = ((f_min / f) ** (2 * decay)).to(device)  # (H, W // 2 + 1), 1 at the lowest frequencies

    def k(v: torch.Tensor) -> torch.Tensor:  # (P, 3 H W) -> (P, 3 H W)
        u = torch.fft.rfft2(v.view(len(v), -1, h, w), norm="ortho") * spectrum
        return torch.fft.irfft2(u, s=(h, w), norm="ortho").flatten(1).to(v.dtype)
    return k


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast on CUDA (see GPU_PRECISION), exact fp32 elsewhere; else as given (tf32 off CUDA:
    exact, there is no TF32 there)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: not one of {', '.join(PRECISIONS)}; hint: precision='auto'")
    if precision == "auto":
        return GPU_PRECISION if device.type == "cuda" else "exact"
    return "exact" if precision == "tf32" and device.type != "cuda" else precision


def channels_last(cfg: InversionConfig, device: torch.device) -> bool:
    """Channels-last activations: on CPUs with the fast forward (oneDNN: ~15% faster per step), on GPUs
    unless exact (tensor cores)."""
    if device.type == "cpu":
        return cfg.fast_forward
    return cfg.fast_forward and resolve_precision(cfg.precision, device) != "exact"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision of "bf16" (see `resolve_precision`), else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    # cache off: a cast weight cached across a CUDA graph's capture would be freed under it
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def _numerics(precision: str) -> contextlib.AbstractContextManager:
    """TF32 for "tf32"; no TF32 for "exact"; as the task set them otherwise (bf16 autocast decides)."""
    if precision == "tf32":
        return dist.numerics(exact=False)
    return dist.numerics(exact=True) if precision == "exact" else contextlib.nullcontext()


def invert(model: nn.Module, targets: Mapping[str, torch.Tensor] | None = None,
           images: torch.Tensor | None = None, blocks: Sequence[str] | str | None = None,
           cfg: InversionConfig | None = None, mean: Sequence[float] = CIFAR10_MEAN,
           std: Sequence[float] = CIFAR10_STD, input_size: tuple[int, int] | None = None,
           progress: Callable[[int, int, int, int], None] | None = None,
           cache: StepCache | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Inversions of `blocks` (default: the keys of `targets`, else every block) for a batch.

    images: the normalised network input (B, 3, H, W) the targets are taken from; or targets:
    {block: (B, C, h, w)} stored activations (H, W from `input_size` or inferred). mean/std: the
    per-channel normalisation of the input (the data range; see the module doc for the lambdas).
    Returns {block: {"x": (B, 3, H, W) float32 on the CPU, normalised input space; "error": (B,)
    relative feature error ||phi(x)-phi0||/||phi0|| of the final x, exact fp32; "steps": (B,) int64, the
    steps each took; "loss": (B, cfg.steps) objective per image and step, held at its last value once the
    image stopped; "check_error": (B, cfg.steps) the error the stopping rule saw at each check, NaN
    elsewhere}}. progress(step, steps, running, rows) is called at each check (every few steps): step k
    of at most `steps`, and how many of the (block, image) rows are still running. cache: the array task's
    StepCache (its objective and captured steps serve every batch); default: a new one. Raises
    InversionError if it diverges, InputError on bad input."""
    cfg = cfg or InversionConfig()
    _validate(cfg)
    cache = cache if cache is not None else StepCache(graphs=cfg.graphs)
    plan = cache.get("plan", (model, cfg.fast_forward, channels_last(cfg, _device(model))),
                     lambda: _forward_plan(model, cfg))
    names, phi0, (h, w) = make_targets(plan, blocks, images=images, stored=targets, input_size=input_size)
    n = phi0[names[0]].shape[0]
    key = (plan, tuple(names), (h, w), _objective_key(cfg), tuple(mean), tuple(std))
    shapes = [phi0[b].shape[1:] for b in names]
    objective = cache.get("objective", key, lambda: Objective(plan, names, shapes, n, (h, w), cfg, mean, std),
                          lambda o: o.capacity >= n)
    objective.load(phi0)
    objective.at_step(0)
    del phi0  # in the static buffers now
    rows = len(names) * n
    x0, lo, hi = _start(objective, cfg, rows, (h, w), plan.device)
    opt = RowOptConfig(method=cfg.solver, steps=cfg.steps, target=cfg.target, plateau=cfg.plateau,
                       window=cfg.window, history=cfg.history, lr=cfg.lr, milestones=cfg.milestones,
                       gamma=cfg.gamma, check_every=_CHECK, hold=_holds(objective))
    check = _divergence_check(names, n, cfg)

    def on_check(step: int, running: torch.Tensor, f: torch.Tensor) -> bool:
        check(step, running, f)
        if progress is not None:
            progress(step + 1, cfg.steps, len(running), rows)
        return objective.at_step(step + 1)
    groups = [j for j in range(len(names)) for _ in range(n)]
    with _numerics(objective.precision):
        result = minimise(objective, x0, opt, lo, hi, objective.r, on_check, cache.value_grad(plan.device),
                          groups, cache.bucket(plan.device), low_pass((h, w), cfg.precondition, plan.device))
    if not torch.isfinite(result.x).all().item():
        raise InversionError(f"inversion of blocks {','.join(names)}: non-finite x after {cfg.steps} steps; "
                             "hint: lower lr or raise lambda_tv")
    assert result.errs is not None  # minimise always records the checks' errors
    host = [t.cpu() for t in (result.x.float(), objective.exact_error(result.x).float(), result.steps,
                              result.curves.float(), result.errs.float())]  # one copy each, then views per block
    return {b: dict(zip(("x", "error", "steps", "loss", "check_error"), (t[j * n:(j + 1) * n] for t in host)))
            for j, b in enumerate(names)}


def _holds(objective: Objective) -> tuple[int, ...]:
    """Per block, the steps its rows run at least: the homotopy's soft span and one check's hard steps for the
    blocks it changes (every block with soft_relu; else those after the stem's max-pool), 0 for the others
    (conv1: no pool before it). The checks in the soft span see the soft network's error, so the first verdict
    is the one after some steps on the hard network (measured on a trained ResNet-20, 8 images: medians 1-4%
    lower at every block for 2% more steps). (A straight-through ReLU, whose error would be the true one from
    the start, was measured: it stalls.)"""
    span, plan = objective.soft_span(), objective.plan
    if not span:
        return (0,) * len(objective.names)
    hold = min(objective.cfg.steps, span + _CHECK)
    return tuple(hold if objective.cfg.soft_relu > 0 or plan.index(b) > 0 else 0 for b in objective.names)


def _start(objective: Objective, cfg: InversionConfig, rows: int, hw: tuple[int, int],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x0 (rows, 3, H, W): the same seeded noise for every row, the box lo and hi or None when not clamped)."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    noise = (cfg.init_scale * objective.r) * torch.randn(1, 3, *hw, generator=g)
    x0 = noise.to(device).expand(rows, 3, *hw).clone()
    if not cfg.clamp:
        return x0, None, None
    return torch.maximum(torch.minimum(x0, objective.hi), objective.lo), objective.lo, objective.hi


def _validate(cfg: InversionConfig) -> None:
    if cfg.prior not in PRIORS:
        raise InputError(f"prior {cfg.prior!r}: not one of {', '.join(PRIORS)}; hint: prior='tv'")
    if cfg.solver not in SOLVERS:
        raise InputError(f"solver {cfg.solver!r}: not one of {', '.join(SOLVERS)}; hint: solver='lbfgs'")
    if cfg.steps < 1:
        raise InputError(f"steps {cfg.steps}: need >= 1")
    if cfg.soft_mode not in ("st", "soft"):
        raise InputError(f"soft_mode {cfg.soft_mode!r}: not one of st, soft; hint: soft_mode='st'")
    resolve_precision(cfg.precision, torch.device("cpu"))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _forward_plan(model: nn.Module, cfg: InversionConfig) -> ForwardPlan:
    try:
        plan = ForwardPlan(model)
        return plan.folded(channels_last=channels_last(cfg, plan.device)) if cfg.fast_forward else plan
    except PlanError as e:
        raise InputError(str(e)) from None


def _objective_key(cfg: InversionConfig) -> tuple:
    """The config fields a captured step depends on."""
    return (cfg.prior, cfg.alpha, cfg.beta, cfg.lambda_alpha, cfg.lambda_tv, cfg.exact, cfg.fast_forward,
            cfg.precision, cfg.soft_pool, cfg.soft_steps, cfg.soft_mode, cfg.soft_relu, cfg.steps)


def _divergence_check(names: list[str], n: int,
                      cfg: InversionConfig) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """A check of the running rows' objectives: a non-finite value is an InversionError naming the block."""
    def check(step: int, rows: torch.Tensor, f: torch.Tensor) -> None:  # host tensors (rowopt's check)
        bad = [(int(r), v) for r, v in zip(rows.tolist(), f.tolist()) if not math.isfinite(v)]
        if bad:
            row, value = bad[0]
            raise InversionError(
                f"inversion of block {names[row // n]} diverged at step {step + 1}/{cfg.steps} (image {row % n}, "
                f"loss {value}); hint: lower lr (now {cfg.lr:g}) or raise lambda_tv "
                f"(now {cfg.lambda_tv:g}), or keep clamp=True")
    return check
