"""write_view: viz.h5 (``hpcviz-viz-v1``), one virtual view over the shards."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._common import (
    StoreError,
    _datasets,
    _get_attrs,
    _open,
    _per_image,
    _set_attrs,
    _write_arrays,
    atomic_path,
    tag_nxdata,
)
from .shards import _SHARD_HINT, _SHARD_RESERVED, SHARD_FORMAT, _shard_problem, read_summaries

VIZ_FORMAT = "hpcviz-viz-v1"
# collate refuses to mix shards that disagree on these root attrs (other model, request or image set)
AGREE_ATTRS = ("checkpoint_sha256", "arch", "stem", "image_size", "class_names", "split", "blocks")


# ============================================================ collate: one virtual view over the shards
def _layout(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], list[str], dict[str, Any]]]:
    with _open(path, "shard", _SHARD_HINT) as (f, _):
        return {name: (ds.dtype, ds.shape, [d.label for d in ds.dims], _get_attrs(ds)) for name, ds in _datasets(f)
                if _per_image(ds)}


Arrays = Mapping[str, tuple[np.ndarray, Sequence[str], Mapping[str, Any]]]  # name -> (array, dims, attrs)
Reduce = Callable[[list[dict[str, np.ndarray]], dict[str, str]], Arrays]


def write_arrays(path: str | os.PathLike, arrays: Arrays, attrs: Mapping[str, Any]) -> None:
    """A small HDF5 file of whole arrays (e.g. a projection part), written atomically, NXdata-tagged."""
    where = f"write {os.fspath(path)}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path), needed=sum(a.nbytes for a, _, _ in arrays.values()) + 2 ** 20) as tmp, \
            h5py.File(tmp, "w", libver=("v110", "v110")) as f:
        _write_arrays(f, arrays, where)
        _set_attrs(f, attrs, where)
        tag_nxdata(f)


def _attach(f: h5py.File, paths: Sequence[Path], out: Path, where: str) -> None:
    """The datasets of `paths` in `f`, as virtual datasets under their own names; a name found in several
    files is their concatenation along axis 0, in the order given (e.g. a block's channels in parts)."""
    meta: dict[str, tuple[list[str], dict[str, Any]]] = {}
    shapes: dict[str, list[tuple[str, tuple[int, ...], np.dtype]]] = {}
    for path in paths:
        rel = Path(os.path.relpath(Path(path).absolute(), out.parent)).as_posix()
        with _open(path) as (src, _):
            for name, ds in _datasets(src):
                shapes.setdefault(name, []).append((rel, ds.shape, ds.dtype))
                meta.setdefault(name, ([d.label for d in ds.dims], _get_attrs(ds)))
    for name, parts in shapes.items():
        rest, dtype = parts[0][1][1:], parts[0][2]
        if any(s[1:] != rest or d != dtype for _, s, d in parts):
            raise StoreError(f"{where}: {name} has other shapes or types in {[r for r, _, _ in parts]}; "
                             "hint: compute those parts again")
        layout = h5py.VirtualLayout(shape=(sum(s[0] for _, s, _ in parts), *rest), dtype=dtype)
        pos = 0
        for rel, shape, _ in parts:
            layout[pos:pos + shape[0]] = h5py.VirtualSource(rel, name, shape=shape)
            pos += shape[0]
        v = f.create_virtual_dataset(name, layout)
        labels, attrs = meta[name]
        for axis, label in enumerate(labels):
            v.dims[axis].label = label
        _set_attrs(v, attrs, f"{where}: {name}")


def _mismatch(ref: dict, other: dict, ref_root: dict, root: dict) -> str | None:
    if set(ref) != set(other):
        return f"datasets differ (extra: {sorted(set(other) - set(ref))}, lacking: {sorted(set(ref) - set(other))})"
    for name, (dtype, shape, _, _) in ref.items():
        if other[name][0] != dtype or other[name][1][1:] != shape[1:]:
            return f"{name} is {other[name][0]} (n, *{other[name][1][1:]}), expected {dtype} (n, *{shape[1:]})"
    return next((f"root attr {k}={root.get(k)!r:.60} differs from {ref_root.get(k)!r:.60}"
                 for k in AGREE_ATTRS if root.get(k) != ref_root.get(k)), None)


def _virtual(f: h5py.File, name: str, meta: tuple, present: list[tuple[str, dict, dict]], where: str) -> None:
    dtype, shape, dims, attrs = meta
    rest, total = shape[1:], sum(root["n"] for _, root, _ in present)
    layout = h5py.VirtualLayout(shape=(total, *rest), dtype=dtype)  # (N, *rest), N = sum over present shards
    pos = 0
    for rel, root, _ in present:
        if root["n"]:
            layout[pos:pos + root["n"]] = h5py.VirtualSource(rel, name, shape=(root["n"], *rest))
        pos += root["n"]
    # every row maps to a shard; should a shard vanish later, its rows read as NaN / -1 rather than as data
    fill = np.nan if dtype.kind == "f" else (-1 if dtype.kind == "i" else 0)
    ds = f.create_virtual_dataset(name, layout, fillvalue=fill)
    for axis, label in enumerate(dims):
        ds.dims[axis].label = label
    if "fp16_overflow" in attrs:
        attrs = {**attrs, "fp16_overflow": sum(lay[name][3].get("fp16_overflow", 0) for _, _, lay in present)}
    _set_attrs(ds, attrs, f"{where}: {name}")


def _view_attrs(present: list[tuple[str, dict, dict]], missing: dict[str, str], n_images: int) -> dict[str, Any]:
    """viz.h5's root attrs: those every present shard shares, and which shards it presents or misses."""
    ref_root = present[0][1]
    common = {k: v for k, v in ref_root.items() if all(r.get(k) == v for _, r, _ in present)}
    return {**{k: v for k, v in common.items() if k not in _SHARD_RESERVED},
            "format": VIZ_FORMAT, "shard_format": SHARD_FORMAT, "n": n_images, "n_images": n_images,
            "shards": [rel for rel, _, _ in present], "missing_shards": list(missing),
            "shard_created": [str(root.get("created", "")) for _, root, _ in present], "missing_reasons": missing,
            "varying_attrs": sorted(set(ref_root) - set(common) - set(_SHARD_RESERVED)), "complete": not missing}


def write_view(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
            attrs: Mapping[str, Any] | None = None, sizes: Sequence[int] | None = None,
            excluded: Mapping[str | os.PathLike, str] | None = None, reduce: Reduce | None = None,
            attach: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Present every complete shard of `shard_paths` (the expected ones, in order) as one virtual file.

    Sources are named relative to out_path's directory, so the run directory can be moved. Missing or
    incomplete shards are left out (N = images in the present shards) and listed in missing_shards, as
    are shards whose image count differs from `sizes` (the planned count per shard), when given, and
    the shards the caller left out itself (`excluded`: path -> reason, e.g. another plan's shard).
    `reduce(summaries, missing)`: the present shards' summary datasets ({name: array} each, from
    read_summaries) merged into datasets of viz.h5 ({name: (array, dims, attrs)}); `attach`: files whose
    datasets viz.h5 also presents, virtually, under their own names (e.g. the projection parts, whose
    datasets of one name are concatenated along their first axis).
    Returns {"n_images", "present": [relative names], "missing": {relative name: reason}}.
    """
    out = Path(out_path).absolute()
    where = f"collate {os.fspath(out_path)}"
    present, missing = [], {}
    for p, reason in (excluded or {}).items():
        missing[Path(os.path.relpath(Path(p).absolute(), out.parent)).as_posix()] = reason
    for k, p in enumerate(shard_paths):
        rel = Path(os.path.relpath(Path(p).absolute(), out.parent)).as_posix()
        problem, root = _shard_problem(Path(p), None if sizes is None else sizes[k])
        if problem:
            missing[rel] = problem
        else:
            present.append((rel, root, _layout(Path(p))))
    missing = dict(sorted(missing.items()))
    if not present or not sum(root["n"] for _, root, _ in present):
        raise StoreError(f"{where}: no complete shard with images among the {len(shard_paths) + len(missing)} expected "
                         f"({'; '.join(f'{k}: {v}' for k, v in list(missing.items())[:3])}); "
                         "hint: run the array tasks first")
    ref_rel, ref_root, ref = present[0]
    for rel, root, lay in present[1:]:
        problem = _mismatch(ref, lay, ref_root, root)
        if problem:
            raise StoreError(f"{where}: shard {rel} does not match {ref_rel}: {problem}; hint: rerun that shard's "
                             "array task with the same plan (or launch the visualization again with --fresh)")
    n_images = sum(root["n"] for _, root, _ in present)
    root_attrs = {**_view_attrs(present, missing, n_images), **(attrs or {})}
    merged = reduce([read_summaries(out.parent / rel) for rel, _, _ in present], missing) if reduce else {}
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for name, meta in ref.items():
            _virtual(f, name, meta, present, where)
        _write_arrays(f, merged, where)
        if attach:
            _attach(f, [Path(p) for p in attach], out, where)
        if isinstance(f.get("index"), h5py.Dataset):  # dimension scales work on virtual datasets too
            f["index"].make_scale("index")
            for name in ref:
                if name != "index":
                    f[name].dims[0].attach_scale(f["index"])
        _set_attrs(f, root_attrs, where)
        tag_nxdata(f)
    return {"n_images": n_images, "present": [rel for rel, _, _ in present], "missing": missing}
