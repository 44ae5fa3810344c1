"""Tensor stages of the images: resize, the seeded train/val split, channel statistics, normalisation and
augmentation, batched on whatever device the images are on."""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["resize_images", "split_indices", "channel_stats", "stats_from_sums", "norm_tensors", "normalize",
           "augment"]


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), antialiased bilinear; no-op if already that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    step = max(1, 2 ** 22 // (images.shape[1:].numel() + 3 * size * size))  # chunk: bounded float32 temporaries
    for lo in range(0, images.shape[0], step):
        x = images[lo:lo + step].float()  # (b, 3, H, W)
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[lo:lo + step] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic (train, val) split: sorted int64 index tensors, disjoint, covering all.

    Each class contributes round(n_c * val_fraction) images to val (at least one stays in train).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"split_indices: val_fraction={val_fraction} must be in [0, 1); hint: e.g. 0.1")
    y = labels.cpu().numpy()
    rng = np.random.Generator(np.random.PCG64(seed))
    val = []
    for c in np.unique(y):  # sorted classes, so the draw order is fixed
        idx = np.flatnonzero(y == c)
        n_val = min(int(idx.size * val_fraction + 0.5), idx.size - 1)
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_mask = np.ones(y.shape[0], bool)
    train_mask[val_idx] = False
    return torch.from_numpy(np.flatnonzero(train_mask).astype(np.int64)), torch.from_numpy(val_idx.astype(np.int64))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std on the [0, 1] scale of uint8 (N, 3, H, W) images.

    Sums are exact int64 (no float rounding, order-independent), accumulated in chunks of ~4M values.
    """
    if images.numel() == 0:
        raise InputError(f"channel_stats: got no pixels, shape {tuple(images.shape)}; hint: check the split")
    total, total_sq = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    step = max(1, 2 ** 22 // images.shape[1:].numel())
    for lo in range(0, images.shape[0], step):
        x = images[lo:lo + step].to(torch.int64)  # (b, 3, H, W)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += (x * x).sum(dim=(0, 2, 3)).cpu()
    return stats_from_sums(total, total_sq, images.shape[0] * images.shape[2] * images.shape[3])


def stats_from_sums(total: torch.Tensor, total_sq: torch.Tensor,
                    count: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) on the [0, 1] scale from exact int64 per-channel sums of pixels and their squares
    over `count` pixels per channel (shared by channel_stats and one-pass streaming statistics)."""
    mean = total.double() / count
    std = (total_sq.double() / count - mean * mean).clamp_(min=0).sqrt()
    m, s = (mean / 255).tolist(), (std / 255).tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def norm_tensors(mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1) float32 tensors on `device`: build them once, not every step
    (each build is a host-to-device copy)."""
    ms = torch.tensor([list(mean), list(std)], dtype=torch.float32).view(2, 1, -1, 1, 1)
    if torch.device(device).type == "cuda":
        ms = ms.pin_memory().to(device, non_blocking=True)  # no wait, even once per epoch
    else:
        ms = ms.to(device)
    return ms[0], ms[1]


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float32 (B, 3, H, W) on that device: (x/255 - mean)/std.
    mean/std: sequences, or the tensors of `norm_tensors` (no host-device copy then)."""
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        m, s = mean, std
    else:
        m, s = norm_tensors(cast(Sequence[float], mean), cast(Sequence[float], std), images.device)
    return (images.float() / 255 - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero-padding by `pad` + random horizontal flip, batched on the images' device.

    Offsets are drawn from the CPU `generator` in a fixed order (row offsets, column offsets,
    then flips if `flip`), so the same seed gives bit-identical results on CPU and GPU.
    """
    if generator.device.type != "cpu":
        raise InputError(f"augment: generator is on {generator.device}, expected a CPU torch.Generator; "
                         "hint: torch.Generator().manual_seed(seed)")
    b, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)  # (B,) top row of the crop in padded frame
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.randint(0, 2, (b,), generator=generator).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # reading columns backwards = mirrored crop
    if images.device.type == "cuda":  # pinned + non_blocking: the step does not wait for the copy
        both = torch.cat([rows, cols], 1).pin_memory().to(images.device, non_blocking=True)  # (B, H + W)
        rows, cols = both[:, :h], both[:, h:]
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H+2p, W+2p), zeros
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)
