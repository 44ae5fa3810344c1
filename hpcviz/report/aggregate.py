"""The aggregation stage: a run's files -> report/ (figures, tables, report.md, report.html, report.json).

It reads config.json, manifest.json, metrics.jsonl, eval.json, the checkpoint (for the conv1 filters)
and the visualization shards, collating them into viz/viz.h5 first (so a rerun after `--retry-failed`
sees the new shards). It builds what the files allow: a run whose training failed still gets a report
that says so, and every missing shard is named with its reason and, on SLURM, its array task's state.
The report follows the course report: training parameters and curves, accuracy and per-class accuracy,
conv1 filters, feature maps, deconvnet reconstructions by path, inversions with their errors.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from .. import __version__, dist, store
from ..config import AggregateConfig, config_to_dict
from ..errors import InputError
from ..files import check_space, write_bytes
from ..models import block_names, build_model
from ..rundir import RunDir, now
from ..scheduler import latest_tasks, task_states
from ..train import checkpoint
from ..viz.collation import collate
from ..viz.state import RunState, describe_problems, report_inputs, run_state
from . import atlas, figures
from . import render as report
from .render import Fixed

__all__ = ["AggregateConfig", "AggregateError", "aggregate", "build_report", "check_request", "read_inputs",
           "collate_run"]

log = logging.getLogger("hpcviz")


class AggregateError(InputError):
    """The run directory holds nothing to report on."""


def read_inputs(run: RunDir) -> dict[str, Any]:
    """Everything the report is made of that is not HDF5; absent files are None."""
    if not run.is_run():
        raise AggregateError(f"--run {run}: not a run directory (no config.json, manifest.json or checkpoints/); "
                             "hint: train first (jobs/launch_train.py or jobs/launch_pipeline.py)")
    return {"config": run.read_config(), "manifest": run.manifest(), "metrics": run.read_metrics(),
            "eval": run.read_eval(), "plan": run.plan()}


def _task_states(run: RunDir, shards: list[int]) -> dict[int, str]:
    """'array task J_K: STATE' for the latest task of each shard, on SLURM (states from sacct/squeue)."""
    record = run.manifest().viz
    if record.cluster != "slurm" or not shards:
        return {}
    latest = {s: tid for s, tid in latest_tasks(record.tasks).items() if s in shards}
    states = task_states(latest.values())
    return {s: f"array task {tid}: " + states.get(tid, "no record in sacct or squeue: cancelled before it started, "
                                                      "or purged") for s, tid in latest.items()}


def collate_run(run: RunDir, cfg: AggregateConfig | None = None) -> dict[str, Any]:
    """viz.collate (with the projections and feature visualizations left undone computed when `cfg` asks for
    them), with each missing
    shard's array task state (SLURM) added to its reason."""
    summary = collate(run, run.plan(), project=bool(cfg and cfg.projections),
                      device=cfg.projection_device if cfg else "auto", featviz=bool(cfg and cfg.featviz))
    states = _task_states(run, sorted(summary["missing"]))
    summary["missing"] = {k: v + (f" ({states[k]})" if k in states else "") for k, v in summary["missing"].items()}
    return summary


def _png(fig: Any, meta: dict[str, Any], dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": f"hpcviz {__version__}",
                                                      "Description": json.dumps(meta, sort_keys=True)})
    return buf.getvalue()


class _Figures:
    """Collects (name -> PNG bytes, caption); each PNG carries the config that made it."""

    def __init__(self, meta: dict[str, Any], dpi: int) -> None:
        self.meta, self.dpi = meta, dpi
        self.png: dict[str, bytes] = {}
        self.caption: dict[str, str] = {}
        self.linked: set[str] = set()

    def add(self, name: str, fig: Any, caption: str, dpi: int | None = None) -> tuple:
        rel = f"figures/{name}.png"
        self.png[rel], self.caption[rel] = _png(fig, self.meta, dpi or self.dpi), caption
        return ("fig", rel, caption)

    def link(self, name: str, fig: Any, text: str, dpi: int | None = None) -> tuple[str, str]:
        """A figure written to figures/ and linked from the report, never embedded (a block's full grid)."""
        rel = f"figures/{name}.png"
        self.png[rel] = _png(fig, self.meta, dpi or self.dpi)
        self.linked.add(rel)
        return (text, rel)


def _training_blocks(inp: dict[str, Any], figs: _Figures, tables: dict) -> list[tuple]:
    train = inp["config"].get("train") or (inp["eval"] or {}).get("config") or {}
    man = inp["manifest"].train
    labels = {"world_size": "processes (world size)", "device": "device", "host": "host",
              "restarts": "restarts (requeues)"}
    extra = {label: getattr(man, k) for k, label in labels.items() if man.status}
    doc: list[tuple] = [("h", 2, "1. Training")]
    if train:
        tables["training_parameters"] = report.params_table(train, extra)
        doc.append(("table", *tables["training_parameters"]))
    else:
        doc.append(("warn", "no training configuration (config.json lacks 'train')"))
    metrics = inp["metrics"]
    if metrics:
        secs = sum(r.get("epoch_s", 0.0) for r in metrics)
        took = f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.1f} s"
        doc.append(("p", f"{len(metrics)} epoch(s) recorded, {took} of training, "
                         f"{np.median([r.get('images_per_s', 0) for r in metrics]):.0f} images/s (median)."))
        doc.append(figs.add("training_curves", figures.training_curves(metrics),
                            "Loss and accuracy per epoch, train (solid) and validation (dashed)."))
    else:
        doc.append(("p", f"Not trained here: the weights were imported from {man.imported_from} (sha256 "
                         f"{man.imported_sha256}) with jobs/import_model.py; the parameters above are the "
                         "recorded defaults, not how the model was trained.") if man.imported_from
                   else ("warn", "no epoch finished: metrics.jsonl is missing or empty"))
    return doc


def _accuracy_blocks(inp: dict[str, Any], figs: _Figures, tables: dict) -> list[tuple]:
    ev = inp["eval"]
    doc: list[tuple] = [("h", 2, "2. Accuracy")]
    if ev is None:
        status = inp["manifest"].train.status or "not run"
        return doc + [("warn", f"no eval.json: training did not finish (train stage status: {status})")]
    lacking = [k for k in ("classes", "confusion", "per_class_accuracy", "accuracy") if k not in ev]
    if lacking:
        return doc + [("warn", f"eval.json lacks {', '.join(lacking)}; hint: python jobs/evaluate.py --run RUN")]
    tables["accuracy"] = report.accuracy_table(ev)
    tables["per_class_accuracy"] = report.per_class_table(ev)
    doc += [("table", *tables["accuracy"]), ("h", 3, "Per class"), ("table", *tables["per_class_accuracy"])]
    classes = list(ev["classes"])
    doc.append(figs.add("class_accuracy", figures.class_accuracy(
        classes, [ev["per_class_accuracy"].get(c) for c in classes], ev.get("accuracy")),
        "Validation accuracy per class; the dashed line is the overall accuracy."))
    doc.append(figs.add("confusion_matrix", figures.confusion_matrix(np.asarray(ev["confusion"]), classes),
                        "Confusion matrix on the validation split (rows: true class; colour: share of the row)."))
    return doc


def _filter_blocks(run: RunDir, figs: _Figures) -> list[tuple]:
    doc: list[tuple] = [("h", 2, "3. First-layer filters")]
    try:
        state = checkpoint.load_checkpoint(run.checkpoints)
    except (checkpoint.CheckpointError, OSError) as e:
        return doc + [("warn", f"no checkpoint to draw the filters from: {str(e).split(';')[0]}")]
    w = state["model"]["conv1.weight"].float().numpy()  # (C_out, 3, k, k)
    return doc + [figs.add("conv1_filters", figures.filter_grid(w),
                           f"The {w.shape[0]} conv1 filters ({w.shape[-1]}x{w.shape[-1]}x3), each min-max scaled.")]


def _image_title(data: dict[str, np.ndarray], i: int, classes: list[str]) -> str:
    def name(k: int) -> str:
        return classes[k] if 0 <= k < len(classes) else str(k)
    return (f"image {int(data['index'][i])} of the split: label {name(int(data['label'][i]))}, "
            f"predicted {name(int(data['pred'][i]))}")


def _viz_blocks(viz: dict[str, Any], cfg: AggregateConfig, figs: _Figures, tables: dict) -> list[tuple]:
    if viz["path"] is None:
        why = viz.get("reason") or f"none of the {viz['n_shards']} visualization shards holds images"
        return [("h", 2, "4. Feature maps, deconvnet, inversions"), ("warn", why)]
    path = viz["path"]
    names = store.list_datasets(path)
    attrs = store.read_attrs(path)
    classes = list(attrs.get("class_names", []))
    k = min(cfg.images, viz["n_images"])
    data = store.read_shard(path, ["index", "label", "pred", "images"] + [n for n in names if n.startswith(
        ("act/", "deconv/"))], rows=slice(0, k))
    acts = [n for n in names if n.startswith("act/")]
    doc: list[tuple] = [("h", 2, "4. Feature maps"), ("p", f"Every block's output for the first {k} of "
                        f"{viz['n_images']} visualized images (strongest channels by mean activation).")]
    for i in range(k):
        doc.append(figs.add(f"feature_maps_{i}", figures.block_maps(
            data["images"][i], {n[4:]: data[n][i] for n in acts}, cfg.channels), _image_title(data, i, classes)))
    deconv = [n for n in names if n.startswith("deconv/")]
    doc.append(("h", 2, "5. Deconvnet reconstructions"))
    if deconv:
        doc.append(("p", "Each block's activation projected back to the input with transposed convolutions "
                         "(same kernels), unpooling to the max-pool switches and ReLU on the way back; at "
                         "residual blocks through both branches, the residual branch only or the shortcut only."))
        for i in range(k):
            recs = {tuple(n.split("/")[1:3]): data[n][i] for n in deconv}
            doc.append(figs.add(f"deconv_{i}", figures.deconv_panel(data["images"][i], recs),
                                _image_title(data, i, classes) + "; rows: blocks, columns: paths"))
    else:
        doc.append(("p", "No deconvnet reconstructions were requested (--deconv-blocks none)."))
    return doc + _inversion_blocks(path, names, cfg, figs, tables, viz["n_images"])


def _inversion_blocks(path: Path, names: list[str], cfg: AggregateConfig, figs: _Figures, tables: dict,
                      n_images: int) -> list[tuple]:
    blocks = [n[len("invert/"):] for n in names if n.startswith("invert/")]
    doc: list[tuple] = [("h", 2, "6. Inversions")]
    if not blocks:
        return doc + [("p", "No inversions were requested (--invert-blocks none).")]
    errors = store.read_shard(path, [f"invert_error/{b}" for b in blocks])
    tables["inversion_error"] = report.inversion_table({b: errors[f"invert_error/{b}"] for b in blocks})
    k = min(cfg.invert_images, n_images)
    few = store.read_shard(path, ["images"] + [f"invert/{b}" for b in blocks], rows=slice(0, k))
    doc += [("p", "An input optimised until its activation at the block matches the image's (Mahendran & "
                  "Vedaldi); the error is the relative feature error ||phi(x) - phi0|| / ||phi0||, over all "
                  f"{n_images} images."), ("table", *tables["inversion_error"]),
            figs.add("inversions", figures.inversion_panel(
                few["images"], {b: few[f"invert/{b}"] for b in blocks},
                {b: errors[f"invert_error/{b}"][:k] for b in blocks}),
                "Originals beside their inversions, per block, with the relative feature error under each.")]
    return doc


_EXAMPLES_TEXT = (
    "For every channel of every block: the {k} images of the {n} visualized whose activation peaks highest "
    "(anywhere in the map), as in Zeiler & Fergus 2014, Fig. 2. Each row is one channel: on the left the input "
    "patches under the receptive field of the peak (grey-blue where the field leaves the image), on the right "
    "each peak alone projected back to the pixels by the deconvnet (each tile scaled on its own). The bar is "
    "the channel's class selectivity (mu_max - mu_rest) / (mu_max + mu_rest) of its mean activation per class, "
    "0 = the same for every class, 1 = one class only, with the class it prefers. Shown: the {m} most "
    "class-selective channels of each block; every block's full grid is linked below.")


_GRID_PAGE = 256  # channels per full-grid PNG: 256 rows of 64 px tiles stay far below Agg's 65,536 px limit


def _example_blocks(viz: dict[str, Any], cfg: AggregateConfig, figs: _Figures, tables: dict) -> list[tuple]:
    doc: list[tuple] = [("h", 2, "7. What the channels respond to")]
    path = viz["path"]
    names = set(store.list_datasets(path)) if path is not None else set()
    blocks = [n[len("selectivity/"):] for n in sorted(names) if n.startswith("selectivity/")]
    if not blocks:
        return doc + [("p", "No dataset examples were computed (--topk 0, or no shard holds images).")]
    attrs = store.read_attrs(path)
    order = {b: i for i, b in enumerate(attrs.get("blocks", blocks))}
    blocks.sort(key=lambda b: order.get(b, len(order)))
    classes = list(attrs.get("class_names", []))
    head = store.read_shard(path, [f"topk/{blocks[0]}/index", "class_count"])
    k, n = head[f"topk/{blocks[0]}/index"].shape[1], int(head["class_count"].sum())
    doc.append(("p", _EXAMPLES_TEXT.format(k=k, n=n, m=cfg.example_channels)))
    if viz["missing"]:
        doc.append(("warn", f"the top-{k} lists are over the {n} images of the shards present; "
                            f"{len(viz['missing'])} shard(s) are missing, so they are INCOMPLETE"))
    if viz.get("examples_error") or not any(name.startswith("examples/") for name in names):
        doc.append(("warn", (viz.get("examples_error") or "no projections in viz.h5 (aggregated with "
                             "--no-projections)") + ": the lists and selectivities only where not shown"))
    rows, links = [], []
    for block in blocks:
        projected = f"examples/{block}/patch" in names
        data = store.read_shard(path, [f"selectivity/{block}", f"selective_class/{block}", f"topk/{block}/value"]
                                + ([f"examples/{block}/patch", f"examples/{block}/deconv"] if projected else []))
        sel, top = data[f"selectivity/{block}"], data[f"selective_class/{block}"]
        best = np.argsort(-np.nan_to_num(sel, nan=-1.0), kind="stable")[:cfg.example_channels]
        for c in best:
            name = classes[int(top[c])] if 0 <= int(top[c]) < len(classes) else str(int(top[c]))
            peak = float(data[f"topk/{block}/value"][c, 0])
            rows.append([block, int(c), name, Fixed(float(sel[c]), 3), Fixed(peak, 3)])
        if projected:
            patch, deconv = data[f"examples/{block}/patch"], data[f"examples/{block}/deconv"]
            doc.append(figs.add(f"examples_{block}", figures.examples_grid(
                patch[best], deconv[best], best, sel[best], top[best], classes, block),
                f"{block}: its {len(best)} most class-selective channels.", dpi=100))
            for lo in range(0, len(sel), _GRID_PAGE):  # pages: a PNG is at most 65,536 pixels high
                page = np.arange(lo, min(lo + _GRID_PAGE, len(sel)))
                name = f"examples_{block}_all" + (f"_{lo:04d}" if len(sel) > _GRID_PAGE else "")
                text = f"{block} ({len(sel)} channels)" if len(sel) <= _GRID_PAGE else \
                    f"{block} channels {lo}-{page[-1]}"
                links.append(figs.link(name, figures.examples_grid(patch[page], deconv[page], page, sel[page],
                                                                   top[page], classes, block), text, dpi=100))
    tables["class_selectivity"] = (["block", "channel", "class", "selectivity", "top activation"], rows)
    doc.append(("table", *tables["class_selectivity"]))
    if links:
        doc.append(("links", "Every channel of each block (full grids):", links))
    return doc


_FEATVIZ_TEXT = (
    "Every channel's feature visualization (Olah et al. 2017): an input optimised to excite the channel, with "
    "Lucid's priors (a Fourier parameterisation, colour decorrelation, random jitter, zoom and rotation). The "
    "table gives, per block, the median over its channels of the mean activation each image reaches, and the "
    "steps taken (a channel stops once its activation stops rising). The atlas shows every channel on a card: "
    "its feature visualization, its dataset examples with their projections, and its class statistics.")


def _read_block(path: Path, names: set[str], block: str, rows: dict[int, int], labels: np.ndarray,
                attrs: dict[str, Any]) -> atlas.BlockData:
    """A block's data for the atlas, from viz.h5 (what is there)."""
    want = [n for n in (f"featviz/{block}", f"featviz_value/{block}", f"featviz_steps/{block}",
                        f"examples/{block}/patch", f"examples/{block}/deconv", f"topk/{block}/value",
                        f"topk/{block}/index", f"selectivity/{block}", f"selective_class/{block}",
                        f"class_mean/{block}") if n in names]
    d = {n.replace(f"/{block}", ""): a for n, a in store.read_shard(path, want).items()}  # featviz, topk/index...
    fv, index = d.get("featviz"), d.get("topk/index")
    top_label = None if index is None else np.array([[labels[rows[int(p)]] if int(p) in rows else -1 for p in r]
                                                     for r in index], np.int64)
    channels = next(len(a) for a in (fv, d.get("selectivity"), index) if a is not None)
    return atlas.BlockData(
        block, channels, None if fv is None else atlas.featviz_pixels(fv, attrs["mean"], attrs["std"]),
        d.get("featviz_value"), d.get("featviz_steps"), d.get("examples/patch"), d.get("examples/deconv"),
        d.get("topk/value"), top_label, d.get("selectivity"), d.get("selective_class"), d.get("class_mean"))


def _atlas_blocks(viz: dict[str, Any], tables: dict, run_name: str) -> tuple[list[tuple], dict[str, bytes]]:
    """The report's feature visualization paragraph and table, and the atlas (report/atlas/)."""
    doc: list[tuple] = [("h", 3, "Feature visualization and the atlas")]
    path = viz["path"]
    names = set(store.list_datasets(path)) if path is not None else set()
    shown = {n.split("/")[1] for n in names if n.startswith(("featviz/", "selectivity/"))}
    if not shown:
        return doc + [("p", "No atlas: neither feature visualizations nor dataset examples are in viz.h5.")], {}
    attrs = store.read_attrs(path)
    classes = list(attrs.get("class_names", []))
    order = block_names(build_model(attrs["arch"], max(1, len(classes)), attrs.get("stem", "")))
    blocks = [b for b in order if b in shown]
    per_image = store.read_shard(path, ["index", "label"])
    rows = {int(p): r for r, p in enumerate(per_image["index"])}
    t0 = time.perf_counter()
    files = atlas.atlas_files(blocks, lambda b: _read_block(path, names, b, rows, per_image["label"], attrs),
                              classes, run_name)
    size = sum(len(v) for v in files.values())
    log.info("atlas: %d blocks, %d files, %.1f MiB in %.1f s", len(blocks), len(files), size / 2 ** 20,
             time.perf_counter() - t0)
    fv = [b for b in blocks if f"featviz/{b}" in names]
    if fv:
        values = store.read_shard(path, [f"featviz_{k}/{b}" for b in fv for k in ("value", "steps")])
        tables["featviz"] = (["block", "channels", "median activation", "mean steps"], [
            [b, len(values[f"featviz_value/{b}"]), Fixed(float(np.nanmedian(values[f"featviz_value/{b}"])), 3),
             Fixed(float(np.mean(values[f"featviz_steps/{b}"])), 1)] for b in fv])
        doc += [("p", _FEATVIZ_TEXT), ("table", *tables["featviz"])]
    if viz.get("featviz_error"):
        doc.append(("warn", viz["featviz_error"]))
    return doc + [("links", f"Every channel of {len(blocks)} blocks, card by card ({len(files)} files, "
                            f"{size / 2 ** 20:.1f} MiB):", [("the atlas", "atlas/index.html")])], files


def _pipeline_blocks(inp: dict[str, Any], viz: dict[str, Any]) -> list[tuple]:
    man = inp["manifest"]
    rows = []
    for stage in ("train", "viz", "aggregate"):
        s = man.record(stage)
        ids = getattr(s, "job_ids", None) or ([s.job_id] if s.job_id else [])
        status = "running (this report)" if stage == "aggregate" else (s.status or "not run")
        rows.append([stage, status, ", ".join(map(str, ids)), s.updated])
    doc: list[tuple] = [("h", 2, "8. Pipeline"), ("table", ["stage", "status", "job id(s)", "updated"], rows)]
    if viz["n_shards"]:
        shard_rows = [[f"shard-{s:05d}.h5", viz["sizes"][s], "missing" if s in viz["missing"] else "present",
                       viz["missing"].get(s, "")] for s in range(viz["n_shards"])]
        doc.append(("table", ["shard", "images", "status", "reason"], shard_rows))
    return doc


def _stale_warnings(state: RunState) -> list[tuple]:
    """The items made from another checkpoint than the run's, named at the top of the report."""
    stale = [i for i in state.items if i.state == "stale" and i.name != "report"]
    if not stale:
        return []
    viz = [i for i in stale if i.name.startswith(("viz", "project", "featviz"))]
    made = sorted({(i.detail.split("made from checkpoint ")[-1].split()[0].rstrip(",")) for i in stale
                   if "made from checkpoint " in i.detail})
    what = ", ".join(["eval.json (the accuracy)"] * any(i.name == "eval" for i in stale)
                     + [f"{len(viz)} visualization file(s)"] * bool(viz))
    return [("warn", f"STALE: the run's checkpoint changed (now sha256 {(state.checkpoint_sha256 or 'none')[:12]}); "
                     f"{what} were made from {' and '.join(made) or 'another checkpoint'}: the accuracy, feature maps, "
                     "reconstructions, inversions, dataset examples and feature visualizations below show the old "
                     "weights, the first-layer "
                     "filters the new ones. hint: python jobs/launch_pipeline.py --run RUN --retry-failed redoes them")]


def _warnings(inp: dict[str, Any], viz: dict[str, Any]) -> list[tuple]:
    out = []
    train = inp["manifest"].train
    if train.status != "done":
        error = f": {train.error}" if train.error else ""
        out.append(("warn", f"training stage: {train.status or 'not run'}{error}; see the logs in logs/"))
    v = inp["manifest"].viz
    if v.status == "failed" and v.error:
        out.append(("warn", f"visualization stage: failed: {v.error}"))
    if viz["missing"]:
        out.append(("warn", f"{len(viz['missing'])} of {viz['n_shards']} visualization shards missing, their "
                            "images are not in this report: " + "; ".join(
                                f"shard-{s:05d}.h5: {why}" for s, why in sorted(viz["missing"].items()))
                    + " (hint: jobs/launch_pipeline.py --run RUN --retry-failed)"))
    return out


def build_report(run: RunDir, cfg: AggregateConfig) -> dict[str, Any]:
    """Everything of the report in memory: {doc, figures, atlas (its files), tables, viz, meta, inputs, problems}."""
    inp = read_inputs(run)
    viz = collate_run(run, cfg)
    state = run_state(run)  # after the collation: what the report is made of, verified
    name = run.path.resolve().name
    viz_config = {"viz": inp["plan"].to_dict()["config"]} if inp["plan"] else {}
    meta = {"run": name, "config": {**inp["config"], **viz_config, "aggregate": config_to_dict(cfg)},
            "checkpoint_sha256": state.checkpoint_sha256,  # the filters are drawn from it
            "eval_checkpoint_sha256": (inp["eval"] or {}).get("checkpoint_sha256"),
            "viz_checkpoint_sha256": inp["plan"].checkpoint_sha256 if inp["plan"] else None}
    figs, tables = _Figures(meta, cfg.dpi), cast(dict[str, Any], {})
    atlas_doc, atlas_files = _atlas_blocks(viz, tables, name)
    ev = inp["eval"] or {}
    head = [("h", 1, f"hpcviz report: {name}"),
            ("p", f"Generated {now().replace('T', ' ')} by hpcviz {__version__} from {run}."
                  + "".join(f" {label} accuracy {100 * ev[key]:.2f}%." for label, key in
                            (("Validation", "accuracy"), ("Train", "train_accuracy")) if ev.get(key) is not None)),
            ("p", f"Checkpoint sha256 {state.checkpoint_sha256 or 'unknown'}; dataset fingerprint "
                  f"{inp['manifest'].train.dataset_fingerprint or 'unknown'}.")] \
        + [("links", "Every channel, a card each (feature visualization, dataset examples, classes):",
            [("the atlas", "atlas/index.html")])] * bool(atlas_files)
    doc = head + _stale_warnings(state) + _warnings(inp, viz) + _training_blocks(inp, figs, tables) \
        + _accuracy_blocks(inp, figs, tables) \
        + _filter_blocks(run, figs) + _viz_blocks(viz, cfg, figs, tables) + _example_blocks(viz, cfg, figs, tables) \
        + atlas_doc \
        + _pipeline_blocks(inp, viz) \
        + [("h", 2, "Appendix: configuration"), ("pre", json.dumps(meta["config"], indent=2, sort_keys=True))]
    problems = [f"{i.name} {i.state}: {i.detail}" for i in state.items if not i.ok and i.name != "report"]
    problems += [viz[k] for k in ("examples_error", "featviz_error") if viz.get(k)]
    return {"doc": doc, "figures": figs.png, "tables": tables, "viz": viz, "meta": meta, "problems": problems,
            "atlas": atlas_files,
            "inputs": report_inputs(run, state.plan, state.checkpoint_sha256)}


def _render(built: dict[str, Any], title: str, embed: bool) -> dict[str, bytes]:
    """Every file of report/, by its path inside it."""
    files = {**built["figures"], **built["atlas"]}
    for name, (headers, rows) in built["tables"].items():
        files[f"tables/{name}.csv"] = report.to_csv(headers, rows).encode()
        files[f"tables/{name}.md"] = report.to_markdown(headers, rows).encode()
    files["report.md"] = report.render_markdown(built["doc"]).encode()
    files["report.html"] = report.render_html(built["doc"], title, built["figures"] if embed else None).encode()
    return files


def _replace_dir(final: Path, files: dict[str, bytes]) -> None:
    """Make `final` hold exactly `files`: written into a staging directory beside it (space checked first),
    then swapped in by two renames. A full disk or a kill leaves the previous directory whole; the
    leftovers of a killed run (staging dirs, the old `*.png.tmp-PID` files) are removed first."""
    parent = final.parent
    for stale in [*parent.glob(f"{final.name}.tmp-*"), *parent.glob(f"{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    old_tmp = [p for p in final.rglob("*.tmp-*")] if final.is_dir() else []
    for stale in old_tmp:
        stale.unlink(missing_ok=True)
    check_space(final, sum(len(b) for b in files.values()) + 4096 * len(files))
    staging, old = parent / f"{final.name}.tmp-{os.getpid()}", parent / f"{final.name}.old-{os.getpid()}"
    try:
        for rel, data in files.items():
            write_bytes(staging / rel, data)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def aggregate(cfg: AggregateConfig) -> dict[str, Any]:
    """Write <run>/report/: figures/*.png, tables/*.csv and *.md, report.md, report.html, report.json. The
    manifest's aggregate record is `running` meanwhile and `failed` (with the error) when it fails: a killed or
    failed aggregation never leaves the record of an earlier one `done`."""
    run = RunDir(cfg.run_dir)
    if not run.is_run():
        read_inputs(run)  # the refusal, before the manifest is touched
    run.update("aggregate", status="running", error="")
    try:
        return _aggregate(run, cfg)
    except BaseException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        with contextlib.suppress(Exception):  # a full disk may refuse this too: the error itself matters
            run.update("aggregate", status="failed", error=f"{type(e).__name__}: {first}"[:300])
        raise


def _aggregate(run: RunDir, cfg: AggregateConfig) -> dict[str, Any]:
    built = build_report(run, cfg)
    viz = built["viz"]
    missing = [run.shard(s).name for s in sorted(viz["missing"])]
    summary = {"report": "report/report.html", "figures": sorted(built["figures"]),
               "atlas": "atlas/index.html" if built["atlas"] else None,
               "tables": sorted(built["tables"]), "n_images": viz["n_images"], "missing_shards": missing,
               "missing_reasons": {run.shard(s).name: r for s, r in viz["missing"].items()}, **built["meta"],
               "inputs": built["inputs"], "problems": built["problems"], "complete": not built["problems"]}
    files = _render(built, f"hpcviz report: {built['meta']['run']}", cfg.embed)
    files["report.json"] = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    _replace_dir(run.report_dir, files)
    run.write_config("aggregate", config_to_dict(cfg))
    status = "done" if not built["problems"] else "partial"
    if viz["n_shards"]:
        run.update("viz", status="done" if not missing and viz["path"] is not None else "partial",
                   missing_shards=missing, n_images=viz["n_images"])
    run.update("aggregate", status=status, report=summary["report"], missing_shards=missing,
               error="; ".join(built["problems"])[:300])
    log.info("report: %s (%d figures, %d tables%s)", run.report_dir / "report.html", len(built["figures"]),
             len(built["tables"]), f"; missing shards: {', '.join(missing)}" if missing else "")
    bad = run_state(run).problems()  # the report included: what the run still lacks, verified ('' when whole)
    return {**summary, "report": str(run.report_dir / "report.html"),
            "incomplete": describe_problems(run, bad) if bad else ""}


def check_request(cfg: AggregateConfig) -> None:
    """Before anything is read or written: --projection-device against what is visible here."""
    if cfg.projections:
        dist.check_device(cfg.projection_device, "--projection-device")
