"""The visualization array: which images, how they are split into shards, and one task's work.

The launcher writes `viz/plan.json` (a typed `rundir.Plan`: the request, the checkpoint and its sha256,
each shard's image positions); every array task receives only the run directory and its shard number,
reads the plan, loads the checkpoint (`weights_only=True`), runs its images forward once in batches and
writes `viz/shards/shard-NNNNN.h5`. A shard that exists and belongs to the plan is skipped, so a rerun
redoes only what is missing.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, checkpoint, store
from .activations import dump_activations, resolve_blocks
from .collation import collate, project_part
from .config import SPLITS, VizConfig, default_stem
from .errors import InputError
from .examples import TopK
from .rundir import Plan, RunDir, now

__all__ = ["VizConfig", "VizError", "SPLITS", "balanced_sample", "plan_shards", "load_split", "make_plan",
           "resolve_request", "resolve_invert_blocks", "run_shard", "save_figures", "collate", "project_part"]

log = logging.getLogger("hpcviz")


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
    from .data import load_images, source_labels, split_indices
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
    from .data import load_rows
    idx, labels, classes = split_rows(train_cfg, split)
    pos = torch.arange(len(idx)) if positions is None else torch.as_tensor(list(positions), dtype=torch.int64)
    images = load_rows(train_cfg["data"], train_cfg["image_size"], idx[pos].tolist(),
                       skip_bad=train_cfg.get("skip_bad", False))
    return images, labels[pos], classes


def make_plan(cfg: VizConfig) -> Plan:
    """Resolve the images and shards of a request against the run's checkpoint and data."""
    run = RunDir(cfg.run_dir)
    state = checkpoint.load_checkpoint(run.checkpoints)
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
    from .models import build_model
    model = build_model(state["config"]["arch"], len(state["classes"]), state["config"]["stem"])
    blocks, deconv, inv = resolve_request(model, cfg)
    return Plan(config=cfg, checkpoint=run.rel(state["path"]), checkpoint_sha256=state["sha256"],
                dataset_fingerprint=state.get("data_fingerprint", ""), split=cfg.split, blocks=blocks,
                deconv_blocks=deconv, paths=list(cfg.paths), invert_blocks=inv, invert_steps=cfg.invert_steps,
                invert_target=cfg.invert_target, invert_solver=cfg.invert_solver, prior=cfg.prior, fast=cfg.fast,
                shards=plan_shards(indices, cfg.n_tasks()), n_images=len(indices), planned=now(), topk=cfg.topk,
                exact=cfg.exact)


def resolve_request(model: torch.nn.Module, cfg: VizConfig) -> tuple[list[str], list[str], list[str]]:
    """The blocks to dump, to reconstruct and to invert, with the prior and paths checked: an InputError
    naming the option and listing the valid choices otherwise. Needs only the architecture, not weights."""
    cfg.validate()
    blocks = resolve_blocks(model, cfg.blocks, "--blocks")
    deconv = [] if not cfg.deconv_blocks else resolve_blocks(
        model, None if cfg.deconv_blocks == ["all"] else cfg.deconv_blocks, "--deconv-blocks")
    return blocks, deconv, resolve_invert_blocks(model, cfg.invert_blocks)


def _write_deconv(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan, start: int) -> None:
    """deconv/<block>/<path>: raw reconstructions in the network's (normalised) input space, float32."""
    if not plan.deconv_blocks:
        return
    from .deconv import Deconvnet
    recs = Deconvnet(model, exact=not plan.fast).reconstruct_all(x, plan.deconv_blocks, plan.paths)
    for (block, path), r in recs.items():  # r: (b, 3, H, W)
        w.write(f"deconv/{block}/{path}", start, r.float().cpu().numpy(), dims=("image", "channel", "y", "x"),
                attrs={"block": block, "path": path, "seed": "all",
                       "what": "deconvnet reconstruction, raw, in the network's normalised input space"})


def resolve_invert_blocks(model: torch.nn.Module, spec: list[str]) -> list[str]:
    """["default"]: the stem and the last block of each stage (inversion costs most); ["all"]; []; names."""
    from .models import block_names
    names = block_names(model)
    if spec == ["default"]:
        last = {}
        for n in names[1:]:
            last[n.split(".")[0]] = n
        return ["conv1", *last.values()]
    return resolve_blocks(model, None if spec == ["all"] else spec, "--invert-blocks") if spec else []


def _write_inversions(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan,
                      state: dict[str, Any], start: int, progress: Any = None, fast_forward: bool = True,
                      cache: Any = None) -> None:
    """invert/<block> (raw, normalised input space, float32), invert_error/<block> (relative feature error)
    and invert_steps/<block> (the optimiser steps each image took before it stopped). cache: the task's
    hpcviz.graphs.StepCache (its captured steps serve every batch)."""
    from .inversion import InversionConfig, invert
    icfg = InversionConfig(prior=plan.prior, exact=not plan.fast, target=plan.invert_target,
                           solver=plan.invert_solver, fast_forward=fast_forward,
                           precision="exact" if plan.exact else "auto")
    if plan.invert_steps:
        icfg.steps = plan.invert_steps
    if not plan.invert_target:  # 0: every step, as before stopping rules existed
        icfg.window = 0
    out = invert(model, images=x, blocks=plan.invert_blocks, cfg=icfg, mean=state["mean"], std=state["std"],
                 progress=progress, cache=cache)
    for block, r in out.items():
        w.write(f"invert/{block}", start, r["x"].float().cpu().numpy(), dims=("image", "channel", "y", "x"),
                attrs={"block": block, "max_steps": icfg.steps, "target": icfg.target, "prior": icfg.prior,
                       "solver": icfg.solver,
                       "what": "inversion of the block's activation, raw, in the network's normalised input space"})
        w.write(f"invert_error/{block}", start, r["error"].float().cpu().numpy(), dims=("image",),
                attrs={"block": block, "what": "relative feature error ||phi(x) - phi0|| / ||phi0||"})
        w.write(f"invert_steps/{block}", start, r["steps"].to(torch.int32).numpy(), dims=("image",),
                attrs={"block": block, "what": f"optimiser steps taken (at most {icfg.steps}; fewer once the "
                       f"error reached {icfg.target:g} or stopped improving)"})


def _root_attrs(run: RunDir, plan: Plan, state: dict[str, Any], shard: int) -> dict[str, Any]:
    tcfg = state["config"]
    return {"run": run.path.resolve().name, **plan.shard_attrs(), "arch": tcfg["arch"],
            "stem": tcfg.get("stem") or default_stem(tcfg["arch"]), "image_size": tcfg["image_size"],
            "class_names": list(state["classes"]), "mean": list(state["mean"]), "std": list(state["std"]),
            "shard": shard, "n_shards": len(plan.shards), "config": {"viz": plan.to_dict()["config"], "train": tcfg},
            "versions": {"hpcviz": __version__, "torch": str(torch.__version__), "numpy": np.__version__},
            "created": now()}


def run_shard(run_dir: str, shard: int) -> str:
    """One array task: write (or, if it verifies already, skip) shard `shard` of the run's plan."""
    from . import dist
    from .log import setup_logging
    setup_logging()  # progress and timing lines in the task's own log
    run = RunDir(run_dir)
    plan = run.read_plan()
    if shard >= len(plan.shards):  # the pipeline's array is sized before the plan: a smaller split
        log.info("shard %d: the plan has %d shards, nothing to do", shard, len(plan.shards))
        return ""
    path = run.shard(shard)
    if run.shard_problem(shard, plan) is None:
        log.info("shard %d: %s exists and verifies, skipped", shard, path)
        return str(path)
    state = checkpoint.load_checkpoint(run.path / plan.checkpoint)
    if state["sha256"] != plan.checkpoint_sha256:
        raise VizError(f"{run.path / plan.checkpoint}: changed since the plan was made (sha256 differs); "
                       "hint: launch the visualization again")
    dist.share_cores()
    device = dist.pick_device(plan.config.device)
    where = dist.describe_device(device)
    log.info("shard %d: %d images on %s (%s numerics)", shard, len(plan.shards[shard]), where,
             "fast" if plan.fast else "exact")
    run.update("viz", lambda rec: {"devices": {**rec.devices, str(shard): where}})
    with dist.numerics(exact=not plan.fast):
        seconds = visualize_shard(run, shard, plan, state, device)
    log.info("shard %d done: %d images in %.1f s (%s s) -> %s", shard, len(plan.shards[shard]), seconds["total"],
             ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if k != "total"), path)
    return str(path)


_FORWARD_SHARE = 0.02  # measured: forward + deconvnet ~0.011 s per image, the default inversion ~1.1 s


def inversion_batch(plan: Plan, device: torch.device, model: torch.nn.Module | None = None,
                    hw: tuple[int, int] = (32, 32), free_bytes: int | None = None) -> int:
    """Images inverted together: --invert-batch-size, else on a GPU the largest power of two (at most 1024)
    whose inversion fits the free device memory (`free_bytes`, default: what CUDA reports) by the per-row
    memory model of hpcviz.invmem (the architecture, the blocks, the image size hw); 64 on a CPU (the late
    steps, when few rows are left, use the cores better than with 32: ~10% faster per image measured)."""
    if plan.config.invert_batch_size:
        return plan.config.invert_batch_size
    if device.type != "cuda" or model is None:
        return 64
    from .inversion import InversionConfig, resolve_precision
    from .invmem import batch_images, footprint
    icfg = InversionConfig()
    free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
    fp = footprint(model, plan.invert_blocks, hw, plan.invert_steps or icfg.steps, icfg.history,
                   plan.invert_solver, "exact" if plan.exact else resolve_precision("auto", device), graphs=True)
    return batch_images(fp, free, most=1024)


class _Clock:
    """Seconds per part of a task; on a GPU each part is synchronised first, so the parts are its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {"load": 0.0, "forward": 0.0, "topk": 0.0, "deconv": 0.0, "inversion": 0.0}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - t0


def visualize_shard(run: RunDir, shard: int, plan: Plan, state: dict[str, Any], device: torch.device,
                    baseline: bool = False) -> dict[str, float]:
    """Forward (activations, logits), deconvnet and inversions of the shard's images, written by a thread
    while the next batch is computed, progress lines in the log; returns the seconds per part and in total.
    baseline: the way of before, for the benchmark: the whole split loaded to take the shard's images from it,
    the inversions batched like the forward, with the plain (unfolded) functional forward."""
    from . import dist
    from .data import normalize
    from .log import TaskProgress
    from .models import from_checkpoint
    cfg, path, clock, t0 = plan.config, run.shard(shard), _Clock(device), time.perf_counter()
    with clock.part("load"):
        model = from_checkpoint(state, device)
        if baseline:
            images, labels, _ = load_split(state["config"], plan.split)
            images, labels = images[plan.shards[shard]], labels[plan.shards[shard]]
        else:
            images, labels, _ = load_split(state["config"], plan.split, plan.shards[shard])  # (n, 3, H, W), (n,)
    n, pos = len(images), torch.as_tensor(plan.shards[shard], dtype=torch.int64)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    inv = cfg.batch_size if baseline else inversion_batch(plan, device, model, size)
    # progress in image-units: the forward and deconvnet of an image weigh _FORWARD_SHARE of its inversion
    fw = _FORWARD_SHARE if plan.invert_blocks else 1.0
    progress = TaskProgress(fw * n + (n if plan.invert_blocks else 0), f"shard {shard}")
    attrs = {**_root_attrs(run, plan, state, shard), "device": dist.describe_device(device)}
    topk = TopK(plan.topk, len(state["classes"])) if plan.topk else None
    pos_dev, labels_dev = pos.to(device), labels.to(device)
    from .graphs import StepCache
    cache = StepCache()  # one per task: each padded shape's step is captured once and serves every batch
    with store.ShardWriter(path, n, attrs, compression=cfg.compression or None) as sw:
        with store.BackgroundWriter(sw) as w:
            w.write("index", 0, pos.numpy(), dims=("image",), attrs={"what": f"position in the {plan.split} split"})
            w.write("images", 0, images.numpy(), dims=("image", "channel", "y", "x"),
                    attrs={"what": "the exact uint8 pixels fed to the network (before normalisation)"})
            w.write("label", 0, labels.numpy(), dims=("image",))
            for start in range(0, n, cfg.batch_size):
                x = normalize(images[start:start + cfg.batch_size].to(device), state["mean"], state["std"])
                _forward_batch(w, model, x, plan, start, clock, topk, pos_dev, labels_dev)
                with clock.part("deconv"):
                    _write_deconv(w, model, x, plan, start)
                progress.update(fw * (start + len(x)), f"forward and deconvnet, images {start + len(x)}/{n}",
                                "forward")
            for start in range(0, n if plan.invert_blocks else 0, inv):
                x = normalize(images[start:start + inv].to(device), state["mean"], state["std"])

                def step(k: int, steps: int, running: int, rows: int, start: int = start, b: int = len(x)) -> None:
                    # rows leave fast at first (shallow blocks) while the deep ones cost the most: halfway
                    # between the share of rows done and of the step limit reached
                    progress.update(fw * n + start + b * (1 - running / rows + k / steps) / 2,
                                    f"inversion of images {start}-{start + b - 1} of {n}: step {k} of at most "
                                    f"{steps}, {running} of {rows} inversions still running", "inversion")
                with clock.part("inversion"):
                    _write_inversions(w, model, x, plan, state, start, step, fast_forward=not baseline, cache=cache)
        for name, (array, dims, a) in (topk.results() if topk is not None else {}).items():
            sw.write_summary(name, array, dims=dims, attrs={**a, "k": plan.topk})
    progress.close()
    return {**clock.seconds, "write": w.seconds, "total": time.perf_counter() - t0}


def _forward_batch(w: store.BackgroundWriter, model: torch.nn.Module, x: torch.Tensor, plan: Plan, start: int,
                   clock: _Clock, topk: TopK | None, pos: torch.Tensor, labels: torch.Tensor) -> None:
    """logits, pred and act/<block> of one batch; the dataset-examples map reads the activations as stored."""
    with clock.part("forward"):
        logits, acts = dump_activations(model, x, plan.blocks)  # (b, K), {block: (b, C, h, w)}
        # to float16 on the device: half the bytes to copy, and torch converts ~5x faster than numpy
        halves = {b: a.half() for b, a in acts.items()}
    if topk is not None:
        with clock.part("topk"):
            for block, h in halves.items():
                topk.update(block, h, pos[start:start + len(x)], labels[start:start + len(x)], acts[block])
    with clock.part("forward"):
        maps = {b: h.cpu().numpy() for b, h in halves.items()}
    w.write("logits", start, logits.cpu().numpy(), dims=("image", "class"))
    w.write("pred", start, logits.argmax(1).cpu().numpy(), dims=("image",))
    for block, a in maps.items():  # the writer counts the values that overflowed to inf (fp16_overflow)
        w.write(f"act/{block}", start, a, dims=("image", "channel", "y", "x"), dtype=np.float16,
                attrs={"block": block, "what": "output of the block (after its ReLU)"})


def save_figures(run_dir: str | Path, images: int = 2, max_channels: int = 32) -> list[Path]:
    """From viz/viz.h5 and the checkpoint: conv1 filters, and for the first `images` images the
    feature maps of every block and the deconvnet panel, as PNGs in viz/figures/."""
    from . import figures
    run = RunDir(run_dir)
    out = run.figures_dir
    out.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load_checkpoint(run.checkpoints)
    saved = [out / "conv1_filters.png"]
    _save(figures.filter_grid(state["model"]["conv1.weight"].float().numpy()), saved[-1])
    names = store.list_datasets(run.viz_file)
    data = store.read_shard(run.viz_file, rows=slice(0, images))
    for i in range(min(images, len(data["index"]))):
        tag = f"image{int(data['index'][i]):05d}"
        for name in (n for n in names if n.startswith("act/")):
            saved.append(out / f"{tag}_maps_{name[4:]}.png")
            _save(figures.feature_maps(data[name][i], name[4:], max_channels), saved[-1])
        recs = {tuple(n.split("/")[1:3]): data[n][i] for n in names if n.startswith("deconv/")}
        if recs:
            saved.append(out / f"{tag}_deconv.png")
            _save(figures.deconv_panel(data["images"][i], recs, f"{tag} (label {int(data['label'][i])})"), saved[-1])
    inv = [n[len("invert/"):] for n in names if n.startswith("invert/")]
    if inv:
        rows = slice(0, 4)  # a few images: one figure of originals beside their inversions
        more = store.read_shard(run.viz_file, ["images"] + [f"invert/{b}" for b in inv]
                                + [f"invert_error/{b}" for b in inv], rows=rows)
        saved.append(out / "inversions.png")
        _save(figures.inversion_panel(more["images"], {b: more[f"invert/{b}"] for b in inv},
                                      {b: more[f"invert_error/{b}"] for b in inv}), saved[-1])
    return saved


def _save(fig: Any, path: Path) -> None:
    import io

    from .files import write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(path, buf.getvalue())
