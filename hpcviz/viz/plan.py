"""The plan of a visualization request: which images, in which shards, made how; and whether a shard on disk
is the plan's.

The launcher writes `viz/plan.json` (a typed `rundir.Plan`: the request, the checkpoint and its sha256,
each shard's image positions); every array task receives only the run directory and its shard number. A shard
belongs to the plan when its root attributes hold the plan's `SHARD_KEYS` and its /index holds the plan's
positions (`shard_problem`): the one rule that `--fresh`, skipping, collation, the report, `--status` and
`inspect_results` all use.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import store
from ..config import SPLITS, VizConfig
from ..data.sources import load_images, load_rows, source_labels
from ..data.transforms import split_indices
from ..errors import InputError
from ..explain.activations import resolve_blocks
from ..models import block_names, build_model
from ..rundir import Plan, RunDir, now
from ..train import checkpoint

__all__ = ["VizError", "balanced_sample", "plan_shards", "split_rows", "load_split", "make_plan", "resolve_request",
           "resolve_invert_blocks", "plan_arch", "shard_problem", "shard_problems",
           "usable_shards"]


class VizError(InputError):
    """A visualization request that does not fit the run."""


def balanced_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n positions, as even over classes as possible, fixed for a seed; sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picked: list[int] = []
    for round_ in range(max(len(p) for p in per_class)):
        for p in per_class:
            if round_ < len(p) and len(picked) < n:
                picked.append(int(p[round_]))
    return np.sort(np.array(picked, dtype=np.int64))


def plan_shards(indices: Sequence[int], tasks: int) -> list[list[int]]:
    """Split positions into `tasks` contiguous shards of near-equal size (none empty)."""
    tasks = max(1, min(tasks, len(indices)))
    return [list(map(int, part)) for part in np.array_split(np.asarray(indices, dtype=np.int64), tasks)]


def split_rows(train_cfg: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(the split's positions in the source (M,), their labels (M,), classes), carved exactly as training
    did, from the labels alone where the source allows (packed files, folders, builtin): no image is read."""
    if split not in SPLITS:
        raise VizError(f"--split {split!r}: not one of {', '.join(SPLITS)}; hint: --split val")
    known = source_labels(train_cfg["data"], train_cfg.get("skip_bad", False))
    if known is None:
        ds = load_images(train_cfg["data"], train_cfg["image_size"], skip_bad=train_cfg.get("skip_bad", False))
        known = ds.labels, ds.classes
    labels, classes = known
    train_idx, val_idx = split_indices(labels, train_cfg["val_fraction"], seed=train_cfg.get("split_seed", 0))
    idx = val_idx if split == "val" else train_idx
    return idx, labels[idx], classes


def load_split(train_cfg: dict[str, Any], split: str,
               positions: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(images (m, 3, S, S) uint8, labels (m,), classes) at `positions` of the run's own split (all when
    None), reading only those images where the source allows (a packed file's rows, a folder's files)."""
    idx, labels, classes = split_rows(train_cfg, split)
    pos = torch.arange(len(idx)) if positions is None else torch.as_tensor(list(positions), dtype=torch.int64)
    images = load_rows(train_cfg["data"], train_cfg["image_size"], idx[pos].tolist(),
                       skip_bad=train_cfg.get("skip_bad", False))
    return images, labels[pos], classes


def make_plan(cfg: VizConfig, gpu: bool = False) -> Plan:
    """Resolve the images and shards of a request against the run's checkpoint and data. `gpu`: the tasks run
    on GPUs (the default --per-task, default_per_task, is then larger); the plan records the size it used."""
    run = RunDir(cfg.run_dir)
    state = checkpoint.load_checkpoint(run.checkpoints)
    cfg = cfg.sized(gpu, int(state["config"]["image_size"]))
    _, labels, _ = split_rows(state["config"], cfg.split)
    if cfg.indices:
        bad = [i for i in cfg.indices if not 0 <= i < len(labels)]
        if bad:
            raise VizError(f"--indices {bad[:5]}: outside the {cfg.split} split of {len(labels)} images; "
                           f"hint: use positions 0..{len(labels) - 1}")
        indices = sorted(set(cfg.indices))
    else:
        indices = balanced_sample(labels.numpy(), min(cfg.images, len(labels)), cfg.seed).tolist()
    if not indices:
        raise VizError(f"--split {cfg.split}: the {cfg.split} split of {run} is empty; hint: --split train")
    model = build_model(state["config"]["arch"], len(state["classes"]), state["config"]["stem"])
    blocks, deconv, inv, featviz = resolve_request(model, cfg)
    return Plan(config=cfg, checkpoint=run.rel(state["path"]), checkpoint_sha256=state["sha256"],
                dataset_fingerprint=state.get("data_fingerprint", ""), split=cfg.split, blocks=blocks,
                deconv_blocks=deconv, paths=list(cfg.paths), invert_blocks=inv, invert_steps=cfg.invert_steps,
                invert_target=cfg.invert_target, invert_solver=cfg.invert_solver, prior=cfg.prior, fast=cfg.fast,
                shards=plan_shards(indices, cfg.n_tasks()), n_images=len(indices), planned=now(), topk=cfg.topk,
                exact=cfg.exact, featviz_blocks=featviz, featviz_steps=cfg.featviz_steps,
                featviz_batch_size=cfg.featviz_batch_size)


def resolve_request(model: torch.nn.Module, cfg: VizConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """The blocks to dump, to reconstruct, to invert and to visualize channel by channel (feature
    visualization), with the prior and paths checked: an InputError naming the option and listing the valid
    choices otherwise. Needs only the architecture, not weights."""
    cfg.validate()
    blocks = resolve_blocks(model, cfg.blocks, "--blocks")
    deconv = [] if not cfg.deconv_blocks else resolve_blocks(
        model, None if cfg.deconv_blocks == ["all"] else cfg.deconv_blocks, "--deconv-blocks")
    featviz = [] if not cfg.featviz_blocks else resolve_blocks(  # auto: all (a local CPU launch said none first)
        model, None if cfg.featviz_blocks in (["all"], ["auto"]) else cfg.featviz_blocks, "--featviz-blocks")
    return blocks, deconv, resolve_invert_blocks(model, cfg.invert_blocks), featviz


def resolve_invert_blocks(model: torch.nn.Module, spec: list[str]) -> list[str]:
    """["default"]: the stem and the last block of each stage (inversion costs most); ["all"]; []; names."""
    names = block_names(model)
    if spec == ["default"]:
        last = {}
        for n in names[1:]:
            last[n.split(".")[0]] = n
        return ["conv1", *last.values()]
    return resolve_blocks(model, None if spec == ["all"] else spec, "--invert-blocks") if spec else []


def plan_arch(run: RunDir, plan: Plan) -> tuple[str, str, int]:
    """(arch, stem, image size) of the model the plan was made for: from viz.h5's root attrs once this plan is
    collated, else from a shard of the plan's checkpoint, else (none written yet) from the checkpoint itself, the
    only one of the three that costs a read of the weights. Sizes the parts of the per-channel arrays."""
    for path, key in ((run.viz_file, "plan_checkpoint_sha256"), *((run.shard(k), "checkpoint_sha256")
                                                                   for k in range(len(plan.shards)))):
        try:
            attrs = store.read_attrs(path) if path.is_file() else {}
        except store.StoreError:  # a half-written or foreign file: the next one, or the checkpoint, says it
            continue
        if attrs.get(key) == plan.checkpoint_sha256 and "image_size" in attrs:
            return attrs["arch"], attrs.get("stem", ""), int(attrs["image_size"])
    cfg = checkpoint.load_checkpoint(run.path / plan.checkpoint)["config"]
    return cfg["arch"], cfg.get("stem", ""), int(cfg.get("image_size", 32))


def shard_problem(run: RunDir, k: int, plan: Plan) -> str | None:
    """Why shard k is not a complete shard of `plan` (missing, incomplete, another plan's), or None."""
    path = run.shard(k)
    try:
        attrs = store.verify_shard(path, len(plan.shards[k]))
        problem = plan.mismatch(attrs)
        if problem is None and store.read_shard(path, ["index"])["index"].tolist() != plan.shards[k]:
            problem = "not this plan's: holds other images (its /index differs from the plan's positions)"
    except store.StoreError as e:
        problem = getattr(e, "problem", str(e))
    return problem


def shard_problems(run: RunDir, plan: Plan) -> dict[int, str]:
    """{shard: why it is not usable} over the plan's shards (the ones that verify are absent)."""
    out = {}
    for k in range(len(plan.shards)):
        problem = shard_problem(run, k, plan)
        if problem:
            out[k] = problem
    return out


def usable_shards(run: RunDir, plan: Plan) -> list[int]:
    """The plan's shards that verify (complete and the plan's), in order."""
    return [k for k in range(len(plan.shards)) if shard_problem(run, k, plan) is None]
