"""Many independent small optimisation problems at once: one row of a batch each, each stopping on its own.

`minimise(fun, x0, cfg)` minimises, for every row i of x0 (R, ...), its own objective f_i(x_i), where
`fun(x, rows) -> (f, err)` evaluates the rows `rows` (a sorted index tensor) in one batched pass: f (r,)
to minimise, err (r,) the quality measure the stopping rule watches. The rows never interact, so a row
that has converged leaves the batch: later steps cost only what is still running.

A row stops at the first check (every `check_every` steps) where
  - err <= target (done), or
  - it will not get there (plateau): at the rate its err fell over the last `window` steps (log-linear,
    which overestimates later progress: convergence slows), the target is out of reach within `steps`; or
    its objective improved by less than `plateau` (relative) over those steps (the rule without a target),
  - or it has taken `steps` steps.
Measured on a trained ResNet-20 (`jobs/benchmark.py viz`): the projection stops rows bound for the step
limit early, a fifth of the steps at the deepest blocks, without changing which rows reach the target.

Methods:
  - "lbfgs": limited-memory BFGS per row (its own history of `history` pairs, two-loop recursion batched
    over the rows), Armijo backtracking per row. One evaluation per step once the unit step is accepted,
    which it nearly always is after the first few steps. On a box (lo, hi) the step moves only the free
    coordinates (those not held on a bound by their gradient: Bertsekas' two-metric projection) and each
    trial point is projected onto the box (cheaper than a sigmoid change of variables, measured).
  - "adam": Adam per row (the same update as torch's, state sliced with the rows), learning rate
    lr * scale with step decay at `milestones`, x projected onto the box after each step.

Deterministic: no randomness; a row's path does not depend on the other rows (up to the floating-point
order of batched kernels).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Fun = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ValueGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def with_grad(fun: Fun) -> ValueGrad:
    """(f, df/dx, err) of `fun` at x for `rows`, the gradient by autograd, all detached."""
    def value_grad(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        f, e = fun(x, rows)
        g, = torch.autograd.grad(f.sum(), x)
        return f.detach(), g, e.detach()
    return value_grad


@dataclass
class RowOptConfig:
    method: str = "lbfgs"             # lbfgs | adam
    steps: int = 300                  # at most this many steps per row
    target: float = 0.0               # stop a row once its err <= target (0: never)
    plateau: float = 1e-3             # stop a row whose objective improved by less than this (relative) ...
    window: int = 100                 # ... over this many steps (0: never; a multiple of check_every)
    check_every: int = 5              # steps between stop checks (each one syncs with the device)
    history: int = 10                 # lbfgs: curvature pairs kept per row
    lr: float = 0.05                  # adam: step size, times `scale`
    milestones: tuple[float, ...] = (0.8, 0.95)  # adam: fractions of `steps` where lr is multiplied by gamma
    gamma: float = 0.1


@dataclass
class RowOptResult:
    x: torch.Tensor                   # (R, ...) the final point of every row
    value: torch.Tensor               # (R,) its objective
    err: torch.Tensor                 # (R,) its err
    steps: torch.Tensor               # (R,) int64, steps taken
    curves: torch.Tensor              # (R, steps) objective per step, held at the last value once a row stopped
    stopped: list[str] = field(default_factory=list)  # per row: target | plateau | steps


class _Stopper:
    """The per-row stopping rule, and the record of every row's objective per step (and err per check)."""

    def __init__(self, n: int, cfg: RowOptConfig, like: torch.Tensor) -> None:
        self.cfg = cfg
        self.curves = like.new_full((n, cfg.steps), float("nan"))
        self.errs = like.new_full((n, cfg.steps), float("nan"))
        self.steps = torch.zeros(n, dtype=torch.int64, device=like.device)
        self.why = ["steps"] * n

    def record(self, rows: torch.Tensor, step: int, value: torch.Tensor) -> None:
        self.curves[rows, step] = value.detach().to(self.curves.dtype)
        self.steps[rows] = step + 1

    def keep(self, rows: torch.Tensor, step: int, err: torch.Tensor) -> torch.Tensor:
        """A mask over `rows`: the ones that go on after `step` (one host sync)."""
        cfg = self.cfg
        self.errs[rows, step] = err.to(self.errs.dtype)
        done = err <= cfg.target if cfg.target > 0 else torch.zeros_like(err, dtype=torch.bool)
        stuck = torch.zeros_like(done)
        if cfg.window and step + 1 > cfg.window:
            now, then = self.curves[rows, step], self.curves[rows, step - cfg.window]
            stuck = (then - now) <= cfg.plateau * then.abs().clamp_min(1e-30)
            if cfg.target > 0:  # steps still needed at the recent rate of log(err); a rate <= 0: never
                e_now, e_then = self.errs[rows, step].clamp_min(1e-30), self.errs[rows, step - cfg.window]
                rate = torch.log(e_then / e_now) / cfg.window
                need = torch.where(rate > 0, torch.log(e_now / cfg.target) / rate.clamp_min(1e-30),
                                   torch.full_like(rate, float("inf")))
                stuck |= ~done & (step + 1 + need > cfg.steps)
        last = step + 1 >= cfg.steps
        for i, (d, s) in enumerate(zip(done.tolist(), stuck.tolist())):
            if d or s or last:
                self.why[int(rows[i])] = "target" if d else ("plateau" if s else "steps")
        return ~(done | stuck) & (not last)

    def result(self, x: torch.Tensor, value: torch.Tensor, err: torch.Tensor) -> RowOptResult:
        curves = self.curves.clone()
        for i, n in enumerate(self.steps.tolist()):
            if 0 < n < curves.shape[1]:
                curves[i, n:] = curves[i, n - 1]
        return RowOptResult(x, value, err, self.steps, curves, self.why)


def minimise(fun: Fun, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None = None,
             hi: torch.Tensor | None = None, scale: float = 1.0,
             on_check: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
             value_grad: ValueGrad | None = None) -> RowOptResult:
    """Minimise every row of x0 on its own (see the module docstring). lo/hi: the box (broadcastable to one
    row), scale: the problem's natural step (adam's lr is relative to it). on_check(step, rows, f) runs at
    every check with the running rows' objectives (for divergence checks and progress). value_grad: (f,
    gradient, err) in one call where the caller has a faster way than autograd on `fun` (a CUDA graph)."""
    if cfg.method not in ("lbfgs", "adam"):
        raise ValueError(f"method {cfg.method!r}: not one of lbfgs, adam")
    run = _lbfgs if cfg.method == "lbfgs" else _adam
    return run(fun, value_grad or with_grad(fun), x0, cfg, lo, hi, scale, on_check)


def _adam(fun: Fun, value_grad: ValueGrad, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None,
          hi: torch.Tensor | None, scale: float, on_check: Callable | None) -> RowOptResult:
    x = x0.detach().clone()
    n = len(x)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    stop = _Stopper(n, cfg, x)
    rows = torch.arange(n, device=x.device)
    value, err = x.new_zeros(n), x.new_ones(n)
    b1, b2, eps = 0.9, 0.999, 1e-8
    cuts = sorted({max(1, min(cfg.steps, round(f * cfg.steps))) for f in cfg.milestones})
    for step in range(cfg.steps):
        xa = x[rows]
        f, g, e = value_grad(xa, rows)
        stop.record(rows, step, f)
        value[rows], err[rows] = f, e
        lr = cfg.lr * scale * cfg.gamma ** sum(step >= c for c in cuts)
        ma, va = m[rows].mul_(b1).add_(g, alpha=1 - b1), v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        upd = (ma / (1 - b1 ** (step + 1))) / ((va / (1 - b2 ** (step + 1))).sqrt() + eps)
        xn = xa - lr * upd
        if lo is not None and hi is not None:
            xn = torch.maximum(torch.minimum(xn, hi), lo)
        x[rows], m[rows], v[rows] = xn, ma, va
        if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps:
            if on_check is not None:
                on_check(step, rows, f)
            keep = stop.keep(rows, step, e)
            rows = rows[keep]
            if not len(rows):
                break
    with torch.no_grad():
        everything = torch.arange(n, device=x.device)
        value, err = fun(x, everything)
    return stop.result(x, value.detach(), err.detach())


class _History:
    """The L-BFGS curvature pairs of the running rows, in one ring shared by all of them: every step each
    row writes its pair at the same slot (a row that did not move, or whose pair is not positive, writes a
    zero pair that the recursion skips), so the two-loop recursion reads plain slices, never a gather."""

    def __init__(self, rows: int, d: int, mem: int, like: torch.Tensor) -> None:
        self.s = like.new_zeros(mem, rows, d)
        self.y = like.new_zeros(mem, rows, d)
        self.rho = like.new_zeros(mem, rows)
        self.gamma = like.new_zeros(rows)  # s.y / y.y of each row's newest valid pair (0: none yet)
        self.mem, self.pushed = mem, 0

    def push(self, s: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> None:
        k = self.pushed % self.mem
        sy = (s * y).sum(1)
        good = ok & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
        self.s[k], self.y[k] = s * good[:, None], y * good[:, None]
        self.rho[k] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        yy = torch.linalg.vecdot(y, y).clamp_min(1e-30)
        self.gamma = torch.where(good, sy / yy, self.gamma)
        self.pushed += 1

    def keep(self, mask: torch.Tensor) -> None:
        self.s, self.y, self.rho, self.gamma = self.s[:, mask], self.y[:, mask], self.rho[:, mask], self.gamma[mask]

    def direction(self, g: torch.Tensor, step0: float) -> torch.Tensor:
        """-H g per row (two-loop recursion); rows without a pair yet: steepest descent of length step0*sqrt(D)."""
        n = min(self.pushed, self.mem)
        order = [(self.pushed - 1 - j) % self.mem for j in range(n)]  # newest first
        q, alphas = g.clone(), []
        for k in order:  # a skipped pair is all zero with rho 0: it changes nothing
            a = self.rho[k] * torch.linalg.vecdot(self.s[k], q)
            q -= a[:, None] * self.y[k]
            alphas.append(a)
        first = step0 * math.sqrt(g.shape[1]) / g.norm(dim=1).clamp_min(1e-30)
        q *= torch.where(self.gamma > 0, self.gamma, first)[:, None]
        for k, a in zip(reversed(order), reversed(alphas)):
            b = self.rho[k] * torch.linalg.vecdot(self.y[k], q)
            q += self.s[k] * (a - b)[:, None]
        return -q


def _lbfgs(fun: Fun, value_grad: ValueGrad, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None,
           hi: torch.Tensor | None, scale: float, on_check: Callable | None) -> RowOptResult:
    shape, n = x0.shape[1:], len(x0)
    lo_f = lo.expand(1, *shape).flatten(1) if lo is not None else None
    hi_f = hi.expand(1, *shape).flatten(1) if hi is not None else None

    def evaluate(zz: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f, g, e = value_grad(zz.view(-1, *shape), rows)
        return f, g.flatten(1), e

    def project(zz: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(zz, hi_f), lo_f) if lo_f is not None and hi_f is not None else zz

    z = project(x0.detach().flatten(1).clone())
    out = z.clone()
    stop = _Stopper(n, cfg, z)
    rows = torch.arange(n, device=z.device)
    f, g, err = evaluate(z, rows)
    value, errs = f.clone(), err.clone()
    hist = _History(n, z.shape[1], cfg.history, z)
    step0 = 0.1 * scale  # the first step's length per coordinate, in units of the problem's scale
    for step in range(cfg.steps):
        free = free_variables(z, g, lo_f, hi_f)
        gf = g * free
        direction = hist.direction(gf, step0) * free
        gd = (gf * direction).sum(1)
        bad = gd >= 0  # not a descent direction (a poor history): steepest descent this once
        direction[bad], gd[bad] = -gf[bad], -(gf[bad] * gf[bad]).sum(1)
        z_new, fn, gn, en, moved = _armijo(evaluate, project, z, rows, (f, g, err), gd, direction)
        hist.push(z_new - z, gn - g, moved)
        z, f, g, err = z_new, fn, gn, en
        stop.record(rows, step, f)
        value[rows], errs[rows], out[rows] = f, err, z
        if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps:
            if on_check is not None:
                on_check(step, rows, f)
            keep = stop.keep(rows, step, err)
            if not bool(keep.all()):
                rows, z, f, g, err = rows[keep], z[keep], f[keep], g[keep], err[keep]
                hist.keep(keep)
            if not len(rows):
                break
    return stop.result(out.view(-1, *shape), value, errs)


def free_variables(z: torch.Tensor, g: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """1 where a coordinate may move, 0 where it sits on a bound that its gradient pushes against (the
    active set of the two-metric projection: quasi-Newton steps over the free coordinates only, or the
    projection of a step mixing both does not descend and stalls short of the box's minimum; tested)."""
    if lo is None or hi is None:
        return torch.ones_like(z)
    return (~(((z <= lo) & (g > 0)) | ((z >= hi) & (g < 0)))).to(z.dtype)


def _armijo(evaluate: Callable, project: Callable, z: torch.Tensor, rows: torch.Tensor,
            at_z: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gd: torch.Tensor, direction: torch.Tensor,
            c1: float = 1e-4, tries: int = 12):
    """Per row, the largest t in 1, 1/2, 1/4, ... with f(P(z + t d)) <= f + c1 t g.d (P: the projection onto
    the box); each try evaluates only the rows still looking. at_z: (f, gradient, err) at z. Rows that find
    none stay where they are, with those. Returns (the new z, its f, gradient and err, which rows moved)."""
    f = at_z[0]
    t = torch.ones(len(rows), device=z.device)
    z_new, fn, gn, en = z.clone(), f.clone(), at_z[1].clone(), at_z[2].clone()
    pending = torch.ones(len(rows), dtype=torch.bool, device=z.device)
    for _ in range(tries):
        idx = pending.nonzero().flatten()
        trial = project(z[idx] + t[idx, None] * direction[idx])
        f2, g2, e2 = evaluate(trial, rows[idx])
        ok = f2 <= f[idx] + c1 * t[idx] * gd[idx]
        took = idx[ok]
        z_new[took], fn[took], gn[took], en[took] = trial[ok], f2[ok], g2[ok], e2[ok]
        pending[took] = False
        t[idx[~ok]] *= 0.5
        if not pending.any():
            break
    return z_new, fn, gn, en, ~pending
