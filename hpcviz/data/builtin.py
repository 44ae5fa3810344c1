"""The built-in data set: ten procedural classes of shapes and textures, drawn at any size, byte-identical for a
seed on every machine (no download, no file).

Classes (BUILTIN_CLASSES): circle, square, triangle, cross, ring (shapes of random centre, radius 0.14-0.36 of
the image, tilt up to +-31 deg); h_stripes, v_stripes, checker, dots (textures of random period, phase and tilt
filling a random box covering 20-100 % of the image); gradient (a linear ramp in a random direction). Colours of
shape and background are random with >= 32 levels of difference per channel; uniform integer noise of random
amplitude 0-64 is added. Labels are shuffled, classes exactly balanced. Only integer draws, + - * / and sqrt are
used, so the bytes are identical for the same seed on every machine.
"""
from __future__ import annotations

import numpy as np

BUILTIN_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                   "h_stripes", "v_stripes", "checker", "dots", "gradient")


def _builtin_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-image random parameters, (n,) each; unit image coordinates, x right, y down."""
    def uni(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * rng.random(n)
    q = {"r": uni(0.14, 0.36)}
    q["cx"], q["cy"] = q["r"] + (1 - 2 * q["r"]) * rng.random(n), q["r"] + (1 - 2 * q["r"]) * rng.random(n)
    tilt = uni(-0.6, 0.6)  # rotation as a (cos, sin) pair built with sqrt only: no libm, same bytes everywhere
    q["c"], q["s"] = 1 / np.sqrt(1 + tilt * tilt), tilt / np.sqrt(1 + tilt * tilt)
    ga, gb = uni(-1, 1), uni(-1, 1)
    gnorm = np.maximum(np.sqrt(ga * ga + gb * gb), 0.1)
    q["ga"], q["gb"] = ga / gnorm, gb / gnorm
    q["p"], q["phase"] = uni(0.12, 0.28), rng.random(n)
    q["w"], q["h"] = uni(0.45, 1.0), uni(0.45, 1.0)
    q["x0"], q["y0"] = (1 - q["w"]) * rng.random(n), (1 - q["h"]) * rng.random(n)
    q["bg"] = rng.integers(0, 256, (n, 3)).astype(np.float64)
    q["fg"] = (q["bg"] + rng.integers(32, 225, (n, 3))) % 256  # every channel differs by >= 32 levels
    q["noise"] = rng.integers(0, 65, n)
    return q


def _builtin_mask(name: str, x: np.ndarray, y: np.ndarray, q: dict[str, np.ndarray]) -> np.ndarray:
    """Foreground weight in [0, 1], (k, S, S), for k images of one class; q values are (k, 1, 1)."""
    dx, dy, r, c, s = x - q["cx"], y - q["cy"], q["r"], q["c"], q["s"]
    u, v = c * dx + s * dy, c * dy - s * dx  # shape frame: rotated about the centre
    rx, ry = x - q["x0"], y - q["y0"]
    tu, tv = (c * rx + s * ry) / q["p"] + q["phase"], (c * ry - s * rx) / q["p"] + q["phase"]
    region = (rx >= 0) & (rx <= q["w"]) & (ry >= 0) & (ry <= q["h"])  # textures fill a random box
    if name == "circle":
        m = dx * dx + dy * dy <= r * r
    elif name == "square":
        m = (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    elif name == "triangle":  # apex up, base at v = r/2
        m = (v <= 0.5 * r) & (np.abs(u) <= 0.577 * (v + r))
    elif name == "cross":
        m = ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    elif name == "ring":
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 >= 0.36 * r * r)
    elif name == "h_stripes":
        m = region & (np.floor(tv) % 2 == 0)
    elif name == "v_stripes":
        m = region & (np.floor(tu) % 2 == 0)
    elif name == "checker":
        m = region & ((np.floor(tu) + np.floor(tv)) % 2 == 0)
    elif name == "dots":
        du, dv = tu % 1 - 0.5, tv % 1 - 0.5
        m = region & (du * du + dv * dv <= 0.09)
    else:  # gradient: a smooth ramp from bg to fg along a random direction, no edges at all
        return np.clip((x - 0.5) * q["ga"] + (y - 0.5) * q["gb"] + 0.5, 0.0, 1.0)
    return m.astype(np.float64)


def _builtin_labels(rng: np.random.Generator, n_per_class: int) -> np.ndarray:
    """The builtin set's labels: its generator's first draw (so source_labels needs no image)."""
    return rng.permutation(np.repeat(np.arange(len(BUILTIN_CLASSES)), n_per_class))


def labels(n_per_class: int, seed: int) -> np.ndarray:
    """The set's labels (N,), without drawing an image: its generator's first draw."""
    return _builtin_labels(np.random.Generator(np.random.PCG64(seed)), n_per_class)


def draw(n_per_class: int, size: int, seed: int,
         rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, S, S) uint8, labels (N,)) of the set, N = 10 * n_per_class; with `rows` (indices into the
    set) only those images, in that order, byte-identical to the whole set's: the generator still makes every
    draw up to the last chunk holding one of them (the noise is drawn chunk by chunk, in a fixed order), but
    the shapes, most of the work, are drawn for those rows only."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = n_per_class * len(BUILTIN_CLASSES)
    label_of = _builtin_labels(rng, n_per_class)  # (N,)
    q = _builtin_params(rng, n)
    wanted = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if wanted.size and not 0 <= wanted.min() <= wanted.max() < n:
        raise IndexError(f"rows {wanted.min()}..{wanted.max()}: the built-in set has rows 0..{n - 1}")
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, S), (1, S, 1)
    images = np.empty((len(wanted), 3, size, size), np.uint8)
    chunk = max(1, 2 ** 20 // (size * size))  # bounds the float64 temporaries to ~100 MB at any size
    end = int(wanted.max()) + 1 if wanted.size else 0
    for lo in range(0, end, chunk):
        hi = min(n, lo + chunk)
        amp = q["noise"][lo:hi, None, None, None]
        noise = rng.integers(-amp, amp + 1, (hi - lo, size, size, 3))  # (k, S, S, 3): every row, in order
        out = np.flatnonzero((wanted >= lo) & (wanted < hi))  # positions in the result drawn from this chunk
        if out.size:
            images[out] = _draw_rows(wanted[out], label_of, q, noise[wanted[out] - lo], x, y)
    return images, label_of


def _draw_rows(rows: np.ndarray, label_of: np.ndarray, q: dict[str, np.ndarray], noise: np.ndarray,
               x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The images (k, 3, S, S) uint8 of `rows`, given their noise (k, S, S, 3)."""
    mask = np.empty(noise.shape[:3])  # (k, S, S)
    for label, name in enumerate(BUILTIN_CLASSES):
        sel = np.flatnonzero(label_of[rows] == label)
        if sel.size:
            mask[sel] = _builtin_mask(name, x, y, {k: v[rows[sel], None, None] for k, v in q.items() if v.ndim == 1})
    bg, fg = q["bg"][rows, None, None, :], q["fg"][rows, None, None, :]  # (k, 1, 1, 3)
    pixels = np.rint(bg + (fg - bg) * mask[..., None]) + noise
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)
