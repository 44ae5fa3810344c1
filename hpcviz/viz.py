"""The visualization array: which images, how they are split into shards, and one task's work.

The launcher writes `viz/plan.json` (the config, the checkpoint's sha256 and each shard's
image indices); every array task receives only the run directory and its shard number,
reads the plan, loads the checkpoint (`weights_only=True`), runs its images forward once
in batches and writes `viz/shards/shard-NNNNN.h5`. A shard that exists and verifies is
skipped, so a rerun redoes only what is missing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, checkpoint, store
from .activations import dump_activations, resolve_blocks
from .config import config_from_dict, config_to_dict

log = logging.getLogger("hpcviz")

SPLITS = ("val", "train")


class VizError(ValueError):
    """A visualization request that does not fit the run."""


@dataclass
class VizConfig:
    run_dir: str = ""                 # the trained run; shards go to <run_dir>/viz/shards
    split: str = "val"                # val | train: the split of the run's data the images come from
    images: int = 200                 # images in a class-balanced, seeded sample of the split
    indices: list[int] = field(default_factory=list)  # explicit positions in the split (overrides images)
    tasks: int = 2                    # array tasks = shards
    batch_size: int = 64              # images per forward pass
    blocks: list[str] = field(default_factory=list)   # block names to dump (empty = every block)
    compression: str = ""             # "" (none, fastest) | gzip | lzf
    deconv_blocks: list[str] = field(default_factory=lambda: ["all"])  # blocks to reconstruct: ["all"] | [] | names
    paths: list[str] = field(default_factory=lambda: ["both", "residual", "shortcut"])  # deconvnet paths
    invert_blocks: list[str] = field(default_factory=lambda: ["default"])  # ["default"] = conv1 + each stage's
    #                                 last block | ["all"] | [] | names
    invert_steps: int = 0             # optimisation steps per inversion (0 = inversion's default)
    prior: str = "tv"                 # tv | none (the course report's plain sum of squared errors)
    device: str = "auto"              # auto | cpu | cuda
    seed: int = 0                     # for the sample
    fast: bool = False                # GPUs: TF32 and atomic unpooling, faster but ~1e-3 off (default exact)


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


def shard_path(run_dir: str | Path, shard: int) -> Path:
    return Path(run_dir) / "viz" / "shards" / f"shard-{shard:05d}.h5"


def load_split(train_cfg: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The run's own train or val split, rebuilt from its config exactly as training carved it."""
    from .data import load_images, split_indices
    if split not in SPLITS:
        raise VizError(f"--split {split!r}: not one of {', '.join(SPLITS)}; hint: --split val")
    ds = load_images(train_cfg["data"], train_cfg["image_size"], skip_bad=train_cfg.get("skip_bad", False))
    train_idx, val_idx = split_indices(ds.labels, train_cfg["val_fraction"], seed=train_cfg.get("split_seed", 0))
    idx = val_idx if split == "val" else train_idx
    return ds.images[idx], ds.labels[idx], ds.classes


def make_plan(cfg: VizConfig) -> dict[str, Any]:
    """Resolve the images and shards of a request against the run's checkpoint and data."""
    state = checkpoint.load_checkpoint(Path(cfg.run_dir) / "checkpoints")
    _, labels, _ = load_split(state["config"], cfg.split)
    if cfg.indices:
        bad = [i for i in cfg.indices if not 0 <= i < len(labels)]
        if bad:
            raise VizError(f"--indices {bad[:5]}: outside the {cfg.split} split of {len(labels)} images; "
                           f"hint: use positions 0..{len(labels) - 1}")
        indices = sorted(set(cfg.indices))
    else:
        indices = balanced_sample(labels.numpy(), min(cfg.images, len(labels)), cfg.seed).tolist()
    from .models import build_model
    model = build_model(state["config"]["arch"], len(state["classes"]), state["config"]["stem"])
    blocks, deconv, inv = resolve_request(model, cfg)
    return {"config": config_to_dict(cfg), "checkpoint": state["path"], "checkpoint_sha256": state["sha256"],
            "blocks": blocks, "deconv_blocks": deconv, "paths": list(cfg.paths), "invert_blocks": inv,
            "invert": {"steps": cfg.invert_steps, "prior": cfg.prior}, "fast": cfg.fast,
            "shards": plan_shards(indices, cfg.tasks), "n_images": len(indices)}


def resolve_request(model: torch.nn.Module, cfg: VizConfig) -> tuple[list[str], list[str], list[str]]:
    """The blocks to dump, to reconstruct and to invert, with the prior and paths checked: a VizError
    (or DeconvError) listing the valid choices otherwise. Needs only the architecture, not weights."""
    from .deconv import PATHS, DeconvError
    from .inversion import PRIORS
    blocks = resolve_blocks(model, cfg.blocks)
    deconv = [] if not cfg.deconv_blocks else resolve_blocks(model, None if cfg.deconv_blocks == ["all"]
                                                               else cfg.deconv_blocks)
    inv = resolve_invert_blocks(model, cfg.invert_blocks)
    if cfg.prior not in PRIORS:
        raise VizError(f"--prior {cfg.prior!r}: not one of {', '.join(PRIORS)}; hint: --prior tv")
    bad = [p for p in cfg.paths if p not in PATHS]
    if bad or (deconv and not cfg.paths):
        raise DeconvError(f"--paths {','.join(cfg.paths)}: valid paths are {', '.join(PATHS)}; hint: --paths both")
    return blocks, deconv, inv


def write_plan(run_dir: str | Path, plan: dict[str, Any]) -> None:
    checkpoint.write_json(Path(run_dir) / "viz" / "plan.json", plan)


def read_plan(run_dir: str | Path) -> dict[str, Any]:
    plan = checkpoint.read_json(Path(run_dir) / "viz" / "plan.json")
    if plan is None:
        raise VizError(f"{run_dir}/viz/plan.json: missing; hint: launch the array with jobs/launch_viz.py")
    return plan


def shard_done(run_dir: str | Path, shard: int, plan: dict[str, Any]) -> bool:
    """The shard exists, is complete, and holds exactly this plan's images, blocks and checkpoint."""
    path, positions = shard_path(run_dir, shard), plan["shards"][shard]
    try:
        attrs = store.verify_shard(path, len(positions))
        index = store.read_shard(path, ["index"])["index"]
    except store.StoreError:
        return False
    same = all(list(attrs.get(k, [])) == list(plan.get(k, [])) for k in ("blocks", "deconv_blocks", "paths",
                                                                        "invert_blocks"))
    same = same and attrs.get("invert", {}) == plan.get("invert", {}) and attrs.get("fast", False) == plan.get("fast", False)
    return same and attrs.get("checkpoint_sha256") == plan["checkpoint_sha256"] and index.tolist() == list(positions)


def _load_model(state: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from .models import build_model
    cfg = state["config"]
    model = build_model(cfg["arch"], len(state["classes"]), cfg.get("stem", ""))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _root_attrs(run_dir: str, plan: dict[str, Any], state: dict[str, Any], shard: int) -> dict[str, Any]:
    tcfg = state["config"]
    return {"run": Path(run_dir).resolve().name, "checkpoint_sha256": state["sha256"], "arch": tcfg["arch"],
            "stem": tcfg.get("stem") or ("cifar" if tcfg["arch"] in ("resnet20", "resnet32", "resnet56")
                                         else "imagenet"),
            "image_size": tcfg["image_size"], "class_names": list(state["classes"]), "mean": list(state["mean"]),
            "std": list(state["std"]), "split": plan["config"]["split"], "shard": shard,
            "n_shards": len(plan["shards"]), "blocks": list(plan["blocks"]),
            "deconv_blocks": list(plan.get("deconv_blocks", [])), "paths": list(plan.get("paths", [])),
            "invert_blocks": list(plan.get("invert_blocks", [])), "invert": dict(plan.get("invert", {})),
            "fast": bool(plan.get("fast", False)),
            "config": {"viz": plan["config"], "train": tcfg},
            "versions": {"hpcviz": __version__, "torch": str(torch.__version__), "numpy": np.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _write_deconv(w: "store.ShardWriter", model: torch.nn.Module, x: torch.Tensor, plan: dict[str, Any],
                  start: int) -> None:
    """deconv/<block>/<path>: raw reconstructions in the network's (normalised) input space, float32."""
    if not plan.get("deconv_blocks"):
        return
    from .deconv import Deconvnet
    recs = Deconvnet(model, exact=not plan.get("fast", False)).reconstruct_all(
        x, plan["deconv_blocks"], plan["paths"])  # {(block, path): (b, 3, H, W)}
    for (block, path), r in recs.items():
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
    return resolve_blocks(model, None if spec == ["all"] else spec) if spec else []


def _write_inversions(w: "store.ShardWriter", model: torch.nn.Module, x: torch.Tensor, plan: dict[str, Any],
                      state: dict[str, Any], start: int) -> None:
    """invert/<block> (raw, normalised input space, float32) and invert_error/<block> (relative feature error)."""
    if not plan.get("invert_blocks"):
        return
    from .inversion import InversionConfig, invert
    cfg = plan["config"]
    icfg = InversionConfig(prior=cfg.get("prior", "tv"), exact=not plan.get("fast", False),
                           **({"steps": cfg["invert_steps"]} if cfg.get("invert_steps") else {}))
    out = invert(model, images=x, blocks=plan["invert_blocks"], cfg=icfg, mean=state["mean"], std=state["std"])
    for block, r in out.items():
        w.write(f"invert/{block}", start, r["x"].float().cpu().numpy(), dims=("image", "channel", "y", "x"),
                attrs={"block": block, "steps": icfg.steps, "prior": icfg.prior,
                       "what": "inversion of the block's activation, raw, in the network's normalised input space"})
        w.write(f"invert_error/{block}", start, r["error"].float().cpu().numpy(), dims=("image",),
                attrs={"block": block, "what": "relative feature error ||phi(x) - phi0|| / ||phi0||"})


def run_shard(run_dir: str, shard: int) -> str:
    """One array task: write (or, if it verifies already, skip) shard `shard` of the run's plan."""
    from . import dist
    plan = read_plan(run_dir)
    cfg = config_from_dict(VizConfig, plan["config"])
    positions = plan["shards"][shard]
    path = shard_path(run_dir, shard)
    if shard_done(run_dir, shard, plan):
        log.info("shard %d: %s exists and verifies, skipped", shard, path)
        return str(path)
    state = checkpoint.load_checkpoint(plan["checkpoint"])
    if state["sha256"] != plan["checkpoint_sha256"]:
        raise VizError(f"{plan['checkpoint']}: changed since the plan was made (sha256 differs); "
                       "hint: launch the visualization again")
    device = dist.pick_device(cfg.device)
    where = dist.describe_device(device)
    log.info("shard %d: %d images on %s (%s numerics)", shard, len(positions), where,
             "fast" if cfg.fast else "exact")
    checkpoint.update_json(Path(run_dir) / "manifest.json", "viz", lambda old: {
        "devices": {**old.get("devices", {}), str(shard): where}})
    with dist.numerics(exact=not cfg.fast):
        return _write_shard(run_dir, shard, plan, state, cfg, device, path)


def _write_shard(run_dir: str, shard: int, plan: dict[str, Any], state: dict[str, Any], cfg: VizConfig,
                 device: torch.device, path: Path) -> str:
    from . import dist
    from .data import normalize
    positions = plan["shards"][shard]
    model = _load_model(state, device)
    images, labels, _ = load_split(state["config"], cfg.split)
    pos = torch.as_tensor(positions, dtype=torch.int64)
    images, labels = images[pos], labels[pos]  # (n, 3, H, W) uint8, (n,)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {**_root_attrs(run_dir, plan, state, shard), "device": dist.describe_device(device)}
    with store.ShardWriter(path, len(pos), attrs,
                           compression=cfg.compression or None) as w:
        w.write("index", 0, pos.numpy(), dims=("image",), attrs={"what": f"position in the {cfg.split} split"})
        w.write("images", 0, images.numpy(), dims=("image", "channel", "y", "x"),
                attrs={"what": "the exact uint8 pixels fed to the network (before normalisation)"})
        w.write("label", 0, labels.numpy(), dims=("image",))
        for start in range(0, len(pos), cfg.batch_size):
            x = normalize(images[start:start + cfg.batch_size].to(device), state["mean"], state["std"])
            logits, acts = dump_activations(model, x, plan["blocks"])  # (b, K), {block: (b, C, h, w)}
            w.write("logits", start, logits.cpu().numpy(), dims=("image", "class"))
            w.write("pred", start, logits.argmax(1).cpu().numpy(), dims=("image",))
            _write_deconv(w, model, x, plan, start)
            _write_inversions(w, model, x, plan, state, start)
            for block, a in acts.items():
                # to float16 on the device: half the bytes to copy, and torch converts ~5x faster than numpy;
                # the writer counts the values that overflowed to inf (fp16_overflow)
                w.write(f"act/{block}", start, a.half().cpu().numpy(), dims=("image", "channel", "y", "x"),
                        dtype=np.float16, attrs={"block": block, "what": "output of the block (after its ReLU)"})
    log.info("shard %d: %d images in %.1f s -> %s", shard, len(pos), time.perf_counter() - t0, path)
    return str(path)


def save_figures(run_dir: str | Path, images: int = 2, max_channels: int = 32) -> list[Path]:
    """From viz/viz.h5 and the checkpoint: conv1 filters, and for the first `images` images the
    feature maps of every block and the deconvnet panel, as PNGs in viz/figures/."""
    from . import figures
    run = Path(run_dir)
    out = run / "viz" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load_checkpoint(run / "checkpoints")
    saved = [out / "conv1_filters.png"]
    _save(figures.filter_grid(state["model"]["conv1.weight"].float().numpy()), saved[-1])
    names = store.list_datasets(run / "viz" / "viz.h5")
    data = store.read_shard(run / "viz" / "viz.h5", rows=slice(0, images))
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
        more = store.read_shard(run / "viz" / "viz.h5", ["images"] + [f"invert/{b}" for b in inv]
                                + [f"invert_error/{b}" for b in inv], rows=rows)
        saved.append(out / "inversions.png")
        _save(figures.inversion_panel(more["images"], {b: more[f"invert/{b}"] for b in inv},
                                      {b: more[f"invert_error/{b}"] for b in inv}), saved[-1])
    return saved


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110)
