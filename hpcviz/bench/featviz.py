"""`benchmark.py featviz`: feature visualization, ours against Lucent's `render_vis`, side by side.

On the same trained network and the same channels (`per_block` channels of every block, evenly spaced):
  - ours: `featviz.visualize` of all those channels at once (one batched optimisation, rows stopping on
    their own), timed as a whole and divided by the channels;
  - the baseline, one channel per call: Lucent's `render_vis` when `lucent` imports (torch-lucent, not a
    dependency of hpcviz), with its defaults: 512 Adam steps at lr 0.05, the FFT parameterisation with colour
    decorrelation, its standard transforms (pad 12, jitter 8, scale 0.9..1.1, rotate +-10 degrees, jitter 4, in
    pixels); else our own loop one channel at a time with Lucent's optimiser settings (512 steps at lr 0.05,
    constant, no early stop) - the report says which ran.
Both are measured our way: the untransformed spatial mean activation of the final image at the network's
image size (`featviz.channel_means`, a plain forward). Fairness: Lucent renders a `size`-px image (its
param.image(size)) normalised with the network's mean/std (preprocess=False; Lucent's own normalisation is
ImageNet's) and fixed_image_size=size+24, the size its padding of 12 px makes: without it Lucent upsamples
inputs below 224 px to 224, and the network would see the image at another scale than it is measured at.
Lucent runs the whole network every step (it hooks the module) with the weights' gradients on, as its users
run it; ours stops at the block. Times are ratios from the same run, on the same thread count.

`project_resnet50` turns per-row FLOPs and memory (counted on the meta device, nothing computed) into a
projection, not a measurement, of every channel of ResNet-50 at 224 px on one GPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import default_stem
from ..explain.featviz import FeatvizConfig, Rows, channel_means, row_bytes, visualize
from ..explain.forward import ForwardPlan
from ..models import block_names, build_model, from_checkpoint
from ..rundir import RunDir
from ..train.checkpoint import load_checkpoint
from ..viz.featviz_parts import rows_that_fit

__all__ = ["bench_featviz", "bench_resnet50", "lucent_render", "pick_channels", "project_resnet50"]


def load_run(run: Path) -> tuple[nn.Module, list[float], list[float], int, str]:
    """(model in eval mode on the CPU, mean, std, image size, a label) of a trained run."""
    state = load_checkpoint(RunDir(run).checkpoints)
    cfg = state["config"]
    label = f"{cfg['arch']} ({cfg.get('stem') or default_stem(cfg['arch'])} stem) trained, {run.name}"
    return from_checkpoint(state), list(state["mean"]), list(state["std"]), int(cfg.get("image_size", 32)), label


def pick_channels(model: nn.Module, size: int, per_block: int) -> dict[str, list[int]]:
    """`per_block` channels of every block, evenly spaced from 0 to the last (0: all of them)."""
    plan = ForwardPlan(model)
    with torch.no_grad():
        acts = plan.run(torch.zeros(1, 3, size, size, device=plan.device), block_names(model)[-1], lambda h, p: p(h))
    out = {}
    for b, a in acts.items():
        n = a.shape[1]
        k = n if per_block <= 0 else min(per_block, n)
        out[b] = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]
    return out


def lucent_render(model: nn.Module, block: str, channel: int, mean: Sequence[float], std: Sequence[float],
                  size: int, steps: int = 512, seed: int = 0) -> torch.Tensor:
    """Lucent's render_vis of one channel with its defaults (see the module docstring): pixels (1, 3, S, S)."""
    import kornia
    from lucent.optvis import param, render, transform
    if not hasattr(kornia, "get_rotation_matrix2d"):  # kornia >= 0.7 moved these; Lucent 0.1.8 calls the old names
        import kornia.geometry.transform as kgt
        kornia.get_rotation_matrix2d, kornia.warp_affine = kgt.get_rotation_matrix2d, kgt.warp_affine
    dev = next(model.parameters()).device  # Lucent renders on CUDA where there is one
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    layer = "relu" if block == "conv1" else block.replace(".", "_")  # the stem's output is its relu module's
    np.random.seed(seed)
    torch.manual_seed(seed)
    images = render.render_vis(model, f"{layer}:{channel}", param_f=lambda: param.image(size),
                               transforms=[*transform.standard_transforms, lambda t: (t - m) / s],
                               thresholds=(steps,), preprocess=False, progress=False, show_image=False,
                               fixed_image_size=size + 24)
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2).float()


def _have_lucent() -> bool:
    try:
        import lucent.optvis.render  # noqa: F401
    except ImportError:
        return False
    return True


def bench_featviz(model: nn.Module, mean: Sequence[float], std: Sequence[float], size: int,
                  channels: dict[str, list[int]], cfg: FeatvizConfig | None = None, baseline: str = "auto",
                  baseline_steps: int = 512, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Ours (one batched run) vs the baseline (one channel per call) on `channels`: the activation each
    reaches (measured our way) and the seconds per channel. baseline: auto (Lucent if it imports) | lucent |
    loop (ours one channel at a time with Lucent's optimiser settings)."""
    cfg = cfg or FeatvizConfig()
    kind = ("lucent" if _have_lucent() else "loop") if baseline == "auto" else baseline
    blocks = list(channels)
    n = sum(len(c) for c in channels.values())
    t0 = time.perf_counter()
    ours = visualize(model, channels, cfg, mean, std, size)
    ours_s = time.perf_counter() - t0
    log(f"ours: {n} channels in {ours_s:.1f} s")
    theirs_x, per = [], []
    loop_cfg = FeatvizConfig(steps=baseline_steps, lr=0.05, lr_end=1.0, plateau=0.0, window=0, seed=cfg.seed)
    for b in blocks:
        for c in channels[b]:
            t0 = time.perf_counter()
            if kind == "lucent":
                pix = lucent_render(model, b, c, mean, std, size, baseline_steps, cfg.seed)
                x = (pix - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            else:
                x = visualize(model, {b: [c]}, loop_cfg, mean, std, size)[b]["x"]
            per.append(time.perf_counter() - t0)
            theirs_x.append(x)
            log(f"{kind}: {b}:{c} in {per[-1]:.1f} s")
    theirs = channel_means(model, blocks, [torch.tensor(channels[b]) for b in blocks], torch.cat(theirs_x))
    mine = torch.cat([ours[b]["value"] for b in blocks])
    steps = torch.cat([ours[b]["steps"] for b in blocks]).float()
    ge = mine >= theirs
    rows, k = [], 0
    for b in blocks:
        for c in channels[b]:
            rows.append({"block": b, "channel": c, "ours": float(mine[k]), "baseline": float(theirs[k]),
                         "steps": int(steps[k])})
            k += 1
    return {"baseline": kind, "channels": n, "blocks": blocks, "threads": torch.get_num_threads(),
            "ours_s_per_channel": ours_s / n, "baseline_s_per_channel": float(np.mean(per)),
            "time_ratio": float(np.mean(per)) * n / ours_s, "ours_ge_baseline": float(ge.float().mean()),
            "median_activation_ratio": float((mine / theirs.clamp_min(1e-12)).median()),
            "mean_steps": float(steps.mean()), "max_steps": cfg.steps, "baseline_steps": baseline_steps,
            "per_channel": rows, "cfg": cfg.__dict__}


def bench_all_channels(model: nn.Module, mean: Sequence[float], std: Sequence[float], size: int,
                       cfg: FeatvizConfig | None = None) -> dict[str, Any]:
    """Every channel of every block in one call: total seconds, mean steps per block."""
    cfg = cfg or FeatvizConfig()
    t0 = time.perf_counter()
    out = visualize(model, block_names(model), cfg, mean, std, size)
    total = time.perf_counter() - t0
    n = sum(len(r["channels"]) for r in out.values())
    return {"channels": n, "seconds": total, "s_per_channel": total / n, "threads": torch.get_num_threads(),
            "mean_steps": {b: float(r["steps"].float().mean()) for b, r in out.items()},
            "mean_steps_all": float(torch.cat([r["steps"] for r in out.values()]).float().mean()),
            "median_value": {b: float(r["value"].median()) for b, r in out.items()}}


# H200 dense peaks (NVIDIA's datasheet, SXM): FP32 67, TF32 tensor cores 495, BF16 989 TFLOP/s; the
# projection assumes a fraction of them sustained by the convolutions of a large batch.
H200_PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0}


def row_costs(arch: str = "resnet50", size: int = 224, stem: str = "") -> dict[str, dict[str, float]]:
    """Per block: channels, FLOPs of one row's step (forward to the block + backward to the input) and the
    bytes autograd saves for that backward per row (`row_bytes`: the shared weights not counted), fp32 -
    counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(arch, 1000, stem).eval()
    plan = ForwardPlan(model).folded()
    kept = row_bytes(model, block_names(model), size)  # one plan for every block
    out = {}
    for b in block_names(model):
        x = torch.zeros(1, 3, size, size, device="meta", requires_grad=True)
        rows = Rows(plan, [b], [torch.zeros(1, dtype=torch.int64, device="meta")], exact=False)
        with FlopCounterMode(display=False) as fc:
            f = rows.evaluate(x, torch.zeros(1, dtype=torch.int64, device="meta"), [1])
            torch.autograd.grad(f.sum(), x)
        with torch.no_grad():
            channels = plan.stacked(torch.zeros(1, 3, size, size, device="meta"), [b], [1],
                                    lambda h, p: p(h))[0].shape[1]
        out[b] = {"channels": int(channels), "flops": float(fc.get_total_flops()),
                  "saved_bytes": float(kept[b])}
    return out


def project_resnet50(mean_steps: float, max_steps: int, efficiency: float = 0.4, memory_gb: float = 120.0,
                     size: int = 224) -> dict[str, Any]:
    """A projection (not a measurement) of every channel of ResNet-50 at `size` px on one H200: total FLOPs
    = sum over rows of their step's FLOPs x steps, at `efficiency` of each precision's dense peak; the rows
    that fit at once in `memory_gb` of activations (fp32; half in bf16)."""
    costs = row_costs("resnet50", size)
    per_step = sum(c["channels"] * c["flops"] for c in costs.values())  # all rows, one step
    rows = sum(c["channels"] for c in costs.values())
    worst = max(c["saved_bytes"] for c in costs.values())
    out: dict[str, Any] = {"channels": rows, "tflop_per_step_all_rows": per_step / 1e12,
                           "max_saved_MB_per_row_fp32": worst / 1e6,
                           "rows_at_once_fp32": int(memory_gb * 1e9 // worst), "efficiency": efficiency,
                           "mean_steps": mean_steps, "max_steps": max_steps, "minutes": {}}
    for prec, peak in H200_PEAK_TFLOPS.items():
        rate = peak * efficiency * 1e12
        out["minutes"][prec] = {"mean_steps": per_step * mean_steps / rate / 60,
                                "max_steps": per_step * max_steps / rate / 60}
    return out


def bench_resnet50(seconds: float, device: torch.device, size: int = 224, order: Sequence[str] = (
        "conv1", "layer1.0", "layer2.0", "layer3.0", "layer4.0")) -> dict[str, Any]:
    """Every channel of ResNet-50 at `size` px (untrained weights: a timing, not a picture) with featviz's
    defaults, block by block (`order` first, then the rest in forward order), each block's rows in groups as
    the array's parts size them (`rows_at_once`'s rule: half the free memory), until `seconds` are spent: a
    block that would outlast them at the rate measured so far is skipped, and the skipped blocks' time is
    extrapolated from that rate (TFLOP/s) by their FLOPs per row-step (`row_costs`) at the measured mean steps."""
    costs = row_costs("resnet50", size)
    torch.manual_seed(0)
    model = build_model("resnet50", 1000, "imagenet").eval().to(device)
    blocks = list(order) + [b for b in block_names(model) if b not in order]
    done: dict[str, dict[str, float]] = {}
    spent = tflop = 0.0
    for b in blocks:
        c = costs[b]
        if spent and c["channels"] * c["flops"] * FeatvizConfig().steps / 1e12 / (tflop / spent) > seconds - spent:
            continue
        rows = rows_that_fit(int(c["channels"]), c["saved_bytes"], device)
        _sync(device)
        t0 = time.perf_counter()
        r = visualize(model, {b: None}, FeatvizConfig(exact=False, batch=rows), image_size=size)[b]
        _sync(device)
        s = time.perf_counter() - t0
        steps = float(r["steps"].float().mean())
        done[b] = {"channels": int(c["channels"]), "seconds": s, "rows_at_once": rows, "mean_steps": steps,
                   "tflop": c["flops"] * steps * c["channels"] / 1e12}
        spent, tflop = spent + s, tflop + done[b]["tflop"]
    rate = tflop / spent
    mean_steps = sum(v["mean_steps"] * v["channels"] for v in done.values()) / sum(v["channels"] for v in done.values())
    rest = [c for b, c in costs.items() if b not in done]
    rest_s = sum(c["channels"] * c["flops"] * mean_steps for c in rest) / 1e12 / rate
    return {"device": str(device), "image_size": size, "blocks": done, "measured_s": spent,
            "measured_channels": sum(v["channels"] for v in done.values()),
            "rest_channels": int(sum(c["channels"] for c in rest)), "rest_s_extrapolated": rest_s,
            "tflop_per_s": rate, "total_min": (spent + rest_s) / 60}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
