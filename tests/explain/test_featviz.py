"""Feature visualization: the parameterisation and transforms by hand, the objective against a module
forward and autograd, rows stopping on their own, the stored value, determinism, batched = one at a time."""
import math

import pytest
import torch

from hpcviz.errors import InputError
from hpcviz.explain.featviz import (
    LUCID_COLOR,
    FeatvizConfig,
    Param,
    Rows,
    color_correlation,
    color_matrix,
    decorrelate,
    image_to_spectrum,
    random_affines,
    row_seed,
    spectrum_scale,
    spectrum_to_image,
    transform,
    visualize,
    visualize_channels,
)
from hpcviz.explain.forward import ForwardPlan
from hpcviz.models import BasicBlock, ResNet

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny ops run ~10x faster on one thread than on two threads of a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1], 10, "cifar", width=4).eval()  # blocks conv1, layer1.0, layer2.0, layer3.0: 4, 4, 8, 16 ch
    with torch.no_grad():  # batch norm statistics that are not the identity, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.3)
    return model


def module_means(model, block, x, channels):
    """The channels' spatial means at `block` from the model's own forward (a hook), x with autograd."""
    got = {}
    module = model.relu if block == "conv1" else model.get_submodule(block)
    hook = module.register_forward_hook(lambda m, i, o: got.setdefault("a", o))
    try:
        model(x)
    finally:
        hook.remove()
    a = got["a"]
    return a[torch.arange(len(a)), torch.as_tensor(channels)].mean((-2, -1))


FAST = dict(steps=12, check_every=4, window=8, jitter=0.1, scale=0.1, rotate=10.0, lr=0.05)


# --- the parameterisation by hand --------------------------------------------------------------

def test_spectrum_scale_by_hand():
    s = spectrum_scale(8, 6)  # (8, 4): fy = k/8 (k = 0..3, -4..-1), fx = 0, 1/6, 2/6, 3/6
    assert s.shape == (8, 4)
    assert s[0, 0].item() == pytest.approx(8.0)              # DC: 1 / (1 / max(h, w))
    assert s[0, 1].item() == pytest.approx(6.0)              # |f| = 1/6
    assert s[5, 3].item() == pytest.approx(1 / math.hypot(3 / 8, 3 / 6))  # row 5 is fy = -3/8
    assert spectrum_scale(8, 6, decay_power=2.0)[0, 1].item() == pytest.approx(36.0)


def test_single_frequency_by_hand():
    h, w, ky, kx, a, b = 8, 8, 1, 2, 0.7, -0.3
    spec = torch.zeros(1, 3, h, w // 2 + 1, 2)
    spec[0, 0, ky, kx] = torch.tensor([a, b])
    scale = spectrum_scale(h, w)
    img = spectrum_to_image(spec, scale, (h, w))
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    phase = 2 * math.pi * (ky * y / h + kx * x / w)
    # a Hermitian pair of coefficients c = a + ib: 2 Re(c e^{i phase}) / sqrt(h w), times the scale 1/|f|, / 4
    want = 2 * (a * torch.cos(phase) - b * torch.sin(phase)) / math.sqrt(h * w) / math.hypot(ky / h, kx / w) / 4
    torch.testing.assert_close(img[0, 0].double(), want, atol=1e-6, rtol=1e-5)
    assert img[0, 1:].abs().max().item() == 0.0
    dc = torch.zeros(1, 3, h, w // 2 + 1, 2)
    dc[0, 2, 0, 0, 0] = 1.0  # the mean: 1 / sqrt(h w) * scale 8 / 4 = 1/4 everywhere
    torch.testing.assert_close(spectrum_to_image(dc, scale, (h, w))[0, 2], torch.full((h, w), 0.25))


@pytest.mark.parametrize("hw", [(8, 8), (6, 9), (7, 5)])
def test_image_spectrum_round_trip(hw):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, *hw, generator=g)
    scale = spectrum_scale(*hw, decay_power=1.0)
    spec = image_to_spectrum(img, scale)
    assert spec.shape == (2, 3, hw[0], hw[1] // 2 + 1, 2)
    torch.testing.assert_close(spectrum_to_image(spec, scale, hw), img, atol=1e-5, rtol=1e-5)


def test_color_mixing_by_hand():
    c = color_matrix()
    lucid = torch.tensor(LUCID_COLOR)
    torch.testing.assert_close(c, lucid / lucid.norm(dim=0).max())
    assert c.norm(dim=0).max().item() == pytest.approx(1.0)
    t = torch.zeros(1, 3, 2, 2)
    t[0, 1, 0, 1] = 2.0  # only the second decorrelated channel, at one pixel: twice the matrix's second column
    out = decorrelate(t, c)
    torch.testing.assert_close(out[0, :, 0, 1], 2 * c[:, 1])
    assert out[0, :, [0, 1, 1], [0, 0, 1]].abs().max().item() == 0.0
    torch.testing.assert_close(decorrelate(out, torch.linalg.inv(c)), t, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="need \\(3, 3\\)"):
        color_matrix(torch.eye(2))


def test_color_correlation_reproduces_the_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[0.20, 0.05, 0.0], [0.18, 0.0, 0.04], [0.15, -0.06, 0.02]])
    rgb = 0.5 + mix @ torch.randn(3, 200_000, generator=g)  # covariance mix mix^T
    pixels = rgb.T.reshape(-1, 20, 10, 3).permute(0, 3, 1, 2)
    m = color_correlation(pixels)
    torch.testing.assert_close(m @ m.T, mix @ mix.T, atol=2e-4, rtol=0.02)
    norms = m.norm(dim=0)
    assert norms[0] >= norms[1] >= norms[2] and (m.sum(0) > 0).all()


def test_param_inverse_round_trip():
    cfg = FeatvizConfig()
    p = Param((9, 7), cfg, MEAN, STD, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    pixels = 0.05 + 0.9 * torch.rand(2, 3, 9, 7, generator=g)
    torch.testing.assert_close(p.pixels(p.inverse(pixels)), pixels, atol=1e-5, rtol=1e-5)
    x = p(p.inverse(pixels))  # the data's normalisation after the sigmoid
    torch.testing.assert_close(x, (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1),
                               atol=1e-4, rtol=1e-4)


# --- the transforms by hand ------------------------------------------------------------------------

def test_transform_identity_shift_and_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(transform(x, eye), x)
    shift = eye.clone()
    shift[:, 0, 2] = 2 / 6  # sample one pixel to the right: the image moves left, the mean colour (0) comes in
    out = transform(x, shift)
    torch.testing.assert_close(out[..., :5], x[..., 1:])
    assert out[..., 5].abs().max().item() < 1e-5  # the sample lands a rounding error past the edge
    quarter = torch.tensor([[0.0, -1.0, 0], [1.0, 0, 0]]).expand(2, 2, 3)  # 90 degrees
    torch.testing.assert_close(transform(x, quarter), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)


def test_random_affines_ranges_and_off():
    cfg = FeatvizConfig(jitter=0.1, scale=0.2, rotate=30.0)
    th = random_affines(torch.Generator().manual_seed(0), 500, cfg, (8, 8)).double()
    assert th.shape == (500, 2, 3)
    assert th[:, :, 2].abs().max() <= 0.2 + 1e-6            # +- 0.1 of the side is +- 0.2 in [-1, 1] units
    det = torch.linalg.det(th[:, :, :2])                    # 1 / zoom^2
    assert det.min() >= 1 / 1.2 ** 2 - 1e-5 and det.max() <= 1 / 0.8 ** 2 + 1e-5
    angle = torch.rad2deg(torch.atan2(th[:, 1, 0], th[:, 0, 0]))
    assert angle.abs().max() <= 30 + 1e-4 and angle.abs().max() > 25
    off = random_affines(torch.Generator().manual_seed(0), 3, FeatvizConfig(jitter=0, scale=0, rotate=0), (8, 5))
    torch.testing.assert_close(off, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))


# --- the objective ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_objective_against_the_module_forward_and_autograd(net, stem):
    model = net if stem == "cifar" else ResNet(BasicBlock, [1, 1, 1], 10, "imagenet", width=4).eval()
    size = 8 if stem == "cifar" else 16
    blocks = ["conv1", "layer1.0", "layer3.0"]
    chans = [torch.tensor([1, 3]), torch.tensor([0, 2, 3]), torch.tensor([15, 0])]
    plan = ForwardPlan(model).folded(channels_last=True)
    rows = Rows(plan, blocks, chans, exact=True, channels_last=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, size, size, generator=g, requires_grad=True)
    f = rows.evaluate(x, torch.arange(7), [2, 3, 2])
    gx, = torch.autograd.grad((f * torch.arange(1.0, 8.0)).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.cat([module_means(model, b, x2[s], c) for b, s, c in
                     zip(blocks, (slice(0, 2), slice(2, 5), slice(5, 7)), chans)])
    gref, = torch.autograd.grad((ref * torch.arange(1.0, 8.0)).sum(), x2)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gref, atol=1e-6, rtol=1e-4)
    assert rows.counts(torch.tensor([0, 4, 5, 6])) == [1, 1, 2]


def test_first_step_is_adam_ascent_of_the_transformed_activation(net):
    cfg = FeatvizConfig(steps=1, check_every=1, window=0, lr=0.05, jitter=0.2, scale=0.2, rotate=20)
    r = visualize_channels(net, "layer2.0", [5], cfg, MEAN, STD, 8)
    g = torch.Generator().manual_seed(row_seed(cfg.seed, "layer2.0", 5))  # the row's own draws, as documented
    spec0 = (cfg.init_std * torch.randn(1, 3, 8, 5, 2, generator=g)).requires_grad_(True)
    theta = random_affines(g, 1, cfg, (8, 8))
    param = Param((8, 8), cfg, MEAN, STD, None, torch.device("cpu"))
    f = module_means(net, "layer2.0", transform(param(spec0), theta), [5])
    grad, = torch.autograd.grad(f.sum(), spec0)
    spec1 = spec0.detach() + cfg.lr * grad / (grad.abs() + 1e-8)  # Adam's first step, bias-corrected
    torch.testing.assert_close(r["x"], param(spec1), atol=1e-5, rtol=1e-5)
    assert r["steps"].tolist() == [1]


# --- the optimisation -----------------------------------------------------------------------------

def test_value_is_a_plain_forward_of_x(net):
    r = visualize(net, {"conv1": [0, 2], "layer2.0": None}, FeatvizConfig(**FAST), MEAN, STD, 8)
    assert list(r) == ["conv1", "layer2.0"]
    for block, res in r.items():
        assert res["x"].dtype == torch.float32 and res["x"].shape == (len(res["channels"]), 3, 8, 8)
        with torch.no_grad():
            plain = module_means(net, block, res["x"], res["channels"])
        assert torch.equal(res["value"], plain), (block, res["value"] - plain)
        assert res["curve"][:, -1].tolist() == pytest.approx(res["value"].tolist(), rel=1e-4, abs=1e-6)
    assert r["layer2.0"]["channels"].tolist() == list(range(8))
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    x = r["layer2.0"]["x"]
    assert (x >= lo.view(1, 3, 1, 1)).all() and (x <= hi.view(1, 3, 1, 1)).all()


def test_activation_rises(net):
    cfg = FeatvizConfig(steps=48, check_every=8, window=0, lr=0.1)
    r = visualize_channels(net, "layer1.0", None, cfg, MEAN, STD, 8)
    assert (r["curve"][:, -1] > r["curve"][:, 0]).all()


def test_rows_stop_on_their_own(net):
    import copy
    dead = copy.deepcopy(net)
    with torch.no_grad():  # channel 1 of layer1.0 never fires: its activation is 0 whatever the input
        dead.layer1[0].bn2.bias[1] = -1e4
    cfg = FeatvizConfig(steps=40, check_every=4, window=8, plateau=0.02, lr=0.1)
    seen = []
    r = visualize_channels(dead, "layer1.0", None, cfg, MEAN, STD, 8,
                           progress=lambda s, n, running, rows: seen.append((s, running, rows)))
    steps = r["steps"].tolist()
    assert steps[1] == 8                    # stopped at the first check with a window behind it
    assert max(steps) > 8 and max(steps) <= 40 and r["value"][1].item() == 0.0
    assert [s for s, _, _ in seen] == list(range(4, 41, 4))[:len(seen)] and seen[-1][1] == 0
    assert all(rows == 4 for _, _, rows in seen) and seen[1][1] == 3  # the dead row left at step 8
    k = 8 // 4  # the curve's column of step 8 (column 0: the start)
    assert (r["curve"][1, k:] == r["curve"][1, k]).all()               # held once the row stopped
    # a row's result does not depend on the rows stopping beside it: channel 0 alone gives the same
    alone = visualize_channels(dead, "layer1.0", [0], cfg, MEAN, STD, 8)
    assert alone["steps"].tolist() == steps[:1]
    torch.testing.assert_close(alone["x"][0], r["x"][0], atol=1e-4, rtol=1e-4)


def test_deterministic_for_a_seed(net):
    cfg = FeatvizConfig(**FAST)
    a = visualize_channels(net, "layer1.0", None, cfg, MEAN, STD, 8)
    b = visualize_channels(net, "layer1.0", None, cfg, MEAN, STD, 8)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["value"], b["value"])
    c = visualize_channels(net, "layer1.0", None, FeatvizConfig(**{**FAST, "seed": 1}), MEAN, STD, 8)
    assert not torch.equal(a["x"], c["x"])


def test_batched_rows_equal_one_channel_runs(net):
    cfg = FeatvizConfig(**{**FAST, "plateau": 0.0})
    both = visualize(net, {"layer1.0": [0, 1, 3], "layer3.0": [2, 9]}, cfg, MEAN, STD, 8)
    for block, chans in (("layer1.0", [0, 1, 3]), ("layer3.0", [2, 9])):
        for i, c in enumerate(chans):
            one = visualize_channels(net, block, [c], cfg, MEAN, STD, 8)
            torch.testing.assert_close(one["x"][0], both[block]["x"][i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(one["value"][0], both[block]["value"][i], atol=1e-4, rtol=1e-4)
    groups = visualize(net, {"layer1.0": [0, 1, 3], "layer3.0": [2, 9]}, FeatvizConfig(**{**FAST, "plateau": 0.0,
                       "batch": 2}), MEAN, STD, 8)  # rows in groups of 2, one group after another
    for block in both:
        torch.testing.assert_close(groups[block]["x"], both[block]["x"], atol=1e-4, rtol=1e-4)


def test_bf16_steps_keep_the_value_exact(net, monkeypatch):
    """precision="bf16" (the default on CUDA) runs the steps under bf16 autocast (here on the CPU, as on a GPU but
    with oneDNN): the result stays near fp32's and the stored value is still the plain fp32 forward of x."""
    from hpcviz.explain import featviz
    seen = []
    real = featviz.autocast
    monkeypatch.setattr(featviz, "autocast", lambda p, d: seen.append(p) or real(p, d))
    cfg = FeatvizConfig(**{**FAST, "plateau": 0.0})
    fp32 = visualize_channels(net, "layer2.0", [1, 5], cfg, MEAN, STD, 8)
    assert set(seen) == {"exact"}  # "auto" on a CPU
    seen.clear()
    low = visualize_channels(net, "layer2.0", [1, 5], FeatvizConfig(**{**FAST, "plateau": 0.0, "precision": "bf16"}),
                             MEAN, STD, 8)
    assert set(seen) == {"bf16"} and len(seen) == cfg.steps  # every step, not the checks
    with torch.no_grad():
        assert torch.equal(low["value"], module_means(net, "layer2.0", low["x"], [1, 5]))
    torch.testing.assert_close(low["value"], fp32["value"], rtol=0.1, atol=0.05)
    with pytest.raises(InputError, match="precision 'half'.*auto, exact, bf16, tf32"):
        visualize(net, "layer1.0", FeatvizConfig(steps=1, precision="half"))


def test_bad_requests(net):
    with pytest.raises(InputError, match="layer9.0.*valid: conv1, layer1.0"):
        visualize(net, "layer9.0", FeatvizConfig(steps=1))
    with pytest.raises(InputError, match="channels \\[4\\] of block layer1.0: need a non-empty list in 0..3"):
        visualize(net, {"layer1.0": [4]}, FeatvizConfig(steps=1))
    with pytest.raises(InputError, match="window a multiple of check_every"):
        visualize(net, "layer1.0", FeatvizConfig(steps=8, check_every=3, window=8))


def test_redirected_relu_by_hand():
    from hpcviz.explain.featviz import RedirectedReLU
    z = torch.tensor([[[-1.0, 2.0], [-3.0, 0.5]],      # fires: the plain ReLU gradient
                      [[-1.0, -2.0], [-0.5, -4.0]]],   # off everywhere: the gradient goes through where it raises z
                     requires_grad=True)
    g = torch.tensor([[[1.0, 2.0], [3.0, -4.0]], [[1.0, -2.0], [3.0, 4.0]]])
    out = RedirectedReLU.apply(z)
    assert torch.equal(out, z.detach().clamp_min(0))
    grad, = torch.autograd.grad(out, z, g)
    assert grad.tolist() == [[[0.0, 2.0], [0.0, -4.0]], [[1.0, 0.0], [3.0, 4.0]]]


def test_pre_relu_forward_is_the_plain_forward_before_its_relu(net):
    from hpcviz.explain.featviz import stacked_pre_relu
    for model, size in ((net, 8), (ResNet(BasicBlock, [1, 1, 1], 10, "imagenet", width=4).eval(), 16)):
        plan = ForwardPlan(model)
        x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
        blocks, sizes = ["conv1", "layer1.0", "layer3.0"], [1, 2, 3]
        pool = lambda h, p: p(h)  # noqa: E731
        pre = stacked_pre_relu(plan, x, blocks, sizes, pool)
        post = plan.stacked(x, blocks, sizes, pool)
        for a, b in zip(pre, post):
            assert torch.equal(torch.relu(a), b) and (a < 0).any()


# --- the benchmark's parts ----------------------------------------------------------------------------

def test_row_costs_by_hand():
    from hpcviz.bench.featviz import row_costs
    c = row_costs("resnet20", 32)
    conv1 = 16 * 3 * 9 * 32 * 32  # multiply-adds of the stem's conv (batch norm folded into it)
    assert c["conv1"]["channels"] == 16 and c["conv1"]["flops"] == 2 * 2 * conv1  # forward + input gradient
    assert c["layer3.2"]["channels"] == 64
    assert c["layer1.0"]["flops"] - c["conv1"]["flops"] == 2 * 2 * 2 * 16 * 16 * 9 * 32 * 32  # two 16->16 convs
    assert c["conv1"]["saved_bytes"] > 0 and c["layer3.2"]["saved_bytes"] > c["layer1.0"]["saved_bytes"]


def test_bench_featviz_with_the_loop_baseline(net):
    from hpcviz.bench.featviz import bench_featviz, pick_channels
    chans = pick_channels(net, 8, 2)
    assert chans["conv1"] == [0, 3] and chans["layer3.0"] == [0, 15]
    small = {"conv1": chans["conv1"], "layer2.0": chans["layer2.0"]}
    r = bench_featviz(net, MEAN, STD, 8, small, FeatvizConfig(**FAST), baseline="loop", baseline_steps=6)
    assert r["baseline"] == "loop" and r["channels"] == 4 and len(r["per_channel"]) == 4
    assert r["per_channel"][2] == {**r["per_channel"][2], "block": "layer2.0", "channel": 0}
    ours = visualize(net, small, FeatvizConfig(**FAST), MEAN, STD, 8)
    assert [p["ours"] for p in r["per_channel"]] == torch.cat([ours[b]["value"] for b in small]).tolist()
    assert 0 <= r["ours_ge_baseline"] <= 1 and r["time_ratio"] > 0


def test_row_bytes_count_a_row_not_the_shared_weights():
    """A row's bytes are what one more row adds: at 32 px ResNet-18's weights (45 MB, kept once for every
    convolution's backward) dwarf a row, and counting them per row held 176 rows at once where thousands fit."""
    from hpcviz.explain.featviz import row_bytes
    from hpcviz.models import build_model
    with torch.device("meta"):
        r18 = build_model("resnet18", 10, "imagenet").eval()
    small, big = row_bytes(r18, ["layer4.1"], 32)["layer4.1"], row_bytes(r18, ["layer4.1"], 64)["layer4.1"]
    weights = sum(p.numel() * 4 for p in r18.parameters())
    assert 0 < small < weights / 50
    assert 3.5 * small < big < 4.5 * small  # activations: 4x the pixels, 4x the bytes
