"""The aggregation stage: a run's files -> report/ (figures, tables, report.md, report.html, report.json).

It reads config.json, manifest.json, metrics.jsonl, eval.json, the checkpoint (for the conv1 filters)
and the visualization shards, collating them into viz/viz.h5 first (so a rerun after `--retry-failed`
sees the new shards). It builds what the files allow: a run whose training failed still gets a report
that says so, and every missing shard is named with its reason and, on SLURM, its array task's state.
The report follows the course report: training parameters and curves, accuracy and per-class accuracy,
conv1 filters, feature maps, deconvnet reconstructions by path, inversions with their errors.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, checkpoint, figures, report, store
from .config import config_to_dict

log = logging.getLogger("hpcviz")


class AggregateError(ValueError):
    """The run directory holds nothing to report on."""


@dataclass
class AggregateConfig:
    run_dir: str = ""      # the run directory; the report goes to <run_dir>/report
    images: int = 3        # images shown in the feature-map and deconvnet figures
    invert_images: int = 4  # images in the inversion panel
    channels: int = 8      # strongest channels per block in the feature-map figures
    embed: bool = True     # report.html embeds its figures (self-contained); False: links report/figures/*.png
    dpi: int = 100         # PNG resolution, dots per inch


def read_inputs(run: Path) -> dict[str, Any]:
    """Everything the report is made of that is not HDF5; absent files are None."""
    if not run.is_dir() or not any((run / n).exists() for n in ("config.json", "manifest.json", "checkpoints")):
        raise AggregateError(f"--run {run}: not a run directory (no config.json, manifest.json or checkpoints/); "
                             "hint: train first (jobs/launch_train.py or jobs/launch_pipeline.py)")
    return {"config": checkpoint.read_json(run / "config.json", {}), "manifest": checkpoint.read_json(
        run / "manifest.json", {}), "metrics": checkpoint.read_metrics(run), "eval": checkpoint.read_json(
        run / "eval.json"), "plan": checkpoint.read_json(run / "viz" / "plan.json")}


def _task_states(manifest: dict[str, Any], shards: list[int]) -> dict[int, str]:
    """'array task J_K: STATE' for the latest task of each shard, on SLURM (states from sacct/squeue)."""
    viz = manifest.get("viz", {})
    if viz.get("cluster") != "slurm" or not shards:
        return {}
    from .jobstate import latest_tasks, task_states
    latest = {s: tid for s, tid in latest_tasks(viz.get("tasks", {})).items() if s in shards}
    states = task_states(latest.values())
    return {s: f"array task {tid}: " + states.get(tid, "no record in sacct or squeue: cancelled before it started, "
                                                      "or purged") for s, tid in latest.items()}


def collate_run(run: Path, plan: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    """Collate the plan's shards into viz/viz.h5. Returns {"n_images", "n_shards", "missing": {shard
    number: reason}, "path" (None when no shard holds images)}."""
    if plan is None:
        return {"n_images": 0, "n_shards": 0, "missing": {}, "path": None,
                "reason": "no visualization plan (viz/plan.json): the visualization array did not run"}
    from .viz import shard_path
    paths = [shard_path(run, s) for s in range(len(plan["shards"]))]
    sizes = [len(s) for s in plan["shards"]]
    out = run / "viz" / "viz.h5"
    try:
        summary = store.collate(paths, out, {"plan_checkpoint_sha256": plan["checkpoint_sha256"]}, sizes=sizes)
        by_name = {f"shards/{p.name}": k for k, p in enumerate(paths)}
        missing = {by_name[rel]: reason for rel, reason in summary["missing"].items()}
        n, path = summary["n_images"], out
    except store.StoreError as e:
        if "no complete shard" not in str(e):  # shards that disagree, or viz.h5 cannot be written
            return {"n_images": 0, "n_shards": len(paths), "missing": {}, "path": None, "sizes": sizes,
                    "reason": f"the shards could not be collated: {e}"}
        missing, n, path = {}, 0, None
        for k, p in enumerate(paths):
            try:
                store.verify_shard(p, sizes[k])
            except store.StoreError as e:
                missing[k] = str(e).split(";")[0]
    states = _task_states(manifest, sorted(missing))
    missing = {k: v + (f" ({states[k]})" if k in states else "") for k, v in missing.items()}
    return {"n_images": n, "n_shards": len(paths), "missing": missing, "path": path, "sizes": sizes}


def _png(fig: Any, meta: dict[str, Any], dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": f"hpcviz {__version__}",
                                                      "Description": json.dumps(meta, sort_keys=True)})
    return buf.getvalue()


class _Figures:
    """Collects (name -> PNG bytes, caption); each PNG carries the config that made it."""

    def __init__(self, meta: dict[str, Any], dpi: int) -> None:
        self.meta, self.dpi, self.png, self.caption = meta, dpi, {}, {}

    def add(self, name: str, fig: Any, caption: str) -> tuple:
        rel = f"figures/{name}.png"
        self.png[rel], self.caption[rel] = _png(fig, self.meta, self.dpi), caption
        return ("fig", rel, caption)


def _training_blocks(inp: dict[str, Any], figs: _Figures, tables: dict) -> list[tuple]:
    train = inp["config"].get("train") or (inp["eval"] or {}).get("config") or {}
    man = inp["manifest"].get("train", {})
    labels = {"world_size": "processes (world size)", "device": "device", "host": "host",
              "restarts": "restarts (requeues)"}
    extra = {label: man[k] for k, label in labels.items() if k in man}
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
        doc.append(("warn", "no epoch finished: metrics.jsonl is missing or empty"))
    return doc


def _accuracy_blocks(inp: dict[str, Any], figs: _Figures, tables: dict) -> list[tuple]:
    ev = inp["eval"]
    doc: list[tuple] = [("h", 2, "2. Accuracy")]
    if ev is None:
        status = inp["manifest"].get("train", {}).get("status", "unknown")
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


def _filter_blocks(run: Path, figs: _Figures) -> list[tuple]:
    doc: list[tuple] = [("h", 2, "3. First-layer filters")]
    try:
        state = checkpoint.load_checkpoint(run / "checkpoints")
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


def _pipeline_blocks(inp: dict[str, Any], viz: dict[str, Any]) -> list[tuple]:
    man = inp["manifest"]
    rows = []
    for stage in ("train", "viz", "aggregate"):
        s = man.get(stage, {})
        ids = s.get("job_ids") or ([s["job_id"]] if s.get("job_id") else [])
        status = "running (this report)" if stage == "aggregate" else s.get("status", "not run")
        rows.append([stage, status, ", ".join(map(str, ids)), s.get("updated", "")])
    doc: list[tuple] = [("h", 2, "7. Pipeline"), ("table", ["stage", "status", "job id(s)", "updated"], rows)]
    if viz["n_shards"]:
        shard_rows = [[f"shard-{s:05d}.h5", viz["sizes"][s], "missing" if s in viz["missing"] else "present",
                       viz["missing"].get(s, "")] for s in range(viz["n_shards"])]
        doc.append(("table", ["shard", "images", "status", "reason"], shard_rows))
    return doc


def _warnings(inp: dict[str, Any], viz: dict[str, Any]) -> list[tuple]:
    out = []
    train = inp["manifest"].get("train", {})
    if train.get("status") != "done":
        error = f": {train['error']}" if train.get("error") else ""
        out.append(("warn", f"training stage: {train.get('status') or 'not run'}{error}; see the logs in logs/"))
    v = inp["manifest"].get("viz", {})
    if v.get("status") == "failed" and v.get("error"):
        out.append(("warn", f"visualization stage: failed: {v['error']}"))
    if viz["missing"]:
        out.append(("warn", f"{len(viz['missing'])} of {viz['n_shards']} visualization shards missing, their "
                            "images are not in this report: " + "; ".join(
                                f"shard-{s:05d}.h5: {why}" for s, why in sorted(viz["missing"].items()))
                    + " (hint: jobs/launch_pipeline.py --run RUN --retry-failed)"))
    return out


def build_report(run: Path, cfg: AggregateConfig) -> dict[str, Any]:
    """Everything of the report in memory: {doc, figures, captions, tables, viz, inputs}."""
    inp = read_inputs(run)
    viz = collate_run(run, inp["plan"], inp["manifest"])
    viz_config = {"viz": inp["plan"]["config"]} if inp["plan"] else {}
    meta = {"run": run.resolve().name, "config": {**inp["config"], **viz_config, "aggregate": config_to_dict(cfg)},
            "checkpoint_sha256": (inp["eval"] or {}).get("checkpoint_sha256")}
    figs, tables = _Figures(meta, cfg.dpi), {}
    ev = inp["eval"] or {}
    head = [("h", 1, f"hpcviz report: {run.resolve().name}"),
            ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by hpcviz {__version__} from {run}."
                  + "".join(f" {label} accuracy {100 * ev[key]:.2f}%." for label, key in
                            (("Validation", "accuracy"), ("Train", "train_accuracy")) if ev.get(key) is not None)),
            ("p", f"Checkpoint sha256 {ev.get('checkpoint_sha256') or 'unknown'}; dataset fingerprint "
                  f"{inp['manifest'].get('train', {}).get('dataset_fingerprint', 'unknown')}.")]
    doc = head + _warnings(inp, viz) + _training_blocks(inp, figs, tables) + _accuracy_blocks(inp, figs, tables) \
        + _filter_blocks(run, figs) + _viz_blocks(viz, cfg, figs, tables) + _pipeline_blocks(inp, viz) \
        + [("h", 2, "Appendix: configuration"), ("pre", json.dumps(meta["config"], indent=2, sort_keys=True))]
    return {"doc": doc, "figures": figs.png, "tables": tables, "viz": viz, "meta": meta}


def aggregate(cfg: AggregateConfig) -> dict[str, Any]:
    """Write <run>/report/: figures/*.png, tables/*.csv and *.md, report.md, report.html, report.json."""
    run = Path(cfg.run_dir)
    built = build_report(run, cfg)
    out = run / "report"
    for rel, png in built["figures"].items():
        checkpoint.write_bytes(out / rel, png)
    keep = {out / rel for rel in built["figures"]} | {out / "tables" / f"{t}.{e}" for t in built["tables"]
                                                       for e in ("csv", "md")}
    for old in [*(out / "figures").glob("*.png"), *(out / "tables").glob("*.*")]:
        if old not in keep:  # figures and tables of an earlier report that this one lacks
            old.unlink(missing_ok=True)
    for name, (headers, rows) in built["tables"].items():
        checkpoint.write_bytes(out / "tables" / f"{name}.csv", report.to_csv(headers, rows).encode())
        checkpoint.write_bytes(out / "tables" / f"{name}.md", report.to_markdown(headers, rows).encode())
    title = f"hpcviz report: {run.resolve().name}"
    checkpoint.write_bytes(out / "report.md", report.render_markdown(built["doc"]).encode())
    checkpoint.write_bytes(out / "report.html", report.render_html(
        built["doc"], title, built["figures"] if cfg.embed else None).encode())
    viz = built["viz"]
    missing = [f"shard-{s:05d}.h5" for s in sorted(viz["missing"])]
    summary = {"report": str(out / "report.html"), "figures": sorted(built["figures"]),
               "tables": sorted(built["tables"]), "n_images": viz["n_images"], "missing_shards": missing,
               "missing_reasons": {f"shard-{s:05d}.h5": r for s, r in viz["missing"].items()}, **built["meta"]}
    checkpoint.write_json(out / "report.json", summary)
    status = "done" if not missing and viz["path"] is not None else "partial"
    if viz["n_shards"]:
        checkpoint.update_manifest(run, "viz", status=status, missing_shards=missing, n_images=viz["n_images"])
    checkpoint.update_manifest(run, "aggregate", status=status, report=str(out / "report.html"),
                               missing_shards=missing)
    log.info("report: %s (%d figures, %d tables%s)", out / "report.html", len(built["figures"]),
             len(built["tables"]), f"; missing shards: {', '.join(missing)}" if missing else "")
    return summary
