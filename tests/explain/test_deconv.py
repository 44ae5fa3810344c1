"""Deconvnet against independent references: autograd with a ReLU-of-gradient backward, adjoint
identities of the primitives, and hand-made pooling cases."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcviz.explain.activations import dump_activations
from hpcviz.explain.deconv import (
    PATHS,
    DeconvError,
    Deconvnet,
    _Tape,
    apply,
    bn_op,
    bn_scale,
    bn_transpose,
    conv_op,
    conv_transpose,
    parse_paths,
    seed_signal,
    transpose_ops,
    unpool,
)
from hpcviz.models import block_names, build_model

# --- the reference: autograd with every ReLU backward replaced by ReLU of the gradient -----------

class _ReluOfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class DeconvReLU(nn.Module):
    def forward(self, x):
        return _ReluOfGrad.apply(x)


def randomise_bn(model, seed=1):
    """Random running stats and affine parameters, so that no batch norm is the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(torch.randn(c, generator=g))  # signs vary too
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model


def deconv_copy(model):
    """A copy whose every ReLU (the stem's and each block's, used twice or thrice per block) is DeconvReLU."""
    m = copy.deepcopy(model).eval()
    m.relu = DeconvReLU()
    for name in block_names(m)[1:]:
        m.get_submodule(name).relu = DeconvReLU()
    return m


def block_forward(blk, x, path):
    """A residual block by hand; `path` detaches the branch the backward signal must not take."""
    out = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x)))))
    if hasattr(blk, "conv3"):
        out = blk.bn3(blk.conv3(blk.relu(out)))
    identity = x if blk.downsample is None else blk.downsample(x)
    if path == "residual":
        identity = identity.detach()
    elif path == "shortcut":
        out = out.detach()
    return blk.relu(out + identity)


def autograd_reference(model, x, block, path="both"):
    """Input-gradient of <A, A.detach()> through a DeconvReLU copy of the model."""
    m = deconv_copy(model)
    x = x.clone().requires_grad_(True)
    h = m.relu(m.bn1(m.conv1(x)))
    if block != "conv1":
        h = m.maxpool(h)
        for name in block_names(m)[1:]:
            blk = m.get_submodule(name)
            h = blk(h) if path == "both" else block_forward(blk, h, path)
            if name == block:
                break
    (h * h.detach()).sum().backward()
    return x.grad


def close(a, b, rtol=1e-5):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    assert (a - b).abs().max() <= rtol * scale, float((a - b).abs().max() / scale)


_MODELS = {}


def model(arch, stem):
    """Random weights, randomised batch norm, float64; built once per session."""
    if (arch, stem) not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch, stem] = randomise_bn(build_model(arch, 7, stem)).double().eval()
    return _MODELS[arch, stem]


CASES = [("resnet20", "cifar", ["conv1", "layer2.0", "layer3.2"]),
         ("resnet18", "imagenet", ["conv1", "layer1.1", "layer3.0", "layer4.1"]),
         ("resnet18", "cifar", ["conv1", "layer2.0", "layer4.1"]),
         ("resnet50", "imagenet", ["conv1", "layer1.0", "layer2.0", "layer4.2"])]


# --- 1. path "both" == autograd with ReLU-of-gradient, each family and stem ---------------------

@pytest.mark.parametrize("arch,stem,blocks", CASES)
def test_both_equals_autograd_deconv_reference(arch, stem, blocks):
    m = model(arch, stem)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d = Deconvnet(m)
    d.forward(x)
    for block in blocks:
        got = d.reconstruct(block)
        assert got.dtype == torch.float32 and got.shape == x.shape
        close(got, autograd_reference(m, x, block))
        assert got.abs().max() > 0


# --- 2. linear pieces: the backward is the transpose of the forward -----------------------------

def test_linear_chain_is_the_adjoint_of_its_forward():
    torch.manual_seed(3)
    convs = [nn.Conv2d(3, 5, 3, 2, 1, bias=True), nn.Conv2d(5, 4, 1, 1, 0, bias=False),
             nn.Conv2d(4, 6, 3, 2, 2, dilation=2, bias=False)]
    bns = [randomise_bn(nn.Sequential(nn.BatchNorm2d(c)), seed=i)[0].eval() for i, c in enumerate((5, 4, 6))]
    ops = [op for i, (c, b) in enumerate(zip(convs, bns)) for op in (conv_op(c, f"c{i}"), bn_op(b, f"b{i}"))]
    ops = [op.__class__(op.kind, op.key, op.module.double()) for op in ops]
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)  # odd sizes: the output padding must come back
    tape = _Tape(upto="", input_shape=tuple(x.shape))
    with torch.no_grad():
        fx = apply(ops, x, tape) - apply(ops, torch.zeros_like(x), tape)  # the linear part
        y = torch.randn_like(fx)
        back = transpose_ops(ops, y, tape)
    assert back.shape == x.shape
    torch.testing.assert_close((back * x).sum(), (y * fx).sum(), rtol=1e-10, atol=0)


def test_primitives_are_adjoints():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 3, 3, 2, 1, bias=False).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    y = torch.randn_like(F.conv2d(x, conv.weight, None, 2, 1))
    torch.testing.assert_close((conv_transpose(y, conv, x.shape) * x).sum(), (y * conv(x)).sum())
    bn = randomise_bn(nn.Sequential(nn.BatchNorm2d(4)))[0].double().eval()
    lin = bn(x) - bn(torch.zeros_like(x))
    y = torch.randn_like(x)
    torch.testing.assert_close((bn_transpose(y, bn_scale(bn)) * x).sum(), (y * lin).sum())
    pooled, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)  # overlapping windows
    y = torch.randn_like(pooled)
    torch.testing.assert_close((unpool(y, idx, x.shape) * x).sum(), (y * pooled).sum())


# --- 3./4. paths ----------------------------------------------------------------------------

def test_shortcut_at_an_identity_block_passes_the_signal_unchanged():
    m = model("resnet20", "cifar")
    d = Deconvnet(m)
    acts = d.forward(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert m.layer1[1].downsample is None
    g = torch.rand_like(acts["layer1.1"].double())  # >= 0: the block's final ReLU keeps it
    torch.testing.assert_close(d.backward_block("layer1.1", g, "shortcut"), g, rtol=0, atol=0)
    # a negative signal is cut by the block's final ReLU first
    torch.testing.assert_close(d.backward_block("layer1.1", -g, "shortcut"), torch.zeros_like(g))


@pytest.mark.parametrize("block", ["layer1.1", "layer2.0"])
def test_one_block_paths_against_autograd(block):
    m = model("resnet20", "cifar")
    d = Deconvnet(m)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    d.forward(x)
    blk = deconv_copy(m).get_submodule(block)
    h_in = d._tape.acts[d.blocks[d.blocks.index(block) - 1]].clone().requires_grad_(True)
    g = torch.randn_like(d._tape.acts[block])
    got = {p: d.backward_block(block, g, p) for p in PATHS}
    for p in PATHS:
        (ref,) = torch.autograd.grad(block_forward(blk, h_in, p), h_in, g)
        close(got[p], ref)
    close(got["both"], got["residual"] + got["shortcut"])  # linear once past the final ReLU
    if block == "layer2.0":  # projection shortcut: transposed bn, then transposed 1x1 conv
        conv, bn = m.layer2[0].downsample
        expect = conv_transpose(bn_transpose(F.relu(g), bn_scale(bn)), conv, h_in.shape)
        close(got["shortcut"], expect)


@pytest.mark.parametrize("arch,stem,block", [("resnet20", "cifar", "layer3.1"), ("resnet50", "imagenet", "layer2.1")])
@pytest.mark.parametrize("path", ["residual", "shortcut"])
def test_one_path_at_every_block_equals_autograd_with_the_other_branch_detached(arch, stem, block, path):
    m = model(arch, stem)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    d = Deconvnet(m)
    d.forward(x, upto=block)
    got = d.reconstruct(block, path)
    close(got, autograd_reference(m, x, block, path))
    assert not torch.allclose(got, d.reconstruct(block, "both"))


def test_per_block_paths():
    m = model("resnet20", "cifar")
    d = Deconvnet(m)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    d.forward(x)
    spec = "layer3.0=shortcut, layer2.2=residual"
    paths = parse_paths(spec, d.blocks)
    assert paths["layer3.0"] == "shortcut" and paths["layer2.2"] == "residual" and paths["layer1.0"] == "both"
    assert set(paths) == set(d.blocks[1:])
    got = d.reconstruct("layer3.1", spec)
    torch.testing.assert_close(got, d.reconstruct("layer3.1", paths))
    # by hand: one block at a time with its own path
    g = d._tape.acts["layer3.1"]
    for name in reversed(d.blocks[1:d.blocks.index("layer3.1") + 1]):
        g = d.backward_block(name, g, paths[name])
    torch.testing.assert_close(got, d.backward("conv1", g).float())
    assert parse_paths("shortcut,layer1.0=both", d.blocks)["layer2.0"] == "shortcut"
    assert parse_paths({"layer1.0": "residual"}, d.blocks)["layer1.0"] == "residual"


# --- 5. unpooling -----------------------------------------------------------------------------

def test_unpool_puts_values_at_the_argmax_and_adds_overlaps():
    x = torch.tensor([[[[1., 9., 2., 0.],
                        [3., 4., 0., 7.],
                        [0., 5., 8., 1.],
                        [6., 0., 2., 3.]]]])
    p, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    torch.testing.assert_close(p, torch.tensor([[[[9., 7.], [6., 8.]]]]))
    out = unpool(torch.tensor([[[[1., 2.], [3., 4.]]]]), idx, x.shape)
    expect = torch.zeros_like(x)
    expect[0, 0, 0, 1], expect[0, 0, 1, 3], expect[0, 0, 3, 0], expect[0, 0, 2, 2] = 1, 2, 3, 4
    torch.testing.assert_close(out, expect)
    # 3x3 stride 2 padding 1 (the ImageNet stem's): 9 at (0, 1) wins both top windows -> their signals add up
    p, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    torch.testing.assert_close(p, torch.tensor([[[[9., 9.], [6., 8.]]]]))
    out = unpool(torch.tensor([[[[1., 2.], [3., 4.]]]]), idx, x.shape)
    expect = torch.zeros_like(x)
    expect[0, 0, 0, 1], expect[0, 0, 3, 0], expect[0, 0, 2, 2] = 1 + 2, 3, 4
    torch.testing.assert_close(out, expect)


# --- 6. seeds ---------------------------------------------------------------------------------

def test_seeds():
    m = model("resnet18", "imagenet")
    d = Deconvnet(m)
    acts = d.forward(torch.randn(3, 3, 32, 32, dtype=torch.float64), upto="layer2.0")
    a = d._tape.acts["layer2.0"]
    one = torch.zeros_like(a)
    one[:, 5] = a[:, 5]
    torch.testing.assert_close(d.reconstruct("layer2.0", seed="channel", channel=5),
                               d.backward("layer2.0", one).float())
    top = seed_signal(a, "topk", k=3)
    means = a.mean(dim=(2, 3))
    for i in range(a.shape[0]):
        kept = (top[i].flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
        assert sorted(kept) == sorted(means[i].topk(3).indices.tolist())
        torch.testing.assert_close(top[i, kept], a[i, kept])
    torch.testing.assert_close(d.reconstruct("layer2.0", seed="topk", k=3), d.backward("layer2.0", top).float())
    torch.testing.assert_close(seed_signal(a, "topk", k=a.shape[1]), a)
    # hand-made: image 0's top channel is 1, image 1's is 0
    h = torch.tensor([[1., 3., 2.], [5., 0., 1.]])[:, :, None, None].expand(2, 3, 2, 2)
    assert seed_signal(h, "topk", k=1)[:, :, 0, 0].tolist() == [[0, 3, 0], [5, 0, 0]]
    assert torch.equal(seed_signal(h, "all"), h) and acts["conv1"].dtype == torch.float32


def test_reconstruct_all():
    torch.manual_seed(6)
    m = build_model("resnet20", 5).eval()
    d = Deconvnet(m)
    x = torch.randn(2, 3, 16, 16)
    out = d.reconstruct_all(x, ["layer2.1", "conv1"])
    assert list(out) == [(b, p) for b in ("conv1", "layer2.1") for p in PATHS]
    assert out["conv1", "both"] is out["conv1", "shortcut"]  # conv1: no residual block on the way back
    assert d._tape.upto == "layer2.1"
    for (b, p), r in out.items():
        assert r.shape == (2, 3, 16, 16) and r.dtype == torch.float32 and r.is_contiguous()
        torch.testing.assert_close(r, d.reconstruct(b, p))
    assert len(d.reconstruct_all(x)) == 3 * len(d.blocks)
    assert list(d.reconstruct_all(x, "layer1.0", "shortcut")) == [("layer1.0", "shortcut")]


# --- 7. forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,stem", [("resnet20", "cifar"), ("resnet18", "imagenet"), ("resnet50", "cifar")])
def test_forward_matches_dump_activations(arch, stem):
    torch.manual_seed(7)
    m = randomise_bn(build_model(arch, 5, stem)).eval()
    x = torch.randn(2, 3, 32, 32)
    _, ref = dump_activations(m, x)
    d = Deconvnet(m)
    acts = d.forward(x)
    assert list(acts) == list(ref) == block_names(m)
    for name in ref:
        torch.testing.assert_close(acts[name], ref[name])
    assert list(d.forward(x, upto="layer1.0")) == ["conv1", "layer1.0"]


# --- 8. errors ----------------------------------------------------------------------------------

def test_errors_are_one_line_with_the_choices_and_leave_no_hooks():
    m = build_model("resnet20", 5).eval()
    d = Deconvnet(m)
    with pytest.raises(DeconvError, match="reconstruct|forward"):
        d.reconstruct("layer1.0")  # no forward yet
    d.forward(torch.randn(1, 3, 8, 8), upto="layer1.0")
    cases = [(lambda: d.reconstruct("layer9.0"), "valid: conv1, layer1.0"),
             (lambda: d.reconstruct("layer2.0"), "upto='layer2.0'"),
             (lambda: d.reconstruct("layer1.0", "sideways"), "both, residual, shortcut"),
             (lambda: d.reconstruct("layer1.0", "layer9.9=shortcut"), "valid: layer1.0"),
             (lambda: d.reconstruct("layer1.0", "conv1=shortcut"), "valid: layer1.0"),
             (lambda: d.reconstruct("layer1.0", "layer1.0=both,layer1.0=shortcut"), "twice"),
             (lambda: d.reconstruct("layer1.0", seed="best"), "all, channel, topk"),
             (lambda: d.reconstruct("layer1.0", seed="channel"), "0..15"),
             (lambda: d.reconstruct("layer1.0", seed="topk", k=17), "1..16"),
             (lambda: d.reconstruct_all(torch.randn(1, 3, 8, 8), ["layer1.0"], ["both", "up"]), "both, residual"),
             (lambda: parse_paths("", d.blocks), "hint"),
             (lambda: d.forward(torch.randn(1, 4, 8, 8)), r"\(B, 3, H, W\)")]
    for fn, text in cases:
        with pytest.raises(DeconvError, match=text) as e:
            fn()
        assert "\n" not in str(e.value) and "hint" in str(e.value)
    assert isinstance(DeconvError("x"), ValueError)
    for mod in m.modules():
        assert not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks)
    assert not m.training and all(isinstance(b.relu, nn.ReLU) for b in m.layer1)


def test_unsupported_model_is_a_clear_error():
    m = build_model("resnet20", 5)
    m.maxpool = nn.AvgPool2d(2)
    with pytest.raises(DeconvError, match="maxpool"):
        Deconvnet(m)


def test_train_mode_flag_is_ignored_and_untouched():
    torch.manual_seed(8)
    m = randomise_bn(build_model("resnet20", 5))
    x = torch.randn(2, 3, 16, 16)
    assert m.training
    acts = Deconvnet(m).forward(x)
    assert m.training  # not switched
    _, ref = dump_activations(m.eval(), x)
    torch.testing.assert_close(acts["layer3.2"], ref["layer3.2"])


def test_deterministic_unpool_equals_the_scatter_add():
    """The exact unpooling (classes of non-overlapping 3x3/2 windows, one plain scatter each) is the same
    sum as one scatter-add, in a fixed order."""
    from hpcviz.explain.deconv import _MaxPool, max_pool, overlap, unpool
    pool = torch.nn.MaxPool2d(3, 2, 1)
    assert overlap(pool) == (2, 2) and overlap(torch.nn.MaxPool2d(2, 2)) == (1, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g)
    out, idx = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    sig = torch.randn(out.shape, generator=g)
    assert torch.allclose(unpool(sig, idx, x.shape, overlap(pool)), unpool(sig, idx, x.shape), atol=1e-6)
    # the deterministic max-pool backward equals autograd's
    a = x.clone().requires_grad_(True)
    (max_pool(a, pool, exact=True) * sig).sum().backward()
    b = x.clone().requires_grad_(True)
    (torch.nn.functional.max_pool2d(b, 3, 2, 1) * sig).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6) and _MaxPool is not None
