"""Figures as matplotlib Figure objects; the caller saves them (fig.savefig).

matplotlib is imported inside the functions and every figure gets its own Agg canvas, so
importing hpcviz never pulls in matplotlib and no global pyplot state or backend is touched.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["image_grid"]

_SHAPES = "(3, H, W) or (N, 3, H, W) RGB images, or (C, h, w) feature maps"


def _rgb_tile(image: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W, 3) for imshow: uint8 as is, anything else min-max scaled to [0, 1]."""
    tile = np.moveaxis(image, 0, -1)
    if tile.dtype == np.uint8:
        return tile
    tile = tile.astype(np.float32)
    finite = tile[np.isfinite(tile)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (tile - lo) / (hi - lo) if hi > lo else np.full_like(tile, 0.5)  # a constant image shows grey
    return np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)


def _check(a: np.ndarray, rgb: bool, max_items: int) -> None:
    ok = (a.ndim == 4 and a.shape[1] == 3) or (a.ndim == 3 and a.shape[0] == 3) if rgb else a.ndim == 3
    if not ok or 0 in a.shape or max_items < 1:
        raise ValueError(f"image_grid: got shape {a.shape} (rgb={rgb}, max_items={max_items}); valid: {_SHAPES}, "
                         "max_items >= 1; hint: pick one image first, e.g. store.read_image(path, name, index)")


def image_grid(images: np.ndarray, title: str = "", max_items: int = 64, cmap: str = "viridis",
               rgb: bool | None = None) -> Figure:
    """A grid of RGB images ((3, H, W) or (N, 3, H, W)) or of one image's feature maps ((C, h, w), at most
    `max_items` channels, ONE colour scale shared by all so channels compare). rgb=None: RGB when 4-D or
    when there are 3 channels; pass rgb=False for a 3-channel feature map."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.asarray(images)
    rgb = (a.ndim == 4 or (a.ndim == 3 and a.shape[0] == 3)) if rgb is None else rgb
    _check(a, rgb, max_items)
    items = (a[None] if a.ndim == 3 else a)[:max_items] if rgb else a[:max_items]  # (n, 3, H, W) | (n, h, w)
    n = len(items)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(max(4.0, min(16.0, 1.5 * cols + (0 if rgb else 1.0))), min(16.0, 1.5 * rows + 0.8)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    if rgb:
        for k, (ax, image) in enumerate(zip(axes, items)):
            ax.imshow(_rgb_tile(image), interpolation="nearest")
            if n > 1:
                ax.set_title(str(k), fontsize=6)
        scaling = "" if a.dtype == np.uint8 else " (each image min-max scaled)"
        fig.suptitle(f"{title}{chr(10) if title else ''}{n} of {len(a) if a.ndim == 4 else 1} image(s){scaling}",
                     fontsize=9)
        return fig
    maps = items.astype(np.float32)  # (n, h, w); imshow cannot take float16
    finite = maps[np.isfinite(maps)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for k, (ax, fmap) in enumerate(zip(axes, maps)):
        im = ax.imshow(fmap, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(str(k), fontsize=6)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6)
    fig.suptitle(f"{title}{chr(10) if title else ''}channels 0–{n - 1} of {len(a)}, one shared colour scale "
                 f"[{vmin:.3g}, {vmax:.3g}]", fontsize=9)
    return fig
