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


def test_the_shape_model_is_built_once_on_meta():
    from hpcviz.models import shape_model
    m = shape_model("resnet20", 10, "")
    assert m is shape_model("resnet20", 10, "") and not m.training
    assert all(p.device.type == "meta" for p in m.parameters())
    assert shape_model("resnet20", 10, "imagenet") is not m
