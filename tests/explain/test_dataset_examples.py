"""Dataset examples: the map (TopK) and the reduce (merge) against a brute-force top-k, the receptive field
against autograd, the projection against an autograd deconvnet, and the whole chain through shards."""
import numpy as np
import pytest
import torch

from hpcviz import store
from hpcviz.bench.examples import brute_force_topk
from hpcviz.bench.viz import captum_style_deconv
from hpcviz.explain.dataset_examples import (
    TopK,
    crop,
    field_box,
    merge_class_means,
    merge_topk,
    project,
    receptive_field,
    selectivity,
)
from hpcviz.explain.deconv import Deconvnet
from hpcviz.models import block_names, build_model


def _map(act, pos, labels, k, batch, n_classes=3):
    t = TopK(k, n_classes)
    for lo in range(0, len(act), batch):
        t.update("b", torch.from_numpy(act[lo:lo + batch]), torch.from_numpy(pos[lo:lo + batch]),
                 torch.from_numpy(labels[lo:lo + batch]))
    return {name.split("/")[-1] if name.startswith("topk/") else name: a for name, (a, _, _) in t.results().items()}


def _ties(rng, shape):
    """float16 activations with many ties (few levels), both between images and inside a map."""
    return (rng.integers(0, 4, size=shape) * 0.5).astype(np.float16)


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_map_equals_brute_force_with_ties_and_unordered_positions(batch):
    rng = np.random.default_rng(0)
    act = _ties(rng, (23, 5, 3, 4))
    pos = rng.permutation(100)[:23].astype(np.int64)  # positions in any order
    labels = rng.integers(0, 3, 23).astype(np.int64)
    got = _map(act, pos, labels, 4, batch)
    ref = brute_force_topk(act, pos, 4)
    for f in ("value", "index", "y", "x"):
        assert np.array_equal(got[f], ref[f]), f
    # ties: equal values are ordered by the smaller position, and (y, x) is the first maximum in row-major order
    assert (np.diff(got["value"], axis=1) <= 0).all()
    same = got["value"][:, 1:] == got["value"][:, :-1]
    assert (got["index"][:, 1:][same] > got["index"][:, :-1][same]).all()
    c, r = 2, 0
    img = act[list(pos).index(got["index"][c, r]), c].astype(np.float32)
    first = np.flatnonzero(img.reshape(-1) == img.max())[0]
    assert (got["y"][c, r], got["x"][c, r]) == divmod(first, 4)
    # class means: the mean over a class's images of each channel's spatial mean
    for cls in range(3):
        want = act[labels == cls].astype(np.float64).mean(axis=(2, 3)).mean(axis=0)
        np.testing.assert_allclose(got["class_mean/b"][cls], want, rtol=1e-6)  # spatial means in float32
    assert list(got["class_count"]) == [int((labels == c).sum()) for c in range(3)]


def test_fewer_images_than_k_and_nan():
    act = np.zeros((2, 3, 2, 2), np.float16)
    act[0, 1, 1, 1] = np.nan
    got = _map(act, np.array([5, 3]), np.array([0, 0]), 9, 2)
    assert got["value"].shape == (3, 2)  # k' = min(k, images)
    assert list(got["index"][0]) == [3, 5]  # all zero: ties by position
    assert got["value"][1, -1] == -np.inf and got["index"][1, -1] == 5  # a NaN ranks last


def test_merge_of_unequal_shards_equals_the_top_k_of_all():
    rng = np.random.default_rng(1)
    act = _ties(rng, (40, 6, 2, 3))
    pos = np.arange(40, dtype=np.int64) * 3
    labels = rng.integers(0, 3, 40)
    cuts = [0, 1, 3, 17, 40]  # shards of 1, 2, 14 and 23 images, some smaller than k
    parts = [_map(act[a:b], pos[a:b], labels[a:b], 5, 4) for a, b in zip(cuts, cuts[1:])]
    merged = merge_topk(parts, 5)
    ref = brute_force_topk(act, pos, 5)
    for f in ("value", "index", "y", "x"):
        assert np.array_equal(merged[f], ref[f]), f
    means, count = merge_class_means([p["class_mean/b"] for p in parts], [p["class_count"] for p in parts])
    whole = _map(act, pos, labels, 5, 40)
    np.testing.assert_allclose(means, whole["class_mean/b"], rtol=1e-12)
    assert np.array_equal(count, whole["class_count"])


def test_selectivity_hand_computed():
    mean = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [np.nan, 5.0, 7.0]])  # (K=3 classes, C=3), class 2 empty
    sel, top = selectivity(mean, np.array([4, 6, 0]))
    # channel 0: max 3 (class 1), rest 1 -> (3-1)/(3+1); channel 1: all zero -> 0; channel 2: equal -> 0
    np.testing.assert_allclose(sel, [0.5, 0.0, 0.0])
    assert list(top) == [1, 0, 0]
    assert np.isnan(selectivity(mean, np.array([4, 0, 0]))[0]).all()  # one class: undefined


@pytest.mark.parametrize("arch,stem", [("resnet20", "cifar"), ("resnet18", "cifar"), ("resnet18", "imagenet"),
                                       ("resnet50", "cifar")])
def test_receptive_field_matches_autograd(arch, stem):
    """With positive weights and inputs every path is live: the input-gradient of one output position is
    non-zero exactly on the field (clipped to the image); a max-pool (imagenet stem) routes it to a subset."""
    torch.manual_seed(0)
    model = build_model(arch, 10, stem).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_()
    size = 64 if stem == "imagenet" else 32
    blocks = block_names(model)
    for block in [blocks[0], blocks[1], blocks[len(blocks) // 2], blocks[-1]]:
        from hpcviz.explain.activations import block_modules
        out: dict = {}
        h = block_modules(model)[block].register_forward_hook(lambda _m, _i, o, out=out: out.__setitem__("a", o))
        try:
            x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
            model.double()(x)
        finally:
            h.remove()
        a = out["a"]
        y, xx = a.shape[2] // 2, a.shape[3] // 2
        (g,) = torch.autograd.grad(a[0, :, y, xx].sum(), x)
        support = (g[0].abs().sum(0) > 0).numpy()
        y0, x0, y1, x1 = field_box(receptive_field(model, block), np.array([y]), np.array([xx]))[0]
        inside = np.zeros_like(support)
        inside[max(y0, 0):y1, max(x0, 0):x1] = True
        assert support.any() and not (support & ~inside).any(), block
        if stem == "cifar":
            assert (support == inside).all(), block


def test_crop_pads_with_the_fill_and_takes_the_whole_image_when_the_field_is_larger():
    img = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    boxes = np.array([[-1, 2, 2, 5], [1, 1, 4, 4]])  # 3x3 fields: the first leaves the image at the top
    out = crop(img, boxes, fill=[-1.0, -2.0, -3.0])
    assert out.shape == (2, 3, 3, 3)
    assert torch.equal(out[0, :, 0], torch.tensor([-1.0, -2.0, -3.0])[:, None].expand(3, 3))
    assert torch.equal(out[0, :, 1:], img[0, :, 0:2, 2:5])
    assert torch.equal(out[1], img[1, :, 1:4, 1:4])
    big = crop(img, np.array([[-3, -3, 8, 8], [0, -1, 11, 10]]))  # 11 px fields on a 5 px image
    assert torch.equal(big, img)


def test_projection_equals_an_autograd_deconvnet_seeded_at_one_position():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "imagenet").eval()
    x = torch.randn(3, 3, 48, 48)
    dn = Deconvnet(model)
    ch, ys, xs = torch.tensor([5, 0, 63]), torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    rec, value = project(dn, x, "layer2.1", ch, ys, xs)
    for r in range(3):
        mask = torch.zeros(1, 128, 6, 6)
        mask[0, ch[r], ys[r], xs[r]] = 1.0
        ref = captum_style_deconv(model, x[r:r + 1], "layer2.1", "both", mask)
        assert torch.allclose(rec[r:r + 1], ref, atol=1e-5 * ref.abs().max().item() + 1e-12)
    assert value.shape == (3,)


def test_write_summary_refuses_an_image_axis(tmp_path):
    with store.ShardWriter(tmp_path / "s.h5", 2, {}) as w:
        w.write("index", 0, np.arange(2), dims=("image",))
        with pytest.raises(store.StoreError, match="summary"):
            w.write_summary("topk/x/value", np.zeros((2, 3)), dims=("image", "rank"))
        w.write_summary("topk/x/value", np.zeros((4, 3)), dims=("channel", "rank"))
    assert store.verify_shard(tmp_path / "s.h5", 2)["n"] == 2  # a (4, 3) summary does not break the row check
    assert store.read_summaries(tmp_path / "s.h5")["topk/x/value"].shape == (4, 3)
    assert set(store.read_shard(tmp_path / "s.h5", rows=slice(0, 1))) == {"index"}


@pytest.mark.parametrize("arch,stem", [("resnet18", "imagenet"), ("resnet20", "cifar")])
def test_projection_forwards_each_image_once_with_the_same_result(arch, stem):
    """rows: each image goes forward once and the tape is re-indexed (max-pool switches included)."""
    torch.manual_seed(1)
    model = build_model(arch, 10, stem).eval()
    x = torch.randn(3, 3, 40, 40)
    rows = torch.tensor([2, 0, 2, 1, 0])
    block = block_names(model)[3]
    ch, ys, xs = torch.tensor([1, 3, 0, 2, 1]), torch.tensor([0, 1, 2, 1, 0]), torch.tensor([1, 0, 2, 2, 0])
    shared, v1 = project(Deconvnet(model), x, block, ch, ys, xs, rows)
    each, v2 = project(Deconvnet(model), x[rows], block, ch, ys, xs)
    assert torch.allclose(shared, each, atol=1e-6 * each.abs().max().item()) and torch.equal(v1, v2)


def test_shrink_averages_areas_and_keeps_the_aspect():
    tiles = torch.arange(2 * 3 * 12 * 8, dtype=torch.float32).reshape(2, 3, 12, 8)
    from hpcviz.explain.dataset_examples import shrink
    small = shrink(tiles, 6)
    assert small.shape == (2, 3, 6, 4)
    assert torch.allclose(small[1, 2, 0, 0], tiles[1, 2, :2, :2].mean())
    assert shrink(tiles, 12) is tiles  # small enough already
    u = shrink(torch.full((1, 3, 10, 10), 200, dtype=torch.uint8), 5)
    assert u.dtype == torch.uint8 and (u == 200).all()


def test_tiles_are_scaled_each_over_its_own_finite_values():
    """tiles_rgb (all tiles at once, for the montages) against the rule computed tile by tile: min-max over the
    finite values, NaN and -inf black, +inf white; a tile without two different finite values grey; uint8
    untouched."""
    from hpcviz.explain.tiles import tile_rgb, tiles_rgb
    rng = np.random.default_rng(0)
    tiles = (rng.standard_normal((12, 3, 5, 4)) * rng.uniform(1e-6, 1e6, (12, 1, 1, 1))).astype(np.float32)
    tiles[1], tiles[2], tiles[6], tiles[7] = 0, 3.5, np.nan, np.inf
    tiles[3, 0, 0, 0], tiles[4, 1, 2, 3], tiles[5, 0, 1, 1] = np.nan, np.inf, -np.inf
    out = tiles_rgb(tiles)
    assert out.shape == (12, 5, 4, 3) and out.dtype == np.float32
    for i, t in enumerate(tiles):
        hwc = np.moveaxis(t, 0, -1)
        finite = hwc[np.isfinite(hwc)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        want = (hwc - lo) / (hi - lo) if hi > lo else None
        want = np.full_like(hwc, 0.5) if want is None else \
            np.where(np.isnan(hwc) | (hwc == -np.inf), 0.0, np.where(hwc == np.inf, 1.0, want))
        np.testing.assert_array_equal(out[i], want)
        np.testing.assert_array_equal(tile_rgb(t), want)
    assert out[1].min() == out[1].max() == 0.5 and out[3].min() == 0.0 and out[3].max() == 1.0
    u = rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(tiles_rgb(u), np.moveaxis(u, 1, -1))
