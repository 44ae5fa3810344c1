"""Figures as matplotlib Figure objects; the caller saves them (fig.savefig).

matplotlib is imported inside the functions and every figure gets its own Agg canvas, so
importing hpcviz never pulls in matplotlib and no global pyplot state or backend is touched.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..explain.tiles import montage, tile_rgb
from .render import terminal_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["image_grid", "filter_grid", "feature_maps", "order_channels", "deconv_panel", "inversion_panel",
           "training_curves", "class_accuracy", "confusion_matrix", "block_maps", "examples_grid"]

_SHAPES = "(3, H, W) or (N, 3, H, W) RGB images, or (C, h, w) feature maps"


def _check(a: np.ndarray, rgb: bool, max_items: int) -> None:
    ok = (a.ndim == 4 and a.shape[1] == 3) or (a.ndim == 3 and a.shape[0] == 3) if rgb else a.ndim == 3
    if not ok or 0 in a.shape or max_items < 1:
        raise InputError(f"image_grid: got shape {a.shape} (rgb={rgb}, max_items={max_items}); valid: {_SHAPES}, "
                         "max_items >= 1; hint: pick one image first, e.g. store.read_image(path, name, index)")


def _label(text: object) -> str:
    """Text from the data (class names) shown literally: matplotlib would parse $...$ as math, and has no glyph
    for a control character (shown as \\xNN, as on a terminal)."""
    return terminal_text(text).replace("$", r"\$")


def _figure(width: float, height: float, grid: bool = False) -> Figure:
    """A Figure (inches) on its own Agg canvas: no pyplot, no global state. `grid`: a grid of many small
    tiles, laid out with fixed margins (constrained layout costs ~1 s per 30 tiles at every save)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout=None if grid else "constrained")
    FigureCanvasAgg(fig)
    return fig


def _tight(fig: Figure, title_lines: int = 2, right: float = 0.98, label_inches: float = 0.0) -> None:
    """Fixed margins for a grid figure: room for the suptitle on top (lines of 9 pt) and, when given, for
    row labels on the left and tile captions under the tiles."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=min(0.3, (0.1 + label_inches) / w), right=right, bottom=min(0.2, 0.15 / h),
                        top=max(0.5, 1 - (0.25 + 0.17 * title_lines) / h), wspace=0.12, hspace=0.45)


def image_grid(images: np.ndarray, title: str = "", max_items: int = 64, cmap: str = "viridis",
               rgb: bool | None = None, labels: list[str] | None = None) -> Figure:
    """A grid of RGB images ((3, H, W) or (N, 3, H, W)) or of one image's feature maps ((C, h, w), at most
    `max_items` channels, ONE colour scale shared by all so channels compare). rgb=None: RGB when 4-D or
    when there are 3 channels; pass rgb=False for a 3-channel feature map."""
    a = np.asarray(images)
    rgb = (a.ndim == 4 or (a.ndim == 3 and a.shape[0] == 3)) if rgb is None else rgb
    _check(a, rgb, max_items)
    items = (a[None] if a.ndim == 3 else a)[:max_items] if rgb else a[:max_items]  # (n, 3, H, W) | (n, h, w)
    n = len(items)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = _figure(max(4.0, min(16.0, 1.5 * cols + (0 if rgb else 1.0))), min(16.0, 1.5 * rows + 0.8), grid=True)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    _tight(fig, title_lines=2 + title.count("\n") + bool(title), right=0.98 if rgb else 0.86)
    for ax in axes:
        ax.set_axis_off()
    if rgb:
        for k, (ax, image) in enumerate(zip(axes, items)):
            ax.imshow(tile_rgb(image), interpolation="nearest")
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
        ax.set_title(labels[k] if labels else str(k), fontsize=6)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6)
    which = f"{n} of {len(a)} channels" if labels else f"channels 0–{n - 1} of {len(a)}"
    fig.suptitle(f"{title}{chr(10) if title else ''}{which}, one shared colour scale "
                 f"[{vmin:.3g}, {vmax:.3g}]", fontsize=9)
    return fig


def filter_grid(weight: np.ndarray, title: str = "conv1 filters", scale: str = "filter") -> Figure:
    """The first layer's filters (C_out, 3, k, k) as RGB tiles (64 of 7x7 for the ImageNet stem, 3x3 for the
    CIFAR stem). scale='filter': each filter is min-max scaled to [0, 1] on its own (shapes show best, but one
    grey level means different weights in different tiles); scale='global': one scale for all filters,
    symmetric around 0 (mid grey = 0), so strengths compare."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 3 or scale not in ("filter", "global"):
        raise InputError(f"filter_grid: weight {w.shape}, scale {scale!r}; valid: (C_out, 3, k, k) and "
                         "scale 'filter' or 'global'; hint: pass model.conv1.weight.detach().cpu().numpy()")
    if scale == "global":
        m = float(np.abs(w).max()) or 1.0
        tiles = (w / m + 1) / 2  # (C, 3, k, k) in [0, 1], 0 -> 0.5
    else:
        lo = w.min(axis=(1, 2, 3), keepdims=True)
        hi = w.max(axis=(1, 2, 3), keepdims=True)
        tiles = (w - lo) / np.where(hi > lo, hi - lo, 1.0)
    k = w.shape[-1]
    fig = image_grid((tiles * 255).round().astype(np.uint8), title=f"{title}: {len(w)} of {k}x{k}x3, "
                     f"{'each filter scaled to its own min-max' if scale == 'filter' else 'one scale, grey = 0'}",
                     max_items=len(w))
    return fig


def order_channels(act: np.ndarray) -> np.ndarray:
    """Channel indices of one image's maps (C, h, w), largest mean activation first."""
    return np.argsort(-np.asarray(act, dtype=np.float32).mean(axis=(1, 2)), kind="stable")


def feature_maps(act: np.ndarray, block: str = "", max_channels: int = 32, cmap: str = "viridis") -> Figure:
    """One image's feature maps of one block: channels ordered by mean activation (strongest first), at
    most `max_channels`, one colour scale shared by all tiles of the block."""
    a = np.asarray(act, dtype=np.float32)
    if a.ndim != 3:
        raise InputError(f"feature_maps: got shape {a.shape}; valid: (C, h, w) of one image; hint: act[i]")
    order = order_channels(a)[:max_channels]
    fig = image_grid(a[order], title=f"{block}: top {len(order)} of {len(a)} channels by mean activation "
                     "(tile title = channel)", max_items=max_channels, cmap=cmap, rgb=False,
                     labels=[f"ch {c}" for c in order])
    return fig


def deconv_panel(image: np.ndarray, recs: dict, title: str = "") -> Figure:
    """The input image, then one row per block and one column per path of deconvnet reconstructions
    ((3, H, W) each, raw). Display: each tile min-max scaled on its own (a reconstruction's scale is
    arbitrary); a tile whose reconstruction is all zero stays black and says so."""
    blocks = list(dict.fromkeys(b for b, _ in recs))
    paths = list(dict.fromkeys(p for _, p in recs))
    fig = _figure(1.6 * (len(paths) + 1), 1.5 * len(blocks) + 0.8, grid=True)
    axes = fig.subplots(len(blocks), len(paths) + 1, squeeze=False)
    # the suptitle's lines, then the column headings (input, the paths) on a line of their own above the tiles
    _tight(fig, title_lines=2 + bool(title), label_inches=0.5)
    for row, block in enumerate(blocks):
        axes[row, 0].imshow(tile_rgb(np.asarray(image)), interpolation="nearest")
        axes[row, 0].set_ylabel(block, fontsize=7)
        for col, path in enumerate(paths, start=1):
            ax = axes[row, col]
            rec = recs.get((block, path))
            if rec is not None:
                rec = np.asarray(rec, dtype=np.float32)
                ax.imshow(tile_rgb(rec) if np.any(rec) else np.zeros(rec.shape[1:] + (3,)), interpolation="nearest")
                if not np.any(rec):
                    ax.text(0.5, 0.5, "zero", color="w", ha="center", va="center", transform=ax.transAxes, fontsize=6)
            if row == 0:
                ax.set_title(path, fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle(f"{title}{chr(10) if title else ''}deconvnet reconstructions (each tile min-max scaled)", fontsize=9)
    return fig


def inversion_panel(images: np.ndarray, recs: dict, errors: dict, title: str = "") -> Figure:
    """Per block (rows): the originals (uint8 (N, 3, H, W)) beside their inversions ((N, 3, H, W), raw; each
    tile min-max scaled for display), the relative feature error under each inversion."""
    blocks = list(recs)
    n = len(images)
    fig = _figure(1.4 * n * 2, 1.6 * len(blocks) + 0.8, grid=True)
    axes = fig.subplots(len(blocks), 2 * n, squeeze=False)
    _tight(fig, title_lines=1 + bool(title), label_inches=0.5)
    for row, block in enumerate(blocks):
        for i in range(n):
            a, b = axes[row, 2 * i], axes[row, 2 * i + 1]
            a.imshow(tile_rgb(np.asarray(images[i])), interpolation="nearest")
            b.imshow(tile_rgb(np.asarray(recs[block][i], dtype=np.float32)), interpolation="nearest")
            b.set_xlabel(f"err {float(errors[block][i]):.3f}", fontsize=7)
            for ax in (a, b):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[row, 0].set_ylabel(block, fontsize=7)
    fig.suptitle(f"{title}{chr(10) if title else ''}originals and inversions (relative feature error; "
                 "inversions min-max scaled)", fontsize=9)
    return fig


def training_curves(records: list[dict], title: str = "") -> Figure:
    """Loss (left) and accuracy (right) per epoch, train and val, from metrics.jsonl records."""
    if not records:
        raise InputError("training_curves: no epochs; hint: pass RunDir(run).read_metrics() of a trained run")
    epochs = [r["epoch"] for r in records]
    fig = _figure(9.0, 3.4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in records], style, marker=".", label=key)
        ax_acc.plot(epochs, [100 * r[f"{key}_acc"] for r in records], style, marker=".", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def class_accuracy(classes: list[str], accuracy: list[float | None], overall: float | None = None,
                   title: str = "per-class validation accuracy") -> Figure:
    """One bar per class (accuracy in [0, 1]; None = no image of that class), the overall as a line."""
    if len(classes) != len(accuracy) or not classes:
        raise InputError(f"class_accuracy: {len(classes)} classes but {len(accuracy)} accuracies; "
                         "hint: pass eval.json's classes and per_class_accuracy in the same order")
    values = [100 * a if a is not None else 0.0 for a in accuracy]
    fig = _figure(max(5.0, 0.55 * len(classes) + 1.5), 3.4)
    ax = fig.subplots()
    bars = ax.bar(range(len(classes)), values, color="tab:blue")
    for bar, a in zip(bars, accuracy):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, "n/a" if a is None else f"{100 * a:.1f}",
                ha="center", va="bottom", fontsize=7)
    if overall is not None:
        ax.axhline(100 * overall, color="tab:red", lw=1, ls="--", label=f"overall {100 * overall:.2f}%")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(classes)), [_label(c) for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set(ylim=(0, 108), ylabel="accuracy (%)", title=title)
    return fig


def confusion_matrix(confusion: np.ndarray, classes: list[str], title: str = "confusion matrix (validation)") -> Figure:
    """Rows = true class, columns = predicted; colour = share of the row, text = count."""
    c = np.asarray(confusion, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] != len(classes):
        raise InputError(f"confusion_matrix: shape {c.shape} for {len(classes)} classes; valid: (K, K), "
                         "rows = true class; hint: pass eval.json's confusion and classes")
    share = c / np.maximum(c.sum(1, keepdims=True), 1)  # (K, K) row-normalised
    k = len(classes)
    fig = _figure(max(4.5, 0.5 * k + 2.0), max(4.0, 0.5 * k + 1.5))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), [_label(c) for c in classes], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), [_label(c) for c in classes], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, shrink=0.7, label="share of the true class")
    return fig


def block_maps(image: np.ndarray, acts: dict, channels: int = 8, title: str = "", cmap: str = "viridis") -> Figure:
    """One image and, per block (rows), its `channels` strongest feature maps (by mean activation);
    each row has its own colour scale (blocks differ in range), shared by the tiles of that row."""
    blocks = list(acts)
    if not blocks or channels < 1:
        raise InputError("block_maps: no blocks or channels < 1; hint: pass {block: act[i]} with (C, h, w) each")
    fig = _figure(1.1 * (channels + 1) + 0.8, 1.05 * len(blocks) + 0.8, grid=True)
    axes = fig.subplots(len(blocks), channels + 1, squeeze=False)
    _tight(fig, title_lines=1 + bool(title), label_inches=0.5)
    for row, block in enumerate(blocks):
        a = np.asarray(acts[block], dtype=np.float32)  # (C, h, w)
        order = order_channels(a)[:channels]
        finite = a[order][np.isfinite(a[order])]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        axes[row, 0].imshow(tile_rgb(np.asarray(image)), interpolation="nearest")
        axes[row, 0].set_ylabel(block, fontsize=7)
        for col, ch in enumerate(order, start=1):
            axes[row, col].imshow(a[ch], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            axes[row, col].set_title(f"ch {ch}", fontsize=6)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}{chr(10) if title else ''}feature maps: the {channels} strongest channels of each block "
                 "(one colour scale per row)", fontsize=9)
    return fig


def examples_grid(patch: np.ndarray, deconv: np.ndarray, channels: np.ndarray, selectivity: np.ndarray,
                  top_class: np.ndarray, classes: list[str], block: str, title: str = "") -> Figure:
    """Per channel (rows; `channels` their numbers), its k strongest patches and their deconvnet projections,
    and a bar of its class selectivity with the class it prefers. Drawn at one screen pixel per montage pixel
    (so a block's full grid of hundreds of channels stays sharp)."""
    pixels = montage(patch, deconv)  # (H, W, 3)
    dpi, label_px, bar_px, head_px = 100, 90, 150, 48
    h, w = pixels.shape[:2]
    width, height = (label_px + w + bar_px + 20) / dpi, (h + head_px + 20) / dpi
    fig = _figure(width, height, grid=True)
    fig.set_dpi(dpi)
    ax = fig.add_axes((label_px / dpi / width, 20 / dpi / height, w / dpi / width, h / dpi / height))
    ax.imshow(pixels, interpolation="nearest", aspect="auto")
    row = h / len(channels)
    ax.set_yticks([(i + 0.5) * row for i in range(len(channels))],
                  [f"ch {int(c)}" for c in channels], fontsize=7)
    k = patch.shape[1]
    ax.set_xticks([w / 4, 3 * w / 4], [f"{k} strongest patches", "their projections"], fontsize=8)
    ax.xaxis.tick_top()
    bar = fig.add_axes(((label_px + w + 10) / dpi / width, 20 / dpi / height, (bar_px - 20) / dpi / width,
                        h / dpi / height), sharey=None)
    sel = np.nan_to_num(np.asarray(selectivity, np.float64))
    bar.barh(np.arange(len(channels)), sel, height=0.7, color="#4c72b0")
    bar.set_ylim(len(channels) - 0.5, -0.5)
    bar.set_xlim(0, 1)
    bar.set_yticks([])
    bar.tick_params(labelsize=6)
    bar.set_title("class selectivity", fontsize=7)
    for i, (v, cl) in enumerate(zip(sel, top_class)):
        name = classes[int(cl)] if 0 <= int(cl) < len(classes) else "?"
        bar.text(min(v, 1.0) + 0.02 if v < 0.6 else 0.02, i, _label(f"{name} {v:.2f}"), va="center", fontsize=6,
                 color="black" if v < 0.6 else "white")
    fig.suptitle(f"{title}{chr(10) if title else ''}{block}: what each channel responds to (dataset examples)",
                 fontsize=9, y=1 - 4 / dpi / height, va="top")
    return fig
