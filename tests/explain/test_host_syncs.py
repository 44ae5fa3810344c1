"""No host sync between checks (DESIGN.md, "On GPUs"), counted on the CPU: every op that would make the host
wait for a GPU (tests/sync_count.py) in the row optimiser and in a whole `invert` call, by phase."""
import pytest
import torch
from sync_count import counting

from hpcviz.explain import inversion, rowopt
from hpcviz.explain.cuda_graphs import StepCache
from hpcviz.explain.inversion import InversionConfig, invert
from hpcviz.explain.rowopt import RowOptConfig, minimise
from hpcviz.models import build_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def phases(monkeypatch):
    """A SyncCounter whose phase is "check" inside rowopt's checks and "loop" anywhere else in minimise."""
    with counting() as counter:
        counter.calls = {}

        def inside(fn, phase, after):
            def wrapped(*a, **k):
                counter.calls[fn.__name__] = counter.calls.get(fn.__name__, 0) + 1
                counter.phase = phase
                try:
                    return fn(*a, **k)
                finally:
                    counter.phase = after
            return wrapped
        monkeypatch.setattr(rowopt._Rows, "check", inside(rowopt._Rows.check, "check", "loop"))
        monkeypatch.setattr(rowopt._Rows, "leave", inside(rowopt._Rows.leave, "check", "loop"))
        monkeypatch.setattr(inversion, "minimise", inside(inversion.minimise, "loop", "end"))
        yield counter


def checks(counter) -> int:
    return counter.calls.get("check", 0)


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_minimise_syncs_only_at_checks(phases, method):
    g = torch.Generator().manual_seed(0)
    centres, curv = torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g) + 0.1
    seen = []

    def fun(x, rows):
        d = x.flatten(1) - centres[rows]
        return 0.5 * (curv[rows] * d * d).sum(1), d.norm(dim=1)
    cfg = RowOptConfig(method=method, steps=60, target=0.05, window=20, check_every=5, lr=0.1)
    phases.phase = "loop"
    out = minimise(fun, torch.zeros(6, 5), cfg, -torch.ones(1, 5), torch.ones(1, 5),
                   on_check=lambda step, rows, f: seen.append(len(rows)))
    phases.phase = "end"
    assert phases.by_op("loop") == {}, phases.by_op("loop")
    assert checks(phases) == len(seen) and phases.total("check") == len(seen)  # one copy per check
    assert (out.err <= 0.05).any() and seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("pad", ["exact", "pow2"])  # pow2: the GPU's padded layout, run on the CPU
def test_invert_syncs_only_at_checks(phases, pad):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x = (torch.rand(5, 3, 8, 8) - 0.5) / 0.25
    cfg = InversionConfig(steps=40, target=0.05, window=10)
    out = invert(model, images=x, blocks=["conv1", "layer1.2", "layer2.2", "layer3.2"], cfg=cfg, mean=MEAN,
                 std=STD, cache=StepCache(pad=pad))
    total, ops = phases.total(), phases.by_op()
    steps = max(int(o["steps"].max()) for o in out.values())
    n_checks = checks(phases)
    assert n_checks == -(-steps // 5)
    assert phases.by_op("loop") == {}, phases.by_op("loop")      # nothing between two checks
    assert phases.total("check") <= 3 * n_checks                   # the copy and the host-side divergence check
    assert total <= steps, ops                                     # <= 1 per step over the whole call
    # the old code made 495 in 20 steps of 32 images at 32 px (25 per step: 204 boolean-mask indexings,
    # 159 .item(), 22 bincount, 21 nonzero, ...)
