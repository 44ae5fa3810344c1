"""Exact evaluation under DDP: every image counted once, on any number of ranks.

Each rank takes a strided share of the images (no padding, unlike
DistributedSampler), then the loss sum, the counts and the confusion matrix
are summed over ranks, so the result equals a single-process evaluation.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..config import EvalConfig, LaunchConfig, config_to_dict, default_stem
from ..data import memory
from ..data.placement import Feed, feed_tensors
from ..data.sources import check_source, load_images, peek
from ..data.transforms import norm_tensors, normalize
from ..errors import InputError
from ..models import from_checkpoint
from ..rundir import RunDir
from . import checkpoint


def native_bf16(device: torch.device) -> bool:
    """The GPU computes bf16 in hardware (Ampere and newer). torch.cuda.is_bf16_supported() also counts the
    emulation of V100/T4 by default, which is slower than fp32 there."""
    if device.type != "cuda":
        return False
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA when amp is bf16, or auto on a GPU with native bf16; plain fp32 elsewhere."""
    if device.type == "cuda" and (amp == "bf16" or (amp == "auto" and native_bf16(device))):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, feed: Feed, mean: Sequence[float], std: Sequence[float], num_classes: int,
             batch_size: int = 1024, amp: str = "auto", channels_last: bool = False) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix of `model` on a split's images (a placement.Feed), summed over ranks.

    `model` must be the plain module (not the DDP wrapper): ranks may run a different
    number of batches, and DDP's forward would wait for the others.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    share = torch.arange(dist.rank(), feed.n, dist.world_size(), device=feed.index_device)
    m, s = norm_tensors(mean, std, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # (true, pred)
    for images, y in feed.batches([share[lo:lo + batch_size] for lo in range(0, len(share), batch_size)]):
        x = normalize(images, m, s)  # (B, 3, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(x)  # (B, K)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion.view(-1).index_add_(0, y * num_classes + logits.argmax(1),
                                      torch.ones_like(y))
    dist.all_reduce_sum(loss_sum)
    dist.all_reduce_sum(confusion)
    model.train(was_training)
    n = int(confusion.sum())
    correct = int(confusion.diag().sum())
    return {"n": n, "loss": float(loss_sum) / max(n, 1), "accuracy": correct / max(n, 1),
            "confusion": confusion.cpu()}


def summarize(result: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """JSON-ready summary: overall and per-class accuracy, the confusion matrix (rows = true class)."""
    confusion = result["confusion"]
    per_class_n = confusion.sum(1)
    per_class = {c: (float(confusion[i, i]) / float(per_class_n[i]) if per_class_n[i] else None)
                 for i, c in enumerate(classes)}
    return {"n": result["n"], "loss": result["loss"], "accuracy": result["accuracy"],
            "per_class_accuracy": per_class, "per_class_n": per_class_n.tolist(),
            "classes": list(classes), "confusion": confusion.tolist()}


def remap_labels(labels: torch.Tensor, source_classes: Sequence[str], model_classes: Sequence[str]) -> torch.Tensor:
    """Labels of a data source expressed in the model's class indices, matched by class name."""
    unknown = [c for c in source_classes if c not in model_classes]
    if unknown:
        raise InputError(f"--data has classes the model does not know: {', '.join(unknown[:5])}; the model's "
                         f"classes: {', '.join(model_classes)}; hint: evaluate on a source with the same class names")
    table = torch.tensor([list(model_classes).index(c) for c in source_classes], dtype=torch.int64)
    return table[labels]


def evaluate_run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run's checkpoint on any data source; writes eval-<name>.json beside eval.json."""
    run = RunDir(cfg.run_dir)
    state = checkpoint.load_checkpoint(run.checkpoints)
    dev = dist.pick_device(cfg.device)
    model = from_checkpoint(state, dev)
    tcfg = state["config"]
    ds = load_images(cfg.data, tcfg["image_size"], skip_bad=tcfg.get("skip_bad", False))
    labels = remap_labels(ds.labels, ds.classes, state["classes"])
    result = summarize(evaluate(model, feed_tensors(ds.images, labels, dev), state["mean"], state["std"],
                                len(state["classes"]), cfg.batch_size, tcfg.get("amp", "auto")), state["classes"])
    result.update(split=cfg.name, data=cfg.data, checkpoint=run.rel(state["path"]), checkpoint_sha256=state["sha256"],
                  config=config_to_dict(cfg))
    run.write_eval(result, cfg.name)
    return result


def check_request(cfg: EvalConfig, launch: LaunchConfig, run: RunDir) -> None:
    """Before anything runs: --data exists and reads, and the source decoded whole at the run's image size, and its
    batches on a CPU, fit in the memory there is."""
    check_source(cfg.data)
    train = run.read_config().get("train") or {}
    if not {"arch", "image_size"} <= set(train):
        return
    on_cpu = cfg.device == "cpu" or not (launch.gpus if launch.gpus is not None else torch.cuda.is_available())
    facts = peek(cfg.data, train["image_size"])
    classes = len(facts.classes) if facts.classes else 10
    need = memory.eval_need(cfg.data, facts, train["image_size"], train["arch"],
                            train.get("stem") or default_stem(train["arch"]),
                            classes, cfg.batch_size, on_cpu)
    memory.check(f"--data {cfg.data} at the run's image size {train['image_size']}", need, memory.host_limit(launch),
                 "a smaller --batch-size, or evaluate a part of the data")
