import subprocess
import sys

import pytest
import torch
import torchvision

from hpcviz.config import ARCHS
from hpcviz.models import UnknownArchError, block_names, build_model, load_init


@pytest.mark.parametrize("arch,stem,size,names", [
    ("resnet20", "cifar", 32, ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]),
    ("resnet18", "imagenet", 64, ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in range(2)]),
    ("resnet18", "cifar", 32, ["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in range(2)]),
])
def test_block_names_and_output_shape(arch, stem, size, names):
    model = build_model(arch, 7, stem).eval()
    assert block_names(model) == names
    modules = dict(model.named_modules())
    assert all(n in modules for n in names)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("arch,blocks", [("resnet32", 15), ("resnet56", 27), ("resnet34", 16), ("resnet50", 16)])
def test_depths(arch, blocks):
    assert len(block_names(build_model(arch, 10))) == 1 + blocks


def test_cifar_resnet20_matches_paper():
    model = build_model("resnet20", 10)
    # He et al. 2016: ResNet-20 has 0.27M parameters (ours uses 1x1 projections: a few thousand more)
    n = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n < 0.29e6
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]


def test_stems():
    imagenet = build_model("resnet18", 10, "imagenet")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    cifar = build_model("resnet18", 10, "cifar")
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, torch.nn.Identity)
    # spatial size after the stem: /4 for imagenet, /1 for cifar
    x = torch.randn(1, 3, 32, 32)
    f = lambda m: m.maxpool(m.relu(m.bn1(m.conv1(x))))  # noqa: E731
    assert f(imagenet.eval()).shape[-1] == 8 and f(cifar.eval()).shape[-1] == 32


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_checkpoint_loads_into_torchvision(arch):
    ours = build_model(arch, 10, "imagenet").eval()
    theirs = getattr(torchvision.models, arch)(num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(theirs(x), ours(x))


def test_init_from_torchvision_weights_skips_mismatched():
    tv = torchvision.models.resnet18(num_classes=1000)
    model = build_model("resnet18", 10, "cifar")
    skipped = load_init(model, tv.state_dict())
    assert set(skipped) == {"conv1.weight", "fc.weight", "fc.bias"}
    torch.testing.assert_close(model.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)


def test_init_from_wrong_arch_is_refused():
    with pytest.raises(UnknownArchError, match="same --arch"):
        load_init(build_model("resnet18", 10), build_model("resnet20", 10).state_dict())


def test_unknown_arch_lists_choices():
    with pytest.raises(UnknownArchError) as e:
        build_model("resnet19", 10)
    assert all(a in str(e.value) for a in ARCHS)
    with pytest.raises(UnknownArchError, match="--stem"):
        build_model("resnet18", 10, "tiny")


def test_the_shape_model_is_built_once_uninitialised():
    from hpcviz.models import shape_model
    m = shape_model("resnet20", 10, "")
    assert m is shape_model("resnet20", 10, "") and not m.training
    assert all(t.device.type == "cpu" for t in (*m.parameters(), *m.buffers()))
    assert shape_model("resnet20", 10, "imagenet") is not m
    assert m(torch.empty(0, 3, 32, 32)).shape == (0, 10)


def test_a_checkpoints_model_has_its_weights_in_the_default_layout():
    """Training saves channels-last weights; the model given them (not copied into fresh ones) is NCHW, as a
    model loaded by load_state_dict was, and computes what the trained one does."""
    from hpcviz.models import from_checkpoint
    trained = build_model("resnet20", 10).to(memory_format=torch.channels_last).eval()
    state = {"config": {"arch": "resnet20", "stem": ""}, "classes": list(range(10)), "model": trained.state_dict()}
    assert not state["model"]["conv1.weight"].is_contiguous()
    model = from_checkpoint(state)
    assert not model.training and all(t.is_contiguous() for t in (*model.parameters(), *model.buffers()))
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), trained(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_a_seed_gives_torchvisions_weights(arch):
    """The project's own classes, module for module torchvision's: the same parameter names in the same order,
    the same random draws (bit-identical weights for a seed) and the same function."""
    torch.manual_seed(3)
    ours = build_model(arch, 10, "imagenet").eval()
    torch.manual_seed(3)
    theirs = getattr(torchvision.models, arch)(num_classes=10).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours(x), theirs(x))


def test_a_cifar_block_computes_torchvisions_block():
    model = build_model("resnet20", 10).eval()
    x = torch.randn(2, 16, 32, 32)
    for ours, h in ((model.layer1[0], x), (model.layer2[0], x)):  # identity and projection shortcut
        theirs = torchvision.models.resnet.BasicBlock(ours.conv1.in_channels, ours.conv1.out_channels,
                                                      ours.stride, ours.downsample).eval()
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(ours(h), theirs(h))


def test_a_model_and_its_costs_import_neither_torchvision_nor_dynamo():
    """~1 s each of every process on 2 cores: torchvision's ops import torch._dynamo, and so does a first op on
    the meta device (with sympy). A visualization process builds, loads and plans without them."""
    code = ("import sys, torch\n"
            "from hpcviz.models import build_model, shape_model\n"
            "from hpcviz.viz.projection import projection_parts\n"
            "from hpcviz.explain.dataset_examples import projection_footprint\n"
            "projection_parts('resnet18', 'imagenet', ['conv1', 'layer4.1'], 4, 9, 224)\n"
            "projection_footprint(shape_model('resnet20', 10, ''), 'layer3.2', (32, 32))\n"
            "build_model('resnet50', 10).eval()(torch.randn(1, 3, 32, 32))\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
