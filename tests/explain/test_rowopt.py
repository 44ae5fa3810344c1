"""Per-row optimisation against closed forms and torch.optim.Adam; the stopping rule row by row."""
import pytest
import torch

from hpcviz.explain.rowopt import RowOptConfig, minimise

F64 = {"dtype": torch.float64}  # the comparisons below are to ~1e-10


def quadratic(centres, curv):
    """Row i: f_i(x) = 0.5 * sum_j curv[i, j] (x_j - c_ij)^2, err_i = ||x_i - c_i||; the minimiser is c_i
    (on a box: c_i clamped to it, the curvature being diagonal). Counts the rows it is asked for."""
    calls = []

    def fun(x, rows):
        calls.append(rows.tolist())
        d = x.flatten(1) - centres[rows]
        return 0.5 * (curv[rows] * d * d).sum(1), d.norm(dim=1)
    return fun, calls


def problem(rows=4, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(rows, dim, generator=g, **F64)
    curv = torch.rand(rows, dim, generator=g, **F64) * torch.logspace(0, 2, rows, **F64)[:, None] + 0.1  # ill-conditioned
    return centres, curv


def test_lbfgs_reaches_the_closed_form_on_and_off_a_box():
    centres, curv = problem()
    fun, _ = quadratic(centres, curv)
    cfg = RowOptConfig(method="lbfgs", steps=200, target=1e-9, window=0, history=5)
    out = minimise(fun, torch.zeros_like(centres), cfg)
    torch.testing.assert_close(out.x, centres, atol=1e-8, rtol=0)
    assert out.stopped == ["target"] * 4 and (out.steps < 200).all()
    lo, hi = torch.full((1, 6), -0.5, **F64), torch.full((1, 6), 0.5, **F64)
    out = minimise(fun, torch.zeros_like(centres), RowOptConfig(method="lbfgs", steps=300, window=0), lo, hi)
    torch.testing.assert_close(out.x, centres.clamp(-0.5, 0.5), atol=1e-6, rtol=0)
    assert ((out.x >= -0.5) & (out.x <= 0.5)).all()


def test_adam_equals_torch_adam_with_the_same_step_decay():
    centres, curv = problem(rows=3)
    fun, _ = quadratic(centres, curv)
    cfg = RowOptConfig(method="adam", steps=40, window=0, lr=0.05, milestones=(0.5, 0.75), gamma=0.1)
    out = minimise(fun, torch.zeros_like(centres), cfg, scale=2.0)
    for i in range(3):  # the reference: torch's Adam on row i alone, lr 0.05 * 2, x0.1 at steps 20 and 30
        x = torch.zeros(1, 6, requires_grad=True, **F64)
        opt = torch.optim.Adam([x], lr=0.1)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [20, 30], 0.1)
        for _ in range(40):
            opt.zero_grad()
            fun(x, torch.tensor([i]))[0].sum().backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(out.x[i], x.detach()[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_each_row_stops_on_its_own_and_later_steps_skip_it(method):
    centres, curv = problem(rows=4)
    fun, calls = quadratic(centres, curv)
    cfg = RowOptConfig(method=method, steps=60, target=0.3, window=0, lr=0.05, check_every=5)
    x0 = centres.clone()
    x0[1:] += 2.0  # row 0 starts at its target: it leaves at the first check, after 5 steps
    out = minimise(fun, x0, cfg)
    assert out.steps[0] == 5 and out.stopped[0] == "target"
    assert all(0 not in c for c in calls[6:] if len(c) < 4)  # evaluated no more once it left
    assert sum(0 in c for c in calls) < sum(1 in c for c in calls)
    for i in range(4):  # curves are held at the row's last value once it stopped
        n = int(out.steps[i])
        assert torch.isfinite(out.curves[i]).all() and (out.curves[i, n:] == out.curves[i, n - 1]).all()
        assert (out.err[i] <= 0.3) == (out.stopped[i] == "target")
        assert out.stopped[i] in ("target", "steps")
    # a row's path does not depend on the others: row 2 alone takes the same steps to the same point
    alone = minimise(quadratic(centres[2:3], curv[2:3])[0], x0[2:3], cfg)
    assert alone.steps[0] == out.steps[2]
    torch.testing.assert_close(alone.x[0], out.x[2], atol=1e-10, rtol=0)


def test_plateau_and_step_cap():
    centres, curv = problem(rows=2)
    lo, hi = torch.full((1, 6), -10.0, **F64), torch.full((1, 6), 10.0, **F64)

    def fun(x, rows):  # row 0 cannot improve (a constant); row 1 is a quadratic
        d = x.flatten(1) - centres[rows]
        f = 0.5 * (curv[rows] * d * d).sum(1)
        f = torch.where(rows == 0, 0 * f + 3.0, f)
        return f, d.norm(dim=1)
    cfg = RowOptConfig(method="adam", steps=50, window=10, plateau=1e-5, target=0.0, lr=1e-4)
    out = minimise(fun, torch.zeros(2, 6, **F64), cfg, lo, hi)
    assert out.stopped[0] == "plateau" and out.steps[0] == 15  # the first check past a full window
    assert out.stopped[1] == "steps" and out.steps[1] == 50      # still improving, tiny steps: the cap
    with pytest.raises(ValueError, match="lbfgs, adam"):
        minimise(fun, torch.zeros(2, 6, **F64), RowOptConfig(method="sgd"))


def test_hold_and_a_changed_objective():
    """No row stops before `hold`; when on_check says the objective changed, lbfgs evaluates it again at the
    rows' points before its next step, so its line search compares values of the new function."""
    centres, curv = problem(rows=3)
    fun0, calls = quadratic(centres, curv)
    at_target = RowOptConfig(method="lbfgs", steps=60, target=1e-4, window=0)
    assert (minimise(fun0, centres.clone(), at_target).steps == 5).all()  # the first check
    held = minimise(fun0, centres.clone(), RowOptConfig(**{**at_target.__dict__, "hold": 20}))
    assert (held.steps == 20).all() and held.stopped == ["target"] * 3
    # per group: rows 0-1 (group 0) are not held, row 2 (group 1) is held to 20, the plateau rule after it too
    fun_g, _ = quadratic(centres, curv)
    per = minimise(lambda x, rows, sizes: fun_g(x, rows), centres.clone(),
                   RowOptConfig(**{**at_target.__dict__, "hold": (0, 20)}), groups=[0, 0, 1])
    assert per.steps.tolist() == [5, 5, 20] and per.stopped == ["target"] * 3
    flat = RowOptConfig(method="lbfgs", steps=60, target=0.0, plateau=0.5, window=5)  # stuck at once
    per = minimise(lambda x, rows, sizes: fun_g(x, rows), centres.clone(), RowOptConfig(**{**flat.__dict__,
                   "hold": (0, 20)}), groups=[0, 0, 1])
    assert per.steps.tolist() == [10, 10, 30] and per.stopped == ["plateau"] * 3
    with pytest.raises(ValueError, match="hold: need one number per group"):
        minimise(lambda x, rows, sizes: fun_g(x, rows), centres.clone(), RowOptConfig(hold=(0,)), groups=[0, 1, 2])
    shift, changes = {"c": 0.0}, []

    def fun(x, rows):
        f, e = fun0(x, rows)
        return f + shift["c"], e

    def on_check(step, rows, f):
        if step + 1 == 20:  # a homotopy's next stage: the objective moves up by a constant
            shift["c"] = 100.0
            changes.append(len(calls))
            return True
        return False
    calls.clear()
    out = minimise(fun, torch.zeros_like(centres), RowOptConfig(method="lbfgs", steps=40, window=0),
                   on_check=on_check)
    assert len(calls[changes[0]]) == 3 and len(calls) == 1 + 40 + 1  # start, 40 steps, the re-evaluation
    assert (out.value > 99).all() and (out.curves[:, -1] > 99).all()
