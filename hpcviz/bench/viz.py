"""Benchmarks: each reports a ratio against a baseline measured in the same run.

train: the project's training step (data resident on the device as uint8, batched
augmentation, channels_last, bf16 autocast on GPU) vs a plain eager fp32 loop in the
style of torchvision's references (a DataLoader over the same images with per-sample
transforms, the same model, batch and optimizer), then time-to-accuracy on a split.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from .. import dist, store
from ..config import ConfigError, TrainConfig, VizConfig
from ..data.sources import make_builtin
from ..data.transforms import channel_stats, normalize
from ..explain.activations import block_modules, dump_activations
from ..explain.deconv import PATHS, Deconvnet
from ..explain.inversion import InversionConfig, invert
from ..models import block_names, build_model
from ..rundir import RunDir
from ..train import checkpoint
from ..train.loop import Split, make_optimizer, prepare_data, train, train_steps
from ..viz.plan import make_plan, resolve_invert_blocks
from ..viz.task import run_shard, visualize_shard
from .featviz import H200_PEAK_TFLOPS, row_costs


class _UInt8Images(Dataset):
    """Per-sample random crop (pad 4) + flip + normalise, as torchvision's references do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        import torchvision.transforms.v2 as T
        self.images, self.labels = images, labels
        self.tf = T.Compose([T.RandomCrop(images.shape[-1], padding=4), T.RandomHorizontalFlip(),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tf(self.images[i]), self.labels[i]


def _subset(split: Split, n: int) -> Split:
    return dataclasses.replace(split, train=split.train.subset(n))


def time_project_steps(cfg: TrainConfig, split: Split, steps: int, warmup: int = 3) -> float:
    """Images/s of the project's own training step (train_steps: `warmup` steps, then `steps` timed)."""
    torch.manual_seed(cfg.seed)
    c = dataclasses.replace(cfg, epochs=1)
    session = train_steps(c, _subset(split, warmup * cfg.batch_size), warmup)
    _sync(split.device)
    t0 = time.perf_counter()
    train_steps(c, _subset(split, steps * cfg.batch_size), steps, session)
    _sync(split.device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def time_plain_loop(cfg: TrainConfig, split: Split, steps: int, warmup: int = 3, workers: int = 2) -> float:
    """Images/s of a plain eager fp32 loop: DataLoader + per-sample transforms, NCHW, no autocast."""
    device = split.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, len(split.classes), cfg.stem).to(device)
    opt = make_optimizer(model, cfg)
    n = (steps + warmup) * cfg.batch_size
    images, labels = next(split.train.batches([torch.arange(n, device=split.train.index_device)]))
    ds = _UInt8Images(images.cpu().clone(), labels.cpu().clone(), split.mean, split.std)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    it = iter(loader)
    t0 = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_throughput(cfg: TrainConfig, steps: int, workers: int) -> dict[str, Any]:
    """The project's step vs two baselines on the same device: a plain DataLoader loop (torchvision's
    references) and, like with like where the DataLoader cannot keep a GPU busy, the same resident data and
    augmentation in eager fp32 NCHW (no channels_last, no bf16). The headline ratio is against the DataLoader
    loop on a CPU and against the eager resident loop on a GPU."""
    device = dist.pick_device(cfg.device)
    split = prepare_data(cfg, device)
    steps = min(steps, split.train.n // cfg.batch_size - 3)  # 3 warm-up steps; never past the data
    if steps < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size}: too large for {split.train.n} training images; "
                         "hint: a smaller --batch-size")
    ours = time_project_steps(cfg, split, steps)
    plain = time_plain_loop(cfg, split, steps, workers=workers)
    eager = time_project_steps(dataclasses.replace(cfg, channels_last=False, amp="off", compile=False), split, steps)
    base = eager if device.type == "cuda" else plain
    return {"arch": cfg.arch, "stem": cfg.resolved_stem(), "device": str(device), "batch_size": cfg.batch_size,
            "steps": steps, "placement": split.placement, "project_images_per_s": ours,
            "plain_images_per_s": plain, "eager_resident_images_per_s": eager,
            "baseline": "eager resident fp32" if device.type == "cuda" else "DataLoader loop",
            "ratio": ours / base, "ratio_vs_dataloader": ours / plain,
            "threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def time_to_accuracy(cfg: TrainConfig, target: float) -> dict[str, Any]:
    """Train cfg (its own schedule) and report the first epoch whose val accuracy reaches `target`."""
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    metrics = RunDir(cfg.run_dir).read_metrics()
    hit = next((m for m in metrics if m["val_acc"] >= target), None)
    train_s = sum(m["epoch_s"] for m in metrics[: hit["epoch"]]) if hit else None
    start = metrics[0]["time"] - metrics[0]["epoch_s"]  # wall clock when the first epoch began
    return {"target": target, "reached": hit is not None, "epoch": hit["epoch"] if hit else None,
            "train_minutes_to_target": train_s / 60 if train_s else None,
            "wall_minutes_to_target": (hit["time"] - start) / 60 if hit else None, "wall_minutes_total": wall / 60,
            "best_val_acc": max(m["val_acc"] for m in metrics), "final_val_acc": result.get("val_accuracy"),
            "epochs": cfg.epochs, "arch": cfg.arch, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "device": cfg.device, "data": cfg.data, "run_dir": cfg.run_dir}


def sample_activations(arch: str, stem: str, image_size: int, batch: int, seed: int = 0,
                       device: str = "cpu") -> dict[str, Any]:
    """Real activations (fp16 numpy, (b, C, h, w) per block) of a fresh model on builtin images."""
    torch.manual_seed(seed)
    ds = make_builtin(max(1, -(-batch // 10)), image_size, seed)
    images = ds.images[:batch]
    mean, std = channel_stats(images)
    dev = dist.pick_device(device)
    model = build_model(arch, 10, stem).eval().to(dev)
    _, acts = dump_activations(model, normalize(images.to(dev), mean, std))
    return {name: a.half().cpu().numpy() for name, a in acts.items()}


def bench_viz_stage(data: str, images: int, run_dir: Path, arch: str = "resnet18",
                    stem: str = "cifar", project_to: int = 10000) -> dict[str, Any]:
    """Images/s of one whole array task as the array runs it (its defaults: every block dumped, deconv of every
    block x 3 paths, the default inversion, its numerics and batch sizes) on a ResNet trained for one epoch on
    `data` (so the activations are not those of noise); and the time `project_to` images would take on one
    such device at that rate (a projection from the measured task, said as such)."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(data=data, arch=arch, stem=stem, epochs=1, batch_size=512, lr=0.2, run_dir=str(run_dir))
    trained = train(cfg)
    vcfg = VizConfig(run_dir=str(run_dir), images=images, tasks=1)
    plan = make_plan(vcfg)
    RunDir(run_dir).write_plan(plan)
    t0 = time.perf_counter()
    run_shard(str(run_dir), 0)
    seconds = time.perf_counter() - t0
    return {"arch": arch, "stem": stem, "images": plan.n_images, "seconds": seconds,
            "images_per_s": plan.n_images / seconds, "val_accuracy_after_1_epoch": trained["val_accuracy"],
            "projected_images": project_to, "projected_s": project_to * seconds / plan.n_images,
            "invert_blocks": plan.invert_blocks, "deconv_blocks": len(plan.deconv_blocks), "paths": plan.paths}


def project_viz_gpu(arch: str = "resnet18", size: int = 32, images: int = 10000, steps: int = 0,
                    efficiency: float = 0.4) -> dict[str, Any]:
    """A projection (not a measurement) of `images` images through one array task's default work on one H200,
    per stem: every block dumped (one forward) and reconstructed by the deconvnet through 3 paths (FLOPs
    counted on one image, run exactly: fp32), and the default inversion with every row running all `steps`
    (0: the inversion's limit; each step one forward to the block and one backward to the input, counted on
    the meta device; bf16 as on GPUs) - an upper bound, rows stop early at their target. The time is FLOPs at
    `efficiency` of each precision's dense peak."""
    steps = steps or InversionConfig().steps
    out: dict[str, Any] = {"arch": arch, "image_size": size, "images": images, "steps": steps,
                           "efficiency": efficiency, "stems": {}}
    for stem in ("cifar", "imagenet"):
        model = build_model(arch, 10, stem).eval()
        x = torch.zeros(1, 3, size, size)
        with FlopCounterMode(display=False) as fc:
            Deconvnet(model).reconstruct_all(x, block_names(model), ["residual", "shortcut", "both"])
            with torch.no_grad():
                model(x)
        exact = float(fc.get_total_flops())
        costs = row_costs(arch, size, stem)
        inv = sum(costs[b]["flops"] for b in resolve_invert_blocks(model, ["default"])) * steps
        fp32, bf16 = (H200_PEAK_TFLOPS[p] * 1e12 * efficiency for p in ("fp32", "bf16"))
        out["stems"][stem] = {"exact_gflop_per_image": exact / 1e9, "inversion_gflop_per_image": inv / 1e9,
                              "minutes": images * (exact / fp32 + inv / bf16) / 60}
    return out


def block_bytes(arch: str, stem: str, image_size: int) -> dict[str, int]:
    """Bytes one image takes per block in a shard (float16 activations)."""
    model = build_model(arch, 10, stem).eval()
    _, acts = dump_activations(model, torch.zeros(1, 3, image_size, image_size))
    return {name: a[0].numel() * 2 for name, a in acts.items()}


class _DeconvReLUFn(torch.autograd.Function):
    """ReLU whose backward is ReLU of the gradient: the deconvnet rule, as Captum's Deconvolution does it."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _DeconvReLU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeconvReLUFn.apply(x)


def _path_forward(block: Any, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A residual block's forward in which `path` decides which branch the backward signal may take."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
        if hasattr(block, "conv3"):  # Bottleneck
            out = block.bn3(block.conv3(block.relu(out)))
        if path == "residual":
            identity = identity.detach()
        elif path == "shortcut":
            out = out.detach()
        return block.relu(out + identity)
    return forward


def captum_style_deconv(model: torch.nn.Module, x: torch.Tensor, block: str, path: str,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Baseline: one full forward + backward per (block, path), ReLU backward replaced by ReLU-of-gradient;
    seeded with the block's activation (times `mask`, when given: e.g. one position of one channel)."""
    import copy

    m = copy.deepcopy(model).eval()
    m.relu = _DeconvReLU()
    for name in block_modules(m):
        if name != "conv1":
            blk = m.get_submodule(name)
            blk.relu = _DeconvReLU()
            blk.forward = _path_forward(blk, path)
    box: dict[str, torch.Tensor] = {}
    handle = block_modules(m)[block].register_forward_hook(lambda _m, _i, out: box.__setitem__("a", out))
    try:
        xx = x.detach().clone().requires_grad_(True)
        m(xx)  # the full network, as Captum runs it
        seed = box["a"].detach() if mask is None else box["a"].detach() * mask
        (grad,) = torch.autograd.grad(box["a"], xx, grad_outputs=seed)
    finally:
        handle.remove()
    return grad


def bench_deconv(arch: str, stem: str, batch: int, image_size: int, device: str, repeats: int = 3) -> dict[str, Any]:
    """ms/image of every block x 3 paths: Deconvnet.reconstruct_all vs the Captum-style baseline."""
    import statistics

    dev = dist.pick_device(device)
    torch.manual_seed(0)
    model = build_model(arch, 10, stem).eval().to(dev)
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    blocks = block_names(model)

    def ours() -> dict:
        return Deconvnet(model).reconstruct_all(x, blocks, PATHS)

    def baseline() -> dict:
        return {(b, p): captum_style_deconv(model, x, b, p) for b in blocks for p in PATHS}
    times = {}
    for name, fn in (("ours", ours), ("baseline", baseline)):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            out = fn()
            _sync(dev)
            runs.append(time.perf_counter() - t0)
        times[name] = (statistics.median(runs), out)
    a, b = times["ours"][1], times["baseline"][1]
    worst = max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b if k in a)
    return {"arch": arch, "stem": stem or "default", "device": str(dev), "batch": batch, "image_size": image_size,
            "reconstructions": len(blocks) * len(PATHS), "ours_ms_per_image": 1e3 * times["ours"][0] / batch,
            "baseline_ms_per_image": 1e3 * times["baseline"][0] / batch,
            "speedup": times["baseline"][0] / times["ours"][0], "max_rel_diff_vs_baseline": worst}


def bench_invert(model: torch.nn.Module, images: torch.Tensor, mean, std, blocks: list[str],
                 steps: int | None = None, one_at_a_time: int = 2) -> dict[str, Any]:
    """Images/s of `invert` on a batch vs the same objective one image at a time (on `one_at_a_time`
    images, extrapolated), and the median relative feature error per block (defaults unless `steps`)."""
    cfg = InversionConfig() if steps is None else InversionConfig(steps=steps)
    t0 = time.perf_counter()
    out = invert(model, images=images, blocks=blocks, cfg=cfg, mean=mean, std=std)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [invert(model, images=images[i:i + 1], blocks=blocks, cfg=cfg, mean=mean, std=std)
               for i in range(min(one_at_a_time, len(images)))]
    single_s = (time.perf_counter() - t0) / len(singles)
    same = max(float((s[b]["x"][0] - out[b]["x"][i]).abs().max()) for i, s in enumerate(singles) for b in blocks)
    return {"images": len(images), "blocks": blocks, "steps": cfg.steps,
            "batched_images_per_s": len(images) / batched_s, "one_at_a_time_images_per_s": 1.0 / single_s,
            "ratio": single_s * len(images) / batched_s, "max_abs_diff_batched_vs_single": same,
            "median_error": {b: float(out[b]["error"].median()) for b in blocks},
            "max_error": {b: float(out[b]["error"].max()) for b in blocks}}


def bench_homotopy(model: torch.nn.Module, images: torch.Tensor, mean, std, blocks: list[str]) -> dict[str, Any]:
    """The default inversion against the same without its homotopy (soft ReLU and soft max-pool off), on the
    same images: seconds, and per block the median and 90th percentile relative error and the mean steps."""
    out: dict[str, Any] = {"images": len(images), "blocks": blocks}
    for name, cfg in (("without", InversionConfig(soft_relu=0.0, soft_pool=0.0)), ("default", InversionConfig())):
        t0 = time.perf_counter()
        r = invert(model, images=images, blocks=blocks, cfg=cfg, mean=mean, std=std)
        out[name] = {"seconds": time.perf_counter() - t0, "blocks": {
            b: {"median": float(v["error"].median()), "p90": float(v["error"].quantile(0.9)),
                "mean_steps": float(v["steps"].float().mean())} for b, v in r.items()}}
    return out


def bench_viz(run_dir: Path, scratch: Path, images: int = 16, split: str = "val", device: str = "auto",
              batch_size: int = 64, baseline_steps: int = 1000) -> dict[str, Any]:
    """The whole array task per image on held-out images of a trained run: today's way (the baseline: every
    image loaded with the whole split, 1000 Adam steps per inversion, no stopping) and the default, in this
    run, on the same images and device; seconds per image for the task and each part, and the median
    inversion error and mean steps per block. Both write their shard into `scratch`, never into the run."""
    import shutil

    state = checkpoint.load_checkpoint(RunDir(run_dir).checkpoints)
    dev = dist.pick_device(device)
    dist.share_cores()
    out: dict[str, Any] = {"run": str(run_dir), "images": images, "split": split, "device": str(dev),
                           "arch": state["config"]["arch"]}
    for method in ("baseline", "default"):
        run = RunDir(scratch / method)
        shutil.rmtree(run.path, ignore_errors=True)
        run.checkpoints.mkdir(parents=True)
        for name in ("last.pt", "last.pt.sha256"):
            shutil.copy(Path(state["path"]).with_name(name), run.checkpoints / name)
        cfg = VizConfig(run_dir=str(run.path), split=split, images=images, tasks=1, batch_size=batch_size,
                        device=device)
        if method == "baseline":
            cfg.invert_steps, cfg.invert_target, cfg.invert_solver = baseline_steps, 0.0, "adam"
        plan = make_plan(cfg)
        run.write_plan(plan)
        with dist.numerics(exact=True):
            seconds = visualize_shard(run, 0, plan, checkpoint.load_checkpoint(run.checkpoints), dev,
                                          baseline=method == "baseline")
        data = store.read_shard(run.shard(0), [f"invert_{k}/{b}" for b in plan.invert_blocks
                                               for k in ("error", "steps")])
        n = plan.n_images
        out[method] = {"seconds_per_image": {k: v / n for k, v in seconds.items()},
                       "median_error": {b: float(np.median(data[f"invert_error/{b}"])) for b in plan.invert_blocks},
                       "mean_steps": {b: float(np.mean(data[f"invert_steps/{b}"])) for b in plan.invert_blocks}}
    base, new = out["baseline"]["seconds_per_image"], out["default"]["seconds_per_image"]
    out["ratio"] = base["total"] / new["total"]
    out["inversion_ratio"] = base["inversion"] / max(new["inversion"], 1e-9)
    return out
