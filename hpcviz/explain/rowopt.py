"""Many independent small optimisation problems at once: one row of a batch each, each stopping on its own.

`minimise(fun, x0, cfg)` minimises, for every row i of x0 (R, ...), its own objective f_i(x_i), where
`fun(x, rows) -> (f, err)` evaluates the rows `rows` (a non-decreasing index tensor on x's device) in one
batched pass: f (r,) to minimise, err (r,) the quality measure the stopping rule watches. The rows never
interact, so a row that has converged leaves the batch: later steps cost only what is still running.

No host sync between checks. The loop talks to the host only at a check (every `check_every` steps): one
device->host copy of each running row's verdict and objective. Between two checks the batch has a fixed
shape (its *layout*): no row leaves, the line search has a fixed cost (one trial per step, below), and
nothing the host has to wait for (`.item()`, `nonzero`, boolean-mask indexing, `.tolist()`) is done, so a
GPU runs ahead of the host and a step can be a replayed CUDA graph. At a check the rows that stopped leave
and the running rows are laid out anew: grouped by `groups` (e.g. the inverted block of each row; a
grouped `fun` is called as `fun(x, rows, sizes)` with `sizes` the rows of each group, in group order),
each group padded to the size `bucket(counts)` gives (`exact`: none; `shared_pow2`: every group to one power
of two, so the shapes a run visits are few and recur). Padding slots repeat their group's last row and
are frozen: they are computed with the rest but never move and never count.

A row stops at the first check (every `check_every` steps) where
  - err <= target (done), or
  - it will not get there (plateau): at the rate its err fell over the last `window` steps (log-linear,
    which overestimates later progress: convergence slows), the target is out of reach within `steps`; or
    its objective improved by less than `plateau` (relative) over those steps (the rule without a target),
  - or it has taken `steps` steps.

Methods:
  - "lbfgs": limited-memory BFGS per row (its own history of `history` pairs, two-loop recursion batched
    over the rows), with an Armijo line search of one trial per step: a row whose trial point fails the
    sufficient-decrease test stays where it is and tries half the step length at its next step (a step
    is one evaluation, whatever happens). The unit step is nearly always accepted after the first few
    steps. On a box (lo, hi) the step moves only the free coordinates (those not held on a bound by their
    gradient: Bertsekas' two-metric projection) and each trial point is projected onto the box (cheaper
    than a sigmoid change of variables, measured).
  - "adam": Adam per row (the same update as torch's), learning rate lr * scale with step decay at
    `milestones`, x projected onto the box after each step.

Deterministic: no randomness; a row's path does not depend on the other rows (up to the floating-point
order of batched kernels).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Fun = Callable[..., tuple[torch.Tensor, torch.Tensor]]                    # (x, rows[, sizes]) -> (f, err)
ValueGrad = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (x, rows[, sizes]) -> (f, df/dx, err)
Bucket = Callable[[tuple[int, ...]], tuple[int, ...]]
OnCheck = Callable[[int, torch.Tensor, torch.Tensor], bool | None]
Operator = Callable[[torch.Tensor], torch.Tensor]
_VERDICTS = ("", "target", "plateau")


def with_grad(fun: Fun) -> ValueGrad:
    """(f, df/dx, err) of `fun` at x for `rows` (and `sizes`), the gradient by autograd, all detached."""
    def value_grad(x: torch.Tensor, rows: torch.Tensor, *sizes: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        f, e = fun(x, rows, *sizes)
        g, = torch.autograd.grad(f.sum(), x)
        return f.detach(), g, e.detach()
    return value_grad


def exact(counts: tuple[int, ...]) -> tuple[int, ...]:
    """No padding: each group as many slots as it has running rows (CPUs: padding only costs there)."""
    return counts


def pow2(n: int) -> int:
    """The next power of two >= n (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def shared_pow2(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Every group that has rows padded to one power of two, the largest group's: the shape is fixed by the
    set of groups and that one number, so a run with r rows per group visits at most ceil(log2 r) + 1 shapes
    per set of groups, and later batches revisit them (CUDA graphs: each captured once)."""
    s = pow2(max(counts, default=0))
    return tuple(s if k else 0 for k in counts)


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
    hold: int | tuple[int, ...] = 0   # no row stops before this many steps (a homotopy's soft phase), and the
    #                                   plateau rule looks only at steps after it; a tuple: per group of rows


@dataclass
class RowOptResult:
    x: torch.Tensor                   # (R, ...) the final point of every row
    value: torch.Tensor               # (R,) its objective
    err: torch.Tensor                 # (R,) its err
    steps: torch.Tensor               # (R,) int64, steps taken
    curves: torch.Tensor              # (R, steps) objective per step, held at the last value once a row stopped
    stopped: list[str] = field(default_factory=list)  # per row: target | plateau | steps
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # the layouts' sizes, in the order visited
    errs: torch.Tensor | None = None  # (R, steps) err at each check (NaN between checks and after a row stopped)


def _to(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A host list on the device without a sync: on CUDA through pinned memory, asynchronously (a plain
    copy from pageable memory waits for the device's queue)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


class _Rows:
    """The host's view of the batch: which rows run, their layout (slots) until the next check, the stopping
    rule, and the per-row record (objective per step, err per check). Only `check` talks to the device."""

    def __init__(self, x0: torch.Tensor, cfg: RowOptConfig, groups: Sequence[int] | None, bucket: Bucket,
                 on_check: OnCheck | None) -> None:
        n, dev = len(x0), x0.device
        self.cfg, self.bucket, self.on_check, self.dev = cfg, bucket, on_check, dev
        self.groups = [0] * n if groups is None else [int(k) for k in groups]
        if len(self.groups) != n or any(b < a for a, b in zip(self.groups, self.groups[1:])):
            raise ValueError(f"groups: need one non-decreasing group number per row ({n} rows)")
        self.grouped = groups is not None
        self.n_groups = max(self.groups, default=0) + 1
        holds = cfg.hold if isinstance(cfg.hold, (tuple, list)) else (cfg.hold,) * self.n_groups
        if len(holds) < self.n_groups:
            raise ValueError(f"hold: need one number per group ({self.n_groups} groups), got {len(holds)}")
        self.row_hold = [int(holds[g]) for g in self.groups]
        self.hold = min(self.row_hold, default=0)  # rows held longer are masked per row (hold_t)
        self.uneven = any(h != self.hold for h in self.row_hold)
        self.curves = x0.new_full((n, cfg.steps), float("nan"))
        self.errs = x0.new_full((n, cfg.steps), float("nan"))
        self.chunk = x0.new_zeros(0, cfg.check_every)
        self.taken, self.why = [cfg.steps] * n, ["steps"] * n
        self.running: list[int] = list(range(n))
        self.since = 0  # the first step not yet in `curves`
        self.changed = False  # on_check said the objective changed
        self.shapes: list[tuple[int, ...]] = []
        self.lay_out(None)

    def lay_out(self, old: dict[int, int] | None) -> torch.Tensor | None:
        """Slots for the running rows; returns, per new slot, the old slot to take its state from."""
        counts = [0] * self.n_groups
        for r in self.running:
            counts[self.groups[r]] += 1
        sizes = tuple(self.bucket(tuple(counts)))
        assert all(p >= k and (p > 0) == (k > 0) for k, p in zip(counts, sizes)), (counts, sizes)
        pos, real, at = [], [], 0
        for k, p in zip(counts, sizes):
            pos += list(range(at, at + k)) + [at + k - 1] * (p - k)  # padding: the group's last row, frozen
            real += [True] * k + [False] * (p - k)
            at += k
        self.sizes, self.slot_rows = sizes, [self.running[i] for i in pos]
        self.real = [i for i, ok in enumerate(real) if ok]  # the slot of each running row, in order
        self.shapes.append(sizes)
        dev = self.dev
        self.rows = _to(self.slot_rows, dev)                     # (P,) the row of each slot
        self.live = _to(real, dev, torch.bool)                   # (P,) False: padding
        self.real_t, self.running_t = _to(self.real, dev), _to(self.running, dev)
        self.hold_t = _to([self.row_hold[r] for r in self.running], dev) if self.uneven else None
        self.chunk = self.chunk.new_zeros(len(pos), self.cfg.check_every)
        if old is None:
            return None
        return _to([old[r] for r in self.slot_rows], dev)

    def args(self) -> tuple:
        """The layout's arguments of `fun` after x: (rows,) or (rows, sizes)."""
        return (self.rows, self.sizes) if self.grouped else (self.rows,)

    def note(self, step: int, f: torch.Tensor) -> None:
        self.chunk[:, step - self.since] = f.detach().to(self.chunk.dtype)

    def verdicts(self, step: int, f: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """(r,) int: 0 go on, 1 target, 2 plateau, for the running rows (on the device, no sync)."""
        cfg, rows = self.cfg, self.running_t
        f, err = f[self.real_t], err[self.real_t].to(self.errs.dtype)
        self.curves[rows, self.since:step + 1] = self.chunk[self.real_t, :step + 1 - self.since]
        self.errs[rows, step] = err
        reached = cfg.target > 0 and step + 1 >= self.hold
        done = err <= cfg.target if reached else torch.zeros_like(err, dtype=torch.bool)
        stuck = torch.zeros_like(done)
        if cfg.window and step + 1 > cfg.window + self.hold:
            now, then = self.curves[rows, step], self.curves[rows, step - cfg.window]
            stuck = (then - now) <= cfg.plateau * then.abs().clamp_min(1e-30)
            if cfg.target > 0:  # steps still needed at the recent rate of log(err); a rate <= 0: never
                e_now, e_then = err.clamp_min(1e-30), self.errs[rows, step - cfg.window]
                rate = torch.log(e_then / e_now) / cfg.window
                need = torch.where(rate > 0, torch.log(e_now / cfg.target) / rate.clamp_min(1e-30),
                                   torch.full_like(rate, float("inf")))
                stuck |= ~done & (step + 1 + need > cfg.steps)
        if self.hold_t is not None:  # rows of groups held longer: no verdict yet, no plateau before the window
            done = done & (step + 1 >= self.hold_t)
            stuck = stuck & (step + 1 > cfg.window + self.hold_t)
        return torch.where(done, 1, torch.where(stuck, 2, 0))

    def check(self, step: int, f: torch.Tensor, err: torch.Tensor) -> list[int]:
        """The check after `step`: the one device->host copy (verdicts and objectives of the running rows),
        on_check, the stopped rows' record. Returns the positions (in `running`) of the rows that stop."""
        codes = self.verdicts(step, f, err)
        last = step + 1 >= self.cfg.steps
        self.since, self.changed = step + 1, False
        if self.on_check is None and not (self.cfg.target > 0 or self.cfg.window) and not last:
            return []  # nothing to decide: no sync
        k = len(codes)
        host = torch.cat([codes.to(f.dtype), f[self.real_t].detach()]).tolist()  # the check's sync
        if self.on_check is not None:
            running, values = torch.tensor(self.running), torch.tensor(host[k:], dtype=f.dtype)
            self.changed = bool(self.on_check(step, running, values))
        stop = [i for i, c in enumerate(host[:k]) if c or last]
        for i in stop:
            r = self.running[i]
            self.taken[r], self.why[r] = step + 1, _VERDICTS[int(host[i])] or "steps"
        return stop

    def leave(self, stop: list[int], state: list[torch.Tensor], out: list[torch.Tensor]) -> torch.Tensor | None:
        """The stopped rows' final state (slot-major tensors in `state`) into `out` (row-major); the rest laid
        out anew. Returns the new slots' old slots (None: nobody left), or an empty tensor (everyone left)."""
        if not stop:
            return None
        gone = set(stop)
        idx, rows = _to([self.real[i] for i in stop], self.dev), _to([self.running[i] for i in stop], self.dev)
        for s, o in zip(state, out):
            o[rows] = s[idx].to(o.dtype)
        old = {r: self.real[i] for i, r in enumerate(self.running)}
        self.running = [r for i, r in enumerate(self.running) if i not in gone]
        if not self.running:
            return torch.zeros(0, dtype=torch.int64)
        return self.lay_out(old)

    def result(self, x: torch.Tensor, value: torch.Tensor, err: torch.Tensor) -> RowOptResult:
        steps = torch.tensor(self.taken, dtype=torch.int64, device=self.dev)
        held = torch.arange(self.cfg.steps, device=self.dev)[None, :] >= steps[:, None]
        last = self.curves.gather(1, (steps - 1).clamp_min(0)[:, None])
        curves = torch.where(held, last, self.curves)
        return RowOptResult(x, value, err, steps, curves, self.why, self.shapes, self.errs)


def minimise(fun: Fun, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None = None,
             hi: torch.Tensor | None = None, scale: float = 1.0, on_check: OnCheck | None = None,
             value_grad: ValueGrad | None = None, groups: Sequence[int] | None = None,
             bucket: Bucket = exact, precondition: Operator | None = None) -> RowOptResult:
    """Minimise every row of x0 on its own (see the module docstring). lo/hi: the box (broadcastable to one
    row), scale: the problem's natural step (adam's lr is relative to it). on_check(step, rows, f) runs at
    every check with the running rows and their objectives, as host tensors (for divergence checks and
    progress); it returns True when the objective has changed (a homotopy's next stage): lbfgs then
    evaluates every running row again at its point (its line search compares values of one function).
    value_grad: (f, gradient, err) in one call where the caller has a faster way than autograd on `fun` (a
    CUDA graph). groups/bucket: the layout between checks (module docstring; groups given: `fun`
    and `value_grad` take (x, rows, sizes)). precondition: lbfgs's initial inverse Hessian is gamma K, K this
    symmetric positive definite operator on flat rows (P, D) -> (P, D) (default: the identity)."""
    if cfg.method not in ("lbfgs", "adam"):
        raise ValueError(f"method {cfg.method!r}: not one of lbfgs, adam")
    if cfg.check_every < 1 or (cfg.window and cfg.window % cfg.check_every):
        raise ValueError(f"window {cfg.window}: need a multiple of check_every {cfg.check_every}")
    run = _lbfgs if cfg.method == "lbfgs" else _adam
    rows = _Rows(x0, cfg, groups, bucket, on_check)
    return run(fun, value_grad or with_grad(fun), x0, cfg, lo, hi, scale, rows, precondition)


def _checks(step: int, cfg: RowOptConfig) -> bool:
    return (step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps


def _adam(fun: Fun, value_grad: ValueGrad, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None,
          hi: torch.Tensor | None, scale: float, book: _Rows, precondition: Operator | None = None) -> RowOptResult:
    out = x0.detach().clone()
    x = out[book.rows].clone()  # (P, ...) the slots
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    cuts = sorted({max(1, min(cfg.steps, round(f * cfg.steps))) for f in cfg.milestones})
    live = book.live.view(-1, *[1] * (x.dim() - 1))
    for step in range(cfg.steps):
        f, g, e = value_grad(x, *book.args())
        book.note(step, f)
        lr = cfg.lr * scale * cfg.gamma ** sum(step >= c for c in cuts)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        upd = (m / (1 - b1 ** (step + 1))) / ((v / (1 - b2 ** (step + 1))).sqrt() + eps)
        xn = x - lr * upd
        if lo is not None and hi is not None:
            xn = torch.maximum(torch.minimum(xn, hi), lo)
        x = torch.where(live, xn, x)
        if _checks(step, cfg):
            take = book.leave(book.check(step, f, e), [x], [out])
            if take is not None:
                if not len(take):
                    break
                x, m, v = x[take], m[take], v[take]
                live = book.live.view(-1, *[1] * (x.dim() - 1))
    with torch.no_grad():  # the objective at the final points (Adam's last evaluation preceded its last update)
        everything = torch.arange(len(out), device=out.device)
        sizes = [0] * book.n_groups
        for k in book.groups:
            sizes[k] += 1
        value, err = fun(out, everything, tuple(sizes)) if book.grouped else fun(out, everything)
    return book.result(out, value.detach(), err.detach())


class _History:
    """The L-BFGS curvature pairs of the slots, in one ring shared by all of them: every step each slot writes
    its pair at the same position (a slot whose step failed, or whose pair is not positive, keeps the pair it
    had there), so the two-loop recursion reads plain slices, never a gather."""

    def __init__(self, rows: int, d: int, mem: int, like: torch.Tensor, precondition: Operator | None) -> None:
        self.k = precondition or (lambda v: v)  # H0 = gamma K: K symmetric positive definite (default: I)
        self.s = like.new_zeros(mem, rows, d)
        self.y = like.new_zeros(mem, rows, d)
        self.rho = like.new_zeros(mem, rows)
        self.gamma = like.new_zeros(rows)  # s.y / y.K.y of each slot's newest valid pair (0: none yet)
        self.mem, self.pushed = mem, 0

    def push(self, s: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> None:
        k = self.pushed % self.mem
        sy = torch.linalg.vecdot(s, y)
        good = ok & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
        self.s[k] = torch.where(good[:, None], s, self.s[k])
        self.y[k] = torch.where(good[:, None], y, self.y[k])
        self.rho[k] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), self.rho[k])
        yy = torch.linalg.vecdot(y, self.k(y)).clamp_min(1e-30)
        self.gamma = torch.where(good, sy / yy, self.gamma)
        self.pushed += 1

    def take(self, idx: torch.Tensor) -> None:
        """Keep the slots `idx` (in that order), in place where the slots do not grow: no second copy of the
        history, the largest buffer of all."""
        p = len(idx)
        if p > self.s.shape[1]:
            self.s, self.y = self.s[:, idx], self.y[:, idx]
        else:
            for k in range(self.mem):
                self.s[k, :p] = self.s[k, idx]
                self.y[k, :p] = self.y[k, idx]
            self.s, self.y = self.s[:, :p], self.y[:, :p]
        self.rho, self.gamma = self.rho[:, idx], self.gamma[idx]

    def direction(self, g: torch.Tensor, step0: float) -> torch.Tensor:
        """-H g per slot (two-loop recursion); slots without a pair yet: steepest descent of length
        step0*sqrt(D)."""
        n = min(self.pushed, self.mem)
        order = [(self.pushed - 1 - j) % self.mem for j in range(n)]  # newest first
        q, alphas = g.clone(), []
        for k in order:  # a pair never written is all zero with rho 0: it changes nothing
            a = self.rho[k] * torch.linalg.vecdot(self.s[k], q)
            q.addcmul_(a[:, None], self.y[k], value=-1)
            alphas.append(a)
        kq = self.k(q)
        first = step0 * math.sqrt(g.shape[1]) / kq.norm(dim=1).clamp_min(1e-30)
        q = kq * torch.where(self.gamma > 0, self.gamma, first)[:, None]
        for k, a in zip(reversed(order), reversed(alphas)):
            b = self.rho[k] * torch.linalg.vecdot(self.y[k], q)
            q.addcmul_(self.s[k], (a - b)[:, None])
        return -q


def _lbfgs(fun: Fun, value_grad: ValueGrad, x0: torch.Tensor, cfg: RowOptConfig, lo: torch.Tensor | None,
           hi: torch.Tensor | None, scale: float, book: _Rows, precondition: Operator | None) -> RowOptResult:
    shape = x0.shape[1:]
    lo_f = lo.expand(1, *shape).flatten(1) if lo is not None else None
    hi_f = hi.expand(1, *shape).flatten(1) if hi is not None else None

    def project(zz: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(zz, hi_f), lo_f) if lo_f is not None and hi_f is not None else zz

    def evaluate(zz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f, g, e = value_grad(zz.view(-1, *shape), *book.args())
        return f, g.flatten(1), e

    out = project(x0.detach().flatten(1).clone())  # (R, D) each row's final point, as rows stop
    z = out[book.rows]                               # (P, D) the slots
    f, g, err = evaluate(z)
    value, errs = f.new_zeros(len(out)), err.new_zeros(len(out))
    hist = _History(len(z), z.shape[1], cfg.history, z, precondition)
    t = torch.ones_like(f)  # each slot's step length along its direction
    step0 = 0.1 * scale  # the first step's length per coordinate, in units of the problem's scale
    for step in range(cfg.steps):
        free = free_variables(z, g, lo_f, hi_f)
        gf = g * free
        direction = hist.direction(gf, step0) * free
        gd = torch.linalg.vecdot(gf, direction)
        bad = gd >= 0  # not a descent direction (a poor history): steepest descent this once
        direction = torch.where(bad[:, None], -gf, direction)
        gd = torch.where(bad, -torch.linalg.vecdot(gf, gf), gd)
        trial = project(z + t[:, None] * direction)
        f2, g2, e2 = evaluate(trial)
        ok = book.live & (f2 <= f + 1e-4 * t * gd)  # Armijo; NaN fails
        hist.push(trial - z, g2 - g, ok)
        z, g = torch.where(ok[:, None], trial, z), torch.where(ok[:, None], g2, g)
        f, err = torch.where(ok, f2, f), torch.where(ok, e2, err)
        t = torch.where(ok, torch.ones_like(t), (0.5 * t).clamp_min(2.0 ** -30))
        book.note(step, f)
        if _checks(step, cfg):
            take = book.leave(book.check(step, f, err), [z, f, err], [out, value, errs])
            if take is not None:
                if not len(take):
                    break
                z, g, f, err, t = z[take], g[take], f[take], err[take], t[take]
                hist.take(take)
            if book.changed:  # a new objective: its values and gradients at the points, a fresh step length
                f, g, err = evaluate(z)
                t = torch.ones_like(t)
    return book.result(out.view(-1, *shape), value, errs)


def free_variables(z: torch.Tensor, g: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """1 where a coordinate may move, 0 where it sits on a bound that its gradient pushes against (the
    active set of the two-metric projection: quasi-Newton steps over the free coordinates only, or the
    projection of a step mixing both does not descend and stalls short of the box's minimum; tested)."""
    if lo is None or hi is None:
        return torch.ones_like(z)
    return (~(((z <= lo) & (g > 0)) | ((z >= hi) & (g < 0)))).to(z.dtype)
