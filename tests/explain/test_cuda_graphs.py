"""Padded static-shape steps: equal to the unpadded step (CPU); captured CUDA graphs equal eager (GPU)."""
import pytest
import torch

from hpcviz.explain.cuda_graphs import PaddedSteps, bucket
from hpcviz.explain.forward import ForwardPlan
from hpcviz.explain.inversion import InversionConfig, Objective, invert, make_targets
from hpcviz.explain.rowopt import with_grad
from hpcviz.models import build_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_bucket():
    assert [bucket(n) for n in (0, 1, 7, 8, 9, 16, 17, 100, 1024, 1025)] == [0, 1, 7, 8, 16, 16, 32, 128, 1024, 2048]


def objective(device="cpu", n=5):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval().to(device)
    plan = ForwardPlan(model).folded()
    x = ((torch.rand(n, 3, 8, 8) - 0.5) / 0.25).to(device)
    names, phi0, hw = make_targets(plan, ["conv1", "layer2.0", "layer3.2"], images=x)
    return Objective(plan, names, phi0, hw, InversionConfig(), MEAN, STD)


def test_padded_step_equals_the_plain_step():
    obj = objective()
    padded, plain = PaddedSteps(obj, torch.device("cpu"), graphs=True), with_grad(obj)  # graphs: CUDA only
    assert not padded.graphs
    g = torch.Generator().manual_seed(2)
    for rows in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 6, 7, 8, 9, 14], [3], [10, 12]):
        r = torch.tensor(rows)
        x = torch.randn(len(rows), 3, 8, 8, generator=g)
        for a, b in zip(padded(x, r), plain(x, r)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert set(padded.steps) == {(5, 5, 5), (1, 4, 1), (1, 0, 0), (0, 0, 2)} and padded.captured == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (the GPU check)")
def test_cuda_graphs_equal_eager_steps():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "cifar").eval().cuda()
    x = ((torch.rand(20, 3, 32, 32) - 0.5) / 0.25).cuda()
    blocks = ["conv1", "layer2.1", "layer4.1"]
    cfg = InversionConfig(steps=40)
    graphed = invert(model, images=x, blocks=blocks, cfg=cfg, mean=MEAN, std=STD)
    eager = invert(model, images=x, blocks=blocks, cfg=InversionConfig(steps=40, graphs=False), mean=MEAN, std=STD)
    for b in blocks:
        torch.testing.assert_close(graphed[b]["error"], eager[b]["error"], atol=2e-3, rtol=0.05)
        assert torch.equal(graphed[b]["steps"], eager[b]["steps"]) or (graphed[b]["steps"] - eager[b]["steps"]).abs().max() <= 5
    obj = objective("cuda", n=9)
    steps = PaddedSteps(obj, torch.device("cuda"))
    rows = torch.arange(27, device="cuda")
    xs = torch.randn(27, 3, 8, 8, device="cuda")
    for _ in range(3):  # replays: the same as the eager step each time
        for a, b in zip(steps(xs, rows), with_grad(obj)(xs, rows)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert steps.captured == 1 and steps.graphs
