import pytest
import torch

from hpcviz.explain.activations import UnknownBlockError, block_modules, dump_activations, resolve_blocks
from hpcviz.models import block_names, build_model


def manual_forward(model, x):
    """The blocks' outputs computed by calling the modules by hand: an independent reference."""
    out = {}
    h = model.relu(model.bn1(model.conv1(x)))
    out["conv1"] = h.clone()
    h = model.maxpool(h)
    for name in block_names(model)[1:]:
        stage, idx = name.split(".")
        h = getattr(model, stage)[int(idx)](h)
        out[name] = h.clone()
    return out


@pytest.mark.parametrize("arch,stem", [("resnet20", "cifar"), ("resnet18", "imagenet"), ("resnet50", "cifar")])
def test_activations_match_a_manual_forward(arch, stem):
    torch.manual_seed(0)
    model = build_model(arch, 5, stem).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, acts = dump_activations(model, x)
    ref = manual_forward(model, x)
    assert list(acts) == block_names(model)
    for name in acts:
        torch.testing.assert_close(acts[name], ref[name])
    torch.testing.assert_close(logits, model(x))
    assert acts["conv1"].min() >= 0  # after the stem's ReLU
    if stem == "imagenet":
        assert acts["conv1"].shape[-1] == 16  # before the max-pool


def test_selected_blocks_and_errors():
    model = build_model("resnet20", 10).eval()
    assert resolve_blocks(model, ["layer3.2", "conv1"]) == ["conv1", "layer3.2"]
    _, acts = dump_activations(model, torch.randn(1, 3, 8, 8), ["layer2.0"])
    assert list(acts) == ["layer2.0"] and acts["layer2.0"].shape == (1, 32, 4, 4)
    with pytest.raises(UnknownBlockError, match="layer4.0.*valid: conv1, layer1.0"):
        resolve_blocks(model, ["layer4.0"])


def test_hooks_are_removed_even_on_error():
    model = build_model("resnet20", 10).eval()
    with pytest.raises(RuntimeError):
        dump_activations(model, torch.randn(1, 4, 8, 8))  # 4 channels: conv1 fails
    assert all(not m._forward_hooks for m in model.modules())
    dump_activations(model, torch.randn(1, 3, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())
    assert set(block_modules(model)) == set(block_names(model))
