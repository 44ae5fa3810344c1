"""Rich renderings of what is in a run directory or an hpcviz HDF5 file; never dumps data.

Used by jobs/inspect_results.py. HDF5 is read only through hpcviz.store (the h5py importer);
the run's small JSON files are read with the stdlib.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .. import store
from ..errors import InputError
from ..files import fmt_bytes
from ..rundir import Plan, RunDir
from ..train import checkpoint
from ..viz.featviz_parts import plan_featviz_parts, stale_featviz
from ..viz.plan import shard_problem
from ..viz.projection import part_states, plan_parts, stale_parts
from .figures import examples_grid, image_grid
from .render import terminal_text

__all__ = ["render_tree", "render_stats", "summarize_run", "channel_examples", "projection_problem",
           "featviz_problem", "render_channel", "run_of"]

NOT_RUN = "not run yet"
_MAX_SHARD_ROWS = 20  # above this, the shard table lists only the shards with a problem


def _text(text: Any, style: str = "") -> Text:
    """Text from a run shown as written: a rich Text (never markup, which a class or file name such as `[/]`
    would crash, or `[red]a` restyle) with its control characters escaped (report.terminal_text)."""
    return Text(terminal_text(text), style)


def _row(table: Table, *cells: Any, style: str | None = None) -> None:
    table.add_row(*(_text(c) for c in cells), style=style)


def _fmt(value: Any) -> str:
    """A short display form: 4 significant digits for floats, lists and dicts on one line."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _dataset_label(obj: dict[str, Any]) -> Text:
    label = Text.assemble((terminal_text(obj["name"].rsplit("/", 1)[-1]), "bold"), "  ", (str(obj["shape"]), "cyan"),
                          " ", (obj["dtype"], "green"))
    if obj["dims"] and any(obj["dims"]):
        label.append(terminal_text("  dims " + "×".join(d or "?" for d in obj["dims"])))
    if obj["is_virtual"]:
        label.append(f"  virtual over {obj['sources']} file(s)", "magenta")
    elif obj["chunks"]:
        label.append(f"  chunks {obj['chunks']}")
    if obj["compression"]:
        opts = f" {obj['compression_opts']}" if obj["compression_opts"] is not None else ""
        label.append(f"  {obj['compression']}{opts}" + (" +shuffle" if obj["shuffle"] else ""), "yellow")
    if obj["is_scale"]:
        label.append("  (dimension scale)", "dim")
    elif obj["scales"] and obj["scales"][0]:
        label.append(terminal_text(f"  dim 0 → {', '.join(obj['scales'][0])}"), "dim")
    stored = f", {fmt_bytes(obj['storage_bytes'])} stored" if obj["storage_bytes"] and not obj["is_virtual"] else ""
    label.append(f"  {fmt_bytes(obj['nbytes'])}{stored}", "dim")
    return label


def render_tree(desc: dict[str, Any]) -> Tree:
    """The tree of store.describe(path): root attrs, then groups and datasets with their key attrs."""
    tree = Tree(Text.assemble((terminal_text(desc["path"]), "bold"), f"  {fmt_bytes(desc['file_bytes'])}"))
    if desc["attrs"]:
        attrs = tree.add(_text("attrs", "bold"))
        for key, value in desc["attrs"].items():
            attrs.add(_text(f"{key} = {_fmt(value)}"))
    nodes: dict[str, Tree] = {"": tree}
    for obj in desc["objects"]:  # sorted by name, so a group comes before its members
        parent = nodes.get(obj["name"].rpartition("/")[0], tree)
        if obj["kind"] == "group":
            nodes[obj["name"]] = parent.add(_text(obj["name"].rsplit("/", 1)[-1] + "/", "bold blue"))
            continue
        node = parent.add(_dataset_label(obj))
        for key, value in obj["attrs"].items():
            node.add(_text(f"{key} = {_fmt(value)}", "dim"))
    return tree


def render_stats(stats: dict[str, Any]) -> Group:
    """store.dataset_stats(...) as a heading line and a two-column table."""
    where = f"image {stats['index']}" if stats["index"] is not None else "whole dataset"
    table = Table(show_header=False)
    table.add_column("statistic", style="bold")
    table.add_column("value", justify="right")
    for key in ("min", "max", "mean", "std"):
        _row(table, key + " (finite)", "—" if stats[key] is None else f"{stats[key]:.6g}")
    for key in ("count", "finite", "nan", "inf", "zeros"):
        _row(table, key, f"{stats[key]:,}")
    return Group(_text(f"{stats['name']}: {where}, {stats['dtype']} {tuple(stats['shape'])}", "bold"), table)


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(content, None), or (None, why not) for a missing or unreadable file."""
    if not path.is_file():
        return None, NOT_RUN
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"


def _stages(run: Path) -> RenderableType:
    manifest, why = _read_json(run / "manifest.json")
    if not isinstance(manifest, dict) or not manifest:
        return _text(f"stages: {why or NOT_RUN} (manifest.json)")
    table = Table(title="stages (manifest.json)", title_justify="left")
    for column in ("stage", "status", "updated", "job", "details"):
        table.add_column(column)
    for stage, info in manifest.items():
        info = info if isinstance(info, dict) else {"status": info}
        shown = sorted((k for k, v in info.items() if k not in ("status", "updated", "job_id")
                        and isinstance(v, (int, float, str)) and len(str(v)) <= 40),
                       key=lambda k: "accuracy" not in k)  # accuracies first, then the rest in file order
        details = [f"{k}={_fmt(info[k])}" for k in shown[:6]]
        _row(table, stage, info.get("status", "?"), info.get("updated", ""), info.get("job_id", ""), " ".join(details))
    return table


def _config_and_accuracy(run: Path) -> list[RenderableType]:
    lines = []
    config, why = _read_json(run / "config.json")
    for stage, cfg in (config or {}).items():
        if isinstance(cfg, dict):
            keys = ("arch", "data", "epochs", "image_size", "batch_size", "split", "images", "tasks")
            lines.append(f"config {stage}: " + " ".join(f"{k}={_fmt(cfg[k])}" for k in keys if k in cfg))
    if config is None:
        lines.append(f"config: {why} (config.json)")
    for path in [run / "eval.json", *sorted(run.glob("eval-*.json"))]:
        result, why = _read_json(path)
        if isinstance(result, dict) and "accuracy" in result:
            extra = f", train {100 * result['train_accuracy']:.2f}%" if "train_accuracy" in result else ""
            lines.append(f"accuracy ({path.name}, {result.get('split', '?')}): {100 * result['accuracy']:.2f}% "
                         f"of {result.get('n', '?')} images{extra}")
        else:
            lines.append(f"accuracy: {why or 'no accuracy field'} ({path.name})")
    return [_text(line) for line in lines]


def _shard_status(path: Path) -> tuple[str, str]:
    try:
        attrs = store.verify_shard(path)
        return "complete", str(attrs.get("n", "?"))
    except store.StoreError as e:
        return getattr(e, "problem", str(e)), ""


def _plan(run: RunDir) -> tuple[Plan | None, str]:
    try:
        return run.plan(), ""
    except InputError as e:
        return None, str(e).split(";")[0]


def _shards(run: RunDir) -> list[RenderableType]:
    """Every shard of the plan (present and this plan's, or why not), and files that are not the plan's."""
    folder = run.shards_dir
    files = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    temps = sorted(folder.glob("*.h5.tmp-*")) if folder.is_dir() else []
    plan, why = _plan(run)
    if not files and not temps and plan is None:
        return [_text(f"visualization shards: {why or NOT_RUN} (viz/shards/)")]
    status: dict[str, tuple[str, str]] = {}
    if plan is not None:
        for k, positions in enumerate(plan.shards):
            problem = shard_problem(run, k, plan)
            status[run.shard(k).name] = (problem or "complete", str(len(positions)))
    for p in files:
        if p.name not in status:
            status[p.name] = ("not in the plan (viz/plan.json): ignored", "") if plan else _shard_status(p)
    done = sum(s == "complete" for s, _ in status.values())
    head = (f"visualization shards: {done} complete of {len(plan.shards)} planned (viz/plan.json)" if plan is not None
            else f"visualization shards: {done} complete of {len(files)} file(s), no plan "
                 f"({why or 'viz/plan.json ' + NOT_RUN})")
    table = Table()
    for column in ("shard", "status", "images"):
        table.add_column(column)
    for name, (state, n) in status.items():
        if len(status) <= _MAX_SHARD_ROWS or state != "complete":
            _row(table, name, state, n, style=None if state == "complete" else "red")
    for tmp in temps:
        _row(table, tmp.name, "temp file: its writer is running or was killed", "", style="yellow")
    return [_text(head, "bold"), table]


def _viz(run: RunDir) -> RenderableType:
    """viz.h5 as it is now: its images, and every shard it reads that is gone or changed since."""
    path = run.viz_file
    if not path.is_file():
        return _text("viz/viz.h5: not collated yet")
    try:
        attrs = store.read_attrs(path)
    except store.StoreError as e:
        return _text(f"viz/viz.h5: {getattr(e, 'problem', e)}", "red")
    missing = list(attrs.get("missing_shards") or [])
    sources = [run.viz_dir / s for s in attrs.get("shards") or []]
    gone = [s.name for s in sources if not s.is_file()]
    newer = [s.name for s in sources if s.is_file() and s.stat().st_mtime > path.stat().st_mtime]
    complete = attrs.get("complete") and not gone and not newer
    line = f"viz/viz.h5: {attrs.get('n_images', '?')} images from {len(sources)} shard(s), "
    line += "complete" if complete else "INCOMPLETE"
    if missing:
        line += f"; left out when collated: {', '.join(Path(m).name for m in missing[:5])}"
    if gone:
        line += f"; MISSING since: {', '.join(gone[:5])} (reading it fails); hint: --retry-failed, or collate again"
    if newer:
        line += f"; STALE: {', '.join(newer[:5])} newer than viz.h5, collate again (jobs/aggregate.py)"
    return _text(line, "green" if complete else "yellow")


def _projections(run: RunDir) -> list[RenderableType]:
    """Every projection part of the plan (viz/examples/part-*.h5): done, missing or stale, and what it holds."""
    plan, _ = _plan(run)
    if plan is None or not plan.topk:
        return []
    if not run.viz_file.is_file():
        return [_text("projection parts: waiting for viz/viz.h5 (they follow its merged top-k lists)")]
    try:
        states = part_states(run, plan)
    except (store.StoreError, InputError) as e:
        return [_text(f"projection parts: unreadable: {getattr(e, 'problem', e)}", "red")]
    done = sum(state == "done" for _, state, _ in states)
    table = Table()
    for column in ("part", "status", "holds"):
        table.add_column(column)
    for i, state, detail in states:
        if len(states) <= _MAX_SHARD_ROWS or state != "done":
            _row(table, run.examples_part(i).name, state, detail, style=None if state == "done" else "red")
    head = f"projection parts: {done} done of {len(states)} (viz/examples/)"
    return [_text(head, "bold" if done == len(states) else "yellow"), table]


def summarize_run(run_dir: str | Path) -> Group:
    """Stages and their status, config, accuracy, visualization shards and viz.h5 of a run directory;
    every file that does not exist yet is reported as 'not run yet'."""
    run = RunDir(run_dir)
    report = run.report_dir / "report.md"
    parts: list[RenderableType] = [_text(f"run {run}", "bold"), _stages(run.path), *_config_and_accuracy(run.path),
                                   *_shards(run), _viz(run), *_projections(run),
                                   _text(f"report: {report if report.is_file() else NOT_RUN}")]
    return Group(*parts)


def run_of(path: str | Path) -> RunDir | None:
    """The run directory a viz.h5 belongs to (RUN/viz/viz.h5), or None for a file elsewhere."""
    p = Path(path).absolute()
    if p.name == "viz.h5" and p.parent.name == "viz":
        run = RunDir(p.parent.parent)
        return run if run.is_run() else None
    return None


def channel_examples(path: str | Path, block: str, channel: int, run: RunDir | None = None) -> dict[str, Any]:
    """One channel's dataset examples from viz.h5: its top-k (value, split position, class, prediction, (y, x),
    receptive field), selectivity and preferred class, and its patches and projections when aggregated and,
    with the `run` viz.h5 belongs to, this run's (else "not_projected" says why they are not shown); and its
    feature visualization ("featviz": image, value, steps; else "no_featviz" says why)."""
    names = store.list_datasets(path)
    blocks = [n.split("/")[1] for n in names if n.startswith("topk/") and n.endswith("/value")]
    drawn = [n.split("/")[1] for n in names if n.startswith("featviz/")]
    if not blocks and not drawn:
        raise InputError(f"{path}: holds no dataset examples and no feature visualizations (visualized with --topk 0 "
                         "and --featviz-blocks none, or collated before they existed); hint: launch the visualization "
                         "again with --topk 9 (jobs/launch_viz.py --fresh)")
    if block not in blocks + drawn:
        why = featviz_problem(run, block, channel, False) if run is not None else None
        if why and not why.startswith("not requested"):  # the run's own block, its parts not presentable
            raise InputError(f"--block {block}: its feature visualization is not shown: {why}")
        valid = list(dict.fromkeys(blocks + drawn))
        raise InputError(f"--block {block!r}: not a block with dataset examples or feature visualizations; valid: "
                         f"{', '.join(valid)}; hint: e.g. --block {valid[-1]}")
    attrs = store.read_attrs(path)
    c = store.read_shard(path, [f"topk/{block}/value" if block in blocks else f"featviz_value/{block}"]).popitem()[1]
    if isinstance(channel, bool) or not 0 <= channel < len(c):
        raise InputError(f"--channel {channel}: {block} has channels 0..{len(c) - 1}; hint: e.g. --channel 0")
    out: dict[str, Any] = {"block": block, "channel": channel, "classes": list(attrs.get("class_names", [])),
                           "complete": bool(attrs.get("complete")), "n_images": attrs.get("n_images")}
    if block in blocks:
        out.update(_examples(path, names, block, channel, run))
    why = featviz_problem(run, block, channel, block in drawn) if run is not None else (
        None if block in drawn else "not in this file (--featviz-blocks, or not computed yet)")
    if why:
        out["no_featviz"] = why
    else:
        x = store.read_image(path, f"featviz/{block}", channel)  # (3, H, W), normalised input space
        info = store.read_shard(path, [f"featviz_value/{block}", f"featviz_steps/{block}"])
        meta = next(o["attrs"] for o in store.describe(path)["objects"] if o["name"] == f"featviz/{block}")
        out["featviz"] = {"x": x, "value": float(info[f"featviz_value/{block}"][channel]),
                          "steps": int(info[f"featviz_steps/{block}"][channel]), "max_steps": meta.get("max_steps"),
                          "mean": attrs.get("mean", [0.0] * 3), "std": attrs.get("std", [1.0] * 3)}
    return out


def _examples(path: str | Path, names: list[str], block: str, channel: int, run: RunDir | None) -> dict[str, Any]:
    """The dataset examples part of `channel_examples`."""
    lists = store.read_shard(path, [f"topk/{block}/{f}" for f in ("value", "index", "y", "x")]
                             + [f"selectivity/{block}", f"selective_class/{block}"])
    index = lists[f"topk/{block}/index"][channel]
    rows_of = {int(p): r for r, p in enumerate(store.read_shard(path, ["index"])["index"])}
    per_image = store.read_shard(path, ["label", "pred"], rows=[rows_of[int(p)] for p in index])
    out = {"value": lists[f"topk/{block}/value"][channel], "index": index,
           "y": lists[f"topk/{block}/y"][channel], "x": lists[f"topk/{block}/x"][channel],
           "label": per_image["label"], "pred": per_image["pred"],
           "selectivity": float(lists[f"selectivity/{block}"][channel]),
           "selective_class": int(lists[f"selective_class/{block}"][channel])}
    presented = f"examples/{block}/patch" in names
    why = projection_problem(run, block, channel, presented) if run is not None else (
        None if presented else "not in this file (aggregated with --no-projections, or not yet)")
    if why:
        out["not_projected"] = why
    else:  # the channel's row only: a block's examples can be large
        out.update({f: store.read_image(path, f"examples/{block}/{f}", channel) for f in ("patch", "deconv", "box")})
    return out


def featviz_problem(run: RunDir, block: str, channel: int | None, presented: bool) -> str | None:
    """Why viz.h5's feature visualizations of `block` (its `channel`; None: any) are not to be shown, or None: the
    part that holds them must be current (featviz_parts' digest: the checkpoint, the featviz config, the
    channels), or a part copied from another run would be read as this run's."""
    plan, why = _plan(run)
    if plan is None:
        return f"no visualization plan to check them against ({why or 'viz/plan.json ' + NOT_RUN})"
    if block not in plan.featviz_blocks:
        return f"not requested for {block} (--featviz-blocks {','.join(plan.featviz_blocks) or 'none'})"
    parts = plan_featviz_parts(run, plan)
    mine = [i for i, p in enumerate(parts) if any(b == block and (channel is None or lo <= channel < hi)
                                                  for b, lo, hi in p)]
    stale = [i for i in stale_featviz(run, plan) if i in mine]
    if not stale:
        return None if presented else "not in viz.h5 yet; hint: python jobs/aggregate.py --run RUN presents them"
    part = run.featviz_part(stale[0])
    return (f"{run.rel(part)} is missing" if not part.is_file() else f"{run.rel(part)} is not this run's feature "
            "visualization part (its digest does not match this run's checkpoint and featviz config: copied from "
            "another run, or made for another request)") + "; hint: python jobs/aggregate.py --run RUN computes it"


def projection_problem(run: RunDir, block: str, channel: int | None, presented: bool) -> str | None:
    """Why viz.h5's projections of `block` (its `channel`; None: any) are not to be shown, or None: the part
    that holds them must be current, as the aggregation judges it (collation.stale_parts: the digest of the
    checkpoint, the request and the channels' merged lists), or a part copied from another run would be read as
    this run's. When viz.h5 presents none, the cause: a changed checkpoint, parts missing or stale, or none made."""
    plan, why = _plan(run)
    if plan is None:
        return f"no visualization plan to check them against ({why or 'viz/plan.json ' + NOT_RUN})"
    parts = plan_parts(run, plan)
    mine = [i for i, (b, lo, hi) in enumerate(parts) if b == block and (channel is None or lo <= channel < hi)]
    stale = [i for i in stale_parts(run, plan) if i in mine]
    if presented and stale:
        part = run.examples_part(stale[0])
        return (f"{run.rel(part)} is missing" if not part.is_file() else f"{run.rel(part)} is not this run's "
                "projection part (its digest does not match this run's checkpoint and lists: copied from another "
                "run, or made for other lists)") + "; hint: python jobs/aggregate.py --run RUN computes it again"
    if presented:
        return None
    ckpt = run.path / plan.checkpoint
    if ckpt.is_file() and checkpoint.sha256_file(ckpt) != plan.checkpoint_sha256:
        return (f"{run.rel(ckpt)} changed since the visualization was planned: the projections would show other "
                "weights than the shards, so none are made; hint: launch the visualization again "
                "(jobs/launch_viz.py --fresh), then aggregate")
    if stale:
        return (f"{len(stale)} projection part(s) of {block} are missing or stale (e.g. "
                f"{run.rel(run.examples_part(stale[0]))}); hint: python jobs/aggregate.py --run RUN computes them")
    return "not in viz.h5 (aggregated with --no-projections); hint: python jobs/aggregate.py --run RUN presents them"


def render_channel(ex: dict[str, Any]) -> Group:
    """What `inspect_results.py RUN --block B --channel C` prints: the top-k table, the class selectivity, the
    feature visualization's activation and steps."""
    def name(k: int) -> str:
        return ex["classes"][k] if 0 <= k < len(ex["classes"]) else str(k)
    parts: list[RenderableType] = []
    if "index" in ex:
        table = Table(title=_text(f"{ex['block']} channel {ex['channel']}: its top {len(ex['index'])} of "
                                 f"{ex['n_images']} images"), title_justify="left")
        for col in ("rank", "activation", "image", "class", "predicted", "(y, x)", "receptive field (y0:y1, x0:x1)"):
            table.add_column(col, justify="right" if col in ("rank", "activation", "image") else "left")
        for r in range(len(ex["index"])):
            box = ex["box"][r] if "box" in ex else None
            _row(table, r, f"{float(ex['value'][r]):.4g}", int(ex["index"][r]), name(int(ex["label"][r])),
                 name(int(ex["pred"][r])), f"({int(ex['y'][r])}, {int(ex['x'][r])})",
                 f"{box[0]}:{box[2]}, {box[1]}:{box[3]}" if box is not None else "(not projected)")
        note = "" if ex["complete"] else "  INCOMPLETE: shards were missing when collated"
        parts += [table, _text(f"class selectivity {ex['selectivity']:.3f}, prefers {name(ex['selective_class'])}"
                               f"{note}", "yellow" if note else "")]
        if "not_projected" in ex:
            parts.append(_text(f"projections not shown: {ex['not_projected']}", "yellow"))
    else:
        parts.append(_text(f"{ex['block']} channel {ex['channel']}: no dataset examples (--topk 0)"))
    fv = ex.get("featviz")
    if fv is not None:
        most = f" (at most {fv['max_steps']})" if fv.get("max_steps") else ""
        parts.append(_text(f"feature visualization: mean activation {fv['value']:.4g} after {fv['steps']} steps{most}"))
    else:
        parts.append(_text(f"feature visualization not shown: {ex['no_featviz']}", "yellow"))
    return Group(*parts)


def _featviz_tile(fv: dict[str, Any], height: int) -> Image.Image:
    """The feature visualization as pixels, enlarged (nearest) to about `height`."""
    m, s = np.asarray(fv["mean"], np.float32).reshape(3, 1, 1), np.asarray(fv["std"], np.float32).reshape(3, 1, 1)
    pixels = np.round(255 * np.clip(np.nan_to_num(fv["x"] * s + m), 0, 1)).astype(np.uint8).transpose(1, 2, 0)
    scale = max(1, height // pixels.shape[0])
    return Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)


def channel_png(ex: dict[str, Any]) -> bytes:
    """The channel's feature visualization (left) beside its patches and projections (channel_examples), one
    row, as PNG bytes; either alone when the other was not asked for. A block with dataset examples whose
    projections cannot be drawn (another run's part, a changed checkpoint, not aggregated) is refused, saying
    why: never a picture that silently lacks them."""
    if "not_projected" in ex:  # the block has dataset examples whose projections cannot be drawn: say why
        why = ex["not_projected"]
        raise InputError(f"--png: no projections of {ex['block']} channel {ex['channel']} to draw: {why}"
                         + ("" if "hint:" in why else "; hint: python jobs/aggregate.py --run RUN, then again"))
    if "patch" not in ex and "featviz" not in ex:
        why = ex.get("no_featviz") or ""
        raise InputError(f"--png: no projections or feature visualization of {ex['block']} channel {ex['channel']} "
                         f"to draw: {why}" + ("" if "hint:" in why else "; hint: python jobs/aggregate.py --run RUN, "
                                                                         "then again"))
    grid: Image.Image | None = None
    if "patch" in ex:
        fig = examples_grid(ex["patch"][None], ex["deconv"][None], np.array([ex["channel"]]),
                            np.array([ex["selectivity"]]), np.array([ex["selective_class"]]), ex["classes"],
                            ex["block"])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        grid = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if "featviz" in ex:
        tile = _featviz_tile(ex["featviz"], grid.height - 16 if grid is not None else 128)
        if grid is None:
            grid = tile
        else:
            both = Image.new("RGB", (tile.width + 8 + grid.width, max(tile.height, grid.height)), "white")
            both.paste(tile, (0, (both.height - tile.height) // 2))
            both.paste(grid, (tile.width + 8, 0))
            grid = both
    out = io.BytesIO()
    assert grid is not None  # one of the two, checked above
    grid.save(out, format="PNG")
    return out.getvalue()


def dataset_png(path: Path, name: str, index: int | None, max_items: int) -> bytes:
    """Image `index` of dataset `name` (or the first images of an RGB dataset when no index) as PNG bytes."""
    first = store.read_image(path, name, 0 if index is None else index)
    feature_maps = name.strip("/").startswith("act/")
    if first.ndim != 3 or (not feature_maps and first.shape[0] != 3):
        raise InputError(f"--png: {name} holds {first.shape} per image; valid: (3, H, W) images (images, "
                         "deconv/*, invert/*) or (C, h, w) maps (act/*); hint: drop --png to see its statistics")
    if index is None and not feature_maps:
        data = store.read_shard(path, [name], slice(0, max_items))[name]  # (n, 3, H, W)
        title = name
    else:
        data, title = first, f"{name}[{0 if index is None else index}]"  # (C, h, w) or (3, H, W)
    buf = io.BytesIO()
    image_grid(data, title=title, max_items=max_items, rgb=not feature_maps).savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def check_examples(target: Path, dataset: str, index: int | None) -> None:
    """A run's viz.h5 presents its projection and featviz parts: refuse to read one that is not this run's (as
    for --block)."""
    parts = dataset.strip("/").split("/")
    run = run_of(target)
    if run is not None and parts[0] in ("featviz", "featviz_value", "featviz_steps") and len(parts) == 2:
        why = featviz_problem(run, parts[1], index, presented=True)
        if why:
            raise InputError(f"{dataset}: {why}")
    if run is None or parts[0] != "examples" or len(parts) < 3:
        return
    why = projection_problem(run, parts[1], None if parts[2] == "grid" else index, presented=True)
    if why:
        raise InputError(f"{dataset}: {why}")
