"""The functional forward plan against the modules themselves (forward hooks, an independent reference)."""
import pytest
import torch
from torch import nn

from hpcviz.explain.activations import dump_activations
from hpcviz.explain.deconv import max_pool
from hpcviz.explain.forward import ForwardPlan, PlanError
from hpcviz.models import build_model


def randomised(arch, stem=""):
    """A model in eval mode whose batch norms are not the identity (random statistics and affine terms)."""
    torch.manual_seed(0)
    model = build_model(arch, 10, stem).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model


def pool(h, p):
    return max_pool(h, p, True)


@pytest.mark.parametrize("arch,stem,size", [("resnet20", "", 16), ("resnet18", "imagenet", 32),
                                            ("resnet50", "cifar", 8)])
def test_run_folded_and_stacked_equal_the_modules(arch, stem, size):
    model = randomised(arch, stem)
    x = torch.randn(3, 3, size, size)
    _, ref = dump_activations(model, x)  # {block: (3, C, h, w)} by forward hooks on the modules
    plan = ForwardPlan(model)
    last = plan.blocks[-1]
    acts = plan.run(x, last, pool)
    for b in plan.blocks:
        torch.testing.assert_close(acts[b], ref[b], atol=1e-5, rtol=1e-4)
    for folded in (plan.folded(), plan.folded(channels_last=True)):
        # the stacked forward: block k's rows are the k-th slice and leave at its output
        wanted = [plan.blocks[0], plan.blocks[2], last]
        sizes = [1, 2, 3]
        xs = torch.cat([x[:1], x[1:], x])
        outs = folded.stacked(xs, wanted, sizes, pool)
        assert [o.shape[0] for o in outs] == sizes
        torch.testing.assert_close(outs[0], ref[wanted[0]][:1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outs[1], ref[wanted[1]][1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outs[2], ref[last], atol=1e-4, rtol=1e-4)


def test_folding_changes_nothing_in_the_model_and_halves_the_ops():
    model = randomised("resnet20")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ForwardPlan(model)
    folded = plan.folded()
    assert [op.kind for op in folded.stem] == ["conv", "relu"]
    assert [op.kind for op in plan.stem] == ["conv", "bn", "relu"]
    assert all(op.kind != "bn" for blk in folded.plan for op in (*blk.residual, *blk.shortcut))
    assert any(op.kind == "bn" for blk in plan.plan for op in blk.residual)  # the original plan is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_torchvisions_own_resnet_plans_alike():
    """torchvision's blocks, which hpcviz.models mirrors without importing them, are read by name."""
    import torchvision
    ours = build_model("resnet18", 10).eval()
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a, b = ForwardPlan(ours).run(x, "layer4.1", pool), ForwardPlan(theirs).run(x, "layer4.1", pool)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_not_a_project_resnet_is_one_line():
    with pytest.raises(PlanError, match="maxpool") as e:
        model = build_model("resnet18", 10)
        model.maxpool = nn.AvgPool2d(2)
        ForwardPlan(model)
    assert "\n" not in str(e.value) and "hint" in str(e.value)
    with pytest.raises(PlanError, match="valid: conv1, layer1.0"):
        ForwardPlan(build_model("resnet20", 10)).index("layer9.9")
    assert issubclass(PlanError, ValueError)
