"""Windowed projections (hpcviz.explain.window) against the full projection cropped to the receptive field:
every block of a CIFAR-stem and an ImageNet-stem (max-pool) ResNet and a bottleneck ResNet, seeds at the
corners and the middle, repeated rows, exact and atomic unpooling."""
import pytest
import torch

from hpcviz.explain.dataset_examples import crop, field_box, project, receptive_field
from hpcviz.explain.deconv import Deconvnet
from hpcviz.explain.window import project_field
from hpcviz.models import block_names, build_model


def _model(arch: str, stem: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 10, stem)
    for m in model.modules():  # batch norms that are not the identity: the folded weights are tested too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _case(model, block, hw, n_images, seed=0):
    """Seeds at the four corners, the middle and random places, channels random, images repeated."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, 3, hw, hw, generator=g)
    dn = Deconvnet(model)
    act = dn.forward(x, upto=block)[block]
    c, h, w = act.shape[1:]
    ys = torch.tensor([0, 0, h - 1, h - 1, h // 2] + torch.randint(0, h, (5,), generator=g).tolist())
    xs = torch.tensor([0, w - 1, 0, w - 1, w // 2] + torch.randint(0, w, (5,), generator=g).tolist())
    ch = torch.randint(0, c, (10,), generator=g)
    rows = torch.randint(0, n_images, (10,), generator=g)
    rows[:2] = 0  # a repeated image
    return x, ch, ys, xs, rows


def _check(model, block, hw, exact=True):
    x, ch, ys, xs, rows = _case(model, block, hw, 3)
    field = receptive_field(model, block)
    full, v_full = project(Deconvnet(model, exact), x, block, ch, ys, xs, rows)
    want = crop(full, field_box(field, ys.numpy(), xs.numpy()), 0.0)
    got, v = project_field(Deconvnet(model, exact), x, block, ch, ys, xs, rows)
    assert got.shape == want.shape and torch.equal(v, v_full)
    scale = want.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
    assert torch.allclose(got / scale, want / scale, atol=1e-5), (block, (got - want).abs().max().item())
    return field


@pytest.mark.parametrize("arch,stem,hw", [("resnet18", "imagenet", 96), ("resnet20", "cifar", 32),
                                          ("resnet18", "cifar", 40)])
def test_every_block_equals_the_cropped_full_projection(arch, stem, hw):
    model = _model(arch, stem)
    windowed = 0
    for block in block_names(model):
        field = _check(model, block, hw)
        windowed += field[0] ** 2 <= 0.5 * hw * hw  # window._MOST_AREA
    assert windowed >= 3, "the windowed path itself ran (not only the fallback for fields larger than the image)"


def test_a_bottleneck_resnet_with_strided_shortcuts():
    model = _model("resnet50", "imagenet")
    for block in ("conv1", "layer1.0", "layer1.2", "layer2.0", "layer2.1"):
        _check(model, block, 96)


def test_atomic_unpooling_gives_the_same_tiles():
    model = _model("resnet18", "imagenet")
    for block in ("conv1", "layer1.0", "layer2.1"):
        _check(model, block, 64, exact=False)


def test_a_field_larger_than_the_image_is_the_full_projection_cropped():
    model = _model("resnet18", "imagenet")
    assert receptive_field(model, "layer4.1")[0] > 64
    _check(model, "layer4.1", 64)


def test_tiles_are_zero_off_the_image():
    """A corner seed: the part of its field that leaves the image is zero, the part inside is not."""
    model = _model("resnet18", "imagenet")
    x = torch.randn(1, 3, 96, 96)
    size, stride, offset = receptive_field(model, "layer1.1")
    assert offset < 0
    dn = Deconvnet(model)
    channel = dn.forward(x, upto="layer1.1")["layer1.1"][0, :, 0, 0].argmax()  # a seed that is not zero
    tiles, value = project_field(dn, x, "layer1.1", channel[None], torch.tensor([0]), torch.tensor([0]))
    assert tiles.shape == (1, 3, size, size) and value.item() > 0
    assert (tiles[0, :, :-offset] == 0).all() and (tiles[0, :, :, :-offset] == 0).all()
    assert tiles[0, :, -offset:, -offset:].abs().amin(dim=0).gt(0).any()


def test_the_cost_of_a_row_is_the_forwards_multiply_adds_at_the_windows_share():
    """projection_macs against torch's own FLOP counter (a forward of the whole model), and a hand count."""
    from torch.utils.flop_counter import FlopCounterMode

    from hpcviz.explain.window import projection_macs
    model = build_model("resnet20", 10, "cifar").eval()
    macs = projection_macs(model, (32, 32))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert receptive_field(model, "layer3.2")[0] ** 2 > 0.5 * 32 * 32  # the last block: the whole image
    assert macs["layer3.2"] == (counter.get_total_flops() - 2 * 64 * 10) / 2  # less the classifier's
    assert macs["conv1"] == 32 * 32 * 16 * 3 * 3 * 3 * 9 / (32 * 32)  # its 3 x 3 field's share of the image
    assert all(a <= b for a, b in zip(list(macs.values()), list(macs.values())[1:]))
