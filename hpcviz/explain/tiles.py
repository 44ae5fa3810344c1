"""Tiles as pixels: projections, reconstructions and input patches scaled for display one tile at a time
(`tile_rgb`, `tiles_rgb`), and the Zeiler & Fergus grid of a block's dataset examples (`montage`), which the
projection parts store beside their arrays and the report draws."""
from __future__ import annotations

import numpy as np

__all__ = ["tile_rgb", "tiles_rgb", "montage"]


def tile_rgb(image: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W, 3) for imshow: uint8 as is, anything else min-max scaled to [0, 1] over its finite
    values (NaN and -inf show black, +inf white); an image without two different finite values shows grey."""
    return tiles_rgb(np.asarray(image)[None])[0]


def tiles_rgb(tiles: np.ndarray) -> np.ndarray:
    """tile_rgb of every tile of (n, 3, H, W) at once -> (n, H, W, 3), each scaled over its own values."""
    tile = np.moveaxis(tiles, 1, -1)
    if tile.dtype == np.uint8:
        return tile
    tile = tile.astype(np.float32)
    finite = np.isfinite(tile)
    axes = tuple(range(1, tile.ndim))
    lo = np.where(finite, tile, np.inf).min(axis=axes, initial=np.inf)  # (n,)
    hi = np.where(finite, tile, -np.inf).max(axis=axes, initial=-np.inf)
    lo[~np.isfinite(lo)], hi[~np.isfinite(hi)] = 0.0, 0.0  # no finite value
    span = (hi.astype(np.float64) - lo).astype(np.float32)  # rounded once, as a scalar's would be
    shape = (-1,) + (1,) * (tile.ndim - 1)
    flat = span <= 0
    scaled = (tile - lo.reshape(shape)) / np.where(flat, 1, span).reshape(shape)
    scaled[flat] = 0.5
    return np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)


def _to_uint8(tiles: np.ndarray) -> np.ndarray:
    """(n, 3, P, Q) -> (n, P, Q, 3) uint8: uint8 as is, anything else min-max scaled per tile (a projection's
    scale is arbitrary); an all-zero tile stays black."""
    if tiles.dtype == np.uint8:
        return np.moveaxis(tiles, 1, -1)
    return np.round(255 * tiles_rgb(tiles)).astype(np.uint8)


def montage(patch: np.ndarray, deconv: np.ndarray, cell: int = 24, gap: int = 2) -> np.ndarray:
    """The Zeiler & Fergus grid as pixels (H, W, 3) uint8: one row per channel, its k patches (uint8
    (C, k, 3, P, Q)) then its k projections ((C, k, 3, P, Q), each min-max scaled), every tile enlarged
    (nearest) to at least `cell` pixels, with `gap` white pixels between tiles and between the halves."""
    c, k, _, p, q = patch.shape
    s = max(1, -(-cell // max(p, q)))
    th, tw = p * s, q * s
    out = np.full((c * (th + gap) + gap, 2 * k * (tw + gap) + 3 * gap, 3), 255, np.uint8)
    for half, tiles in enumerate((patch, deconv)):
        pix = _to_uint8(np.asarray(tiles).reshape(c * k, *tiles.shape[2:])).reshape(c, k, p, q, 3)
        pix = pix.repeat(s, axis=2).repeat(s, axis=3)
        for j in range(k):
            x0 = gap + half * (k * (tw + gap) + 2 * gap) + j * (tw + gap)
            for i in range(c):
                y0 = gap + i * (th + gap)
                out[y0:y0 + th, x0:x0 + tw] = pix[i, j]
    return out
