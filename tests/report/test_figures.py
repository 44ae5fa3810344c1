"""hpcviz.report.figures.image_grid: RGB images and feature-map grids as returned (never saved) Figures."""
from __future__ import annotations

import io

import numpy as np
import pytest

from hpcviz.report.figures import image_grid


def shown(fig) -> list:
    """The AxesImages drawn, in grid order (the colour bar is not one)."""
    return [ax.images[0] for ax in fig.axes if ax.images]


def test_single_rgb_uint8_is_drawn_as_is():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    img = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    fig = image_grid(img, title="one")
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    (im,) = shown(fig)
    assert np.array_equal(np.asarray(im.get_array()), img.transpose(1, 2, 0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_float_batch_scaled_per_image_and_capped():
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((10, 3, 4, 4)).astype(np.float32) * np.arange(1, 11)[:, None, None, None] * 100
    batch[2] = 7.0  # constant image: grey, no division by zero
    batch[3, 0, 0, 0] = np.nan
    fig = image_grid(batch, max_items=4)
    ims = shown(fig)
    assert len(ims) == 4 and "4 of 10 image(s) (each image min-max scaled)" in fig._suptitle.get_text()
    for k in (0, 1, 3):
        a = np.asarray(ims[k].get_array())
        assert a.shape == (4, 4, 3) and a.min() == 0.0 and a.max() == 1.0 and np.isfinite(a).all()
    assert np.all(np.asarray(ims[2].get_array()) == 0.5)


def test_feature_maps_share_one_colour_scale():
    maps = np.random.default_rng(2).standard_normal((100, 3, 3)).astype(np.float16)
    maps *= np.arange(100, dtype=np.float16)[:, None, None] / 10  # channel ranges differ widely
    maps[1, 0, 0] = np.inf
    fig = image_grid(maps, title="act/layer1.0[0]", max_items=16)
    ims = shown(fig)
    assert len(ims) == 16
    shown_maps = maps[:16].astype(np.float32)
    lo, hi = np.nanmin(shown_maps), shown_maps[np.isfinite(shown_maps)].max()
    assert {im.get_clim() for im in ims} == {(float(lo), float(hi))}  # ONE scale for all channels
    assert len(fig.axes) == 16 + 1  # 4 x 4 grid plus one colour bar
    title = fig._suptitle.get_text()
    assert title.startswith("act/layer1.0[0]") and "channels 0–15 of 100" in title and "shared colour scale" in title


def test_three_channel_feature_map_when_asked():
    maps = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    assert len(shown(image_grid(maps))) == 1  # 3 channels look like RGB by default
    ims = shown(image_grid(maps, rgb=False, cmap="gray"))
    assert len(ims) == 3 and ims[0].get_cmap().name == "gray" and ims[2].get_clim() == (0.0, 11.0)


@pytest.mark.parametrize("shape, kw", [((4, 4), {}), ((2, 4, 5, 5), {}), ((3, 4, 4), {"max_items": 0}),
                                       ((0, 4, 4), {"rgb": False}), ((5, 3, 4, 4, 1), {})])
def test_bad_input(shape, kw):
    with pytest.raises(ValueError) as e:
        image_grid(np.zeros(shape, np.float32), **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(shape) in msg and "valid:" in msg and "hint" in msg


def test_filter_grid_and_feature_maps():
    import numpy as np
    import pytest

    from hpcviz.report.figures import feature_maps, filter_grid, order_channels
    rng = np.random.default_rng(0)
    fig = filter_grid(rng.normal(size=(64, 3, 7, 7)))
    assert len([ax for ax in fig.axes if ax.images]) == 64 and "7x7x3" in fig._suptitle.get_text()
    fig = filter_grid(rng.normal(size=(16, 3, 3, 3)), scale="global")
    assert "grey = 0" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="scale 'filter' or 'global'"):
        filter_grid(rng.normal(size=(4, 3, 3, 3)), scale="each")
    act = np.zeros((5, 4, 4), dtype=np.float16)
    act[3] += 2
    act[1] += 1
    assert list(order_channels(act)[:2]) == [3, 1]
    fig = feature_maps(act, "layer1.0", max_channels=3)
    assert len([ax for ax in fig.axes if ax.images]) == 3 and "top 3 of 5" in fig._suptitle.get_text()
    # one colour scale shared by every tile of the block
    assert len({ax.images[0].get_clim() for ax in fig.axes if ax.images}) == 1


def test_training_curves_class_accuracy_and_confusion():
    from hpcviz.report.figures import class_accuracy, confusion_matrix, training_curves
    records = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "train_acc": 0.3 * e, "val_acc": 0.25 * e}
               for e in (1, 2, 3)]
    fig = training_curves(records)
    loss_ax, acc_ax = fig.axes
    assert [list(l.get_ydata()) for l in loss_ax.lines] == [[2.0, 1.0, 2.0 / 3], [2.2, 1.1, 2.2 / 3]]
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [25, 50, 75])  # percent
    fig = class_accuracy(["a", "b", "c"], [0.5, None, 1.0], overall=0.6)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [50.0, 0.0, 100.0]
    assert [t.get_text() for t in ax.texts] == ["50.0", "n/a", "100.0"]
    fig = confusion_matrix(np.array([[3, 1], [0, 2]]), ["a", "b"])
    share = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(share, [[0.75, 0.25], [0.0, 1.0]])  # rows normalised: share of the true class
    assert [t.get_text() for t in fig.axes[0].texts] == ["3", "1", "0", "2"]
    with pytest.raises(ValueError, match="hint"):
        confusion_matrix(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="hint"):
        training_curves([])


def test_block_maps_rows_are_blocks_with_their_strongest_channels():
    from hpcviz.report.figures import block_maps
    a = np.zeros((4, 2, 2), np.float32)
    a[2] = 5.0
    a[0] = 1.0
    b = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    fig = block_maps(np.zeros((3, 8, 8), np.uint8), {"conv1": a, "layer1.0": b}, channels=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["ch 2", "ch 0", "ch 2", "ch 1"]  # strongest mean activation first, per block
    rows = shown(fig)
    assert rows[1].get_clim() == (1.0, 5.0) and rows[4].get_clim() == (16.0, 47.0)  # one scale per row
