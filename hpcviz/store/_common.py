"""Shared by the store modules: StoreError, atomic writes, attribute encoding, opening with clear errors."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import InputError
from ..files import atomic_path, fsync_path, leftovers

__all__ = ["StoreError", "atomic_path", "fsync_path", "leftovers"]

_SCALE_ATTRS = ("CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST", "DIMENSION_LABELS")  # shown as dims
_NX_ATTRS = ("NX_class", "default", "signal", "axes", "interpretation")  # for HDF5 viewers (tag_nxdata)
_FILE_HINT = "hint: list what exists with python jobs/inspect_results.py RUN_DIR"


class StoreError(InputError):
    """An hpcviz HDF5 file is missing, corrupt, truncated or of the wrong format."""
    problem: str = ""  # the bare problem, without the file and the hint (collation reports it per shard)


def _plain(value: object) -> object:
    """HDF5 attrs come back as numpy scalars, arrays or bytes; hand callers plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim == 1 else value.tolist()
    return value


def _error(where: str, problem: str, hint: str) -> StoreError:
    err = StoreError(f"{where}: {problem}; {hint}")
    err.problem = problem  # collate reports the bare problem per shard
    return err


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any], where: str) -> None:
    """Set attrs once per object (see the package docstring for the encoding)."""
    json_keys = []
    for key, value in attrs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "USO":  # h5py stores only its own str dtype
            value = value.tolist()
        try:
            if isinstance(value, (str, bool, int, float, np.generic)):
                obj.attrs[key] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                obj.attrs[key] = np.array(list(value), dtype=h5py.string_dtype())
            elif isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                obj.attrs[key] = np.asarray(value)
            else:
                obj.attrs[key] = json.dumps(value)
                json_keys.append(key)
        except (TypeError, ValueError, OverflowError) as e:
            raise StoreError(f"{where}: attr {key!r}={value!r:.80} cannot be stored ({e}); valid: str, int, "
                             "float, bool, lists of those, JSON-serialisable dicts; hint: convert it") from None
    if json_keys:
        obj.attrs["json_attrs"] = np.array(json_keys, dtype=h5py.string_dtype())


def _get_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    """Attrs as plain Python values, JSON ones decoded; dimension-scale and viewer (NXdata) bookkeeping left out."""
    out: dict[str, Any] = {k: _plain(obj.attrs[k]) for k in obj.attrs.keys()
                           if k not in _SCALE_ATTRS and k not in _NX_ATTRS}
    for key in out.pop("json_attrs", []):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out[key] = json.loads(out[key])
    return out


# ============================================================ opening shards, viz.h5 and packed files
@contextlib.contextmanager
def _open(path: str | os.PathLike, what: str = "file", hint: str = _FILE_HINT) -> Iterator[tuple[h5py.File, str]]:
    """Open read-only; every way of failing (missing, not HDF5, truncated, corrupt) is one-line StoreError."""
    path = Path(path)
    where = f"{what} {os.fspath(path)}"
    if not path.is_file():
        temps = leftovers(path)
        problem = "no such file" + (f" (only {temps[-1].name} exists: its writer was killed or is still running)"
                                    if temps else "")
        raise _error(where, "is a directory, expected a file" if path.is_dir() else problem, hint)
    if not h5py.is_hdf5(path):
        raise _error(where, "not an HDF5 file", hint)
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # h5py reports truncation as a multi-line OSError
        raise _error(where, f"unreadable, truncated or corrupt HDF5 ({' '.join(str(e).split())[:160]})", hint) from e
    try:
        yield f, where
    except OSError as e:
        raise _error(where, f"read failed, truncated or corrupt HDF5 ({' '.join(str(e).split())[:160]})", hint) from e
    finally:
        f.close()


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return sorted(found, key=lambda item: item[0])


def _write_arrays(f: h5py.File, arrays: Mapping[str, tuple[np.ndarray, Sequence[str], Mapping[str, Any]]],
                  where: str) -> None:
    """Whole arrays as datasets {name: (array, dims, attrs)}, every axis labelled."""
    for name, (array, dims, attrs) in arrays.items():
        ds = f.create_dataset(name, data=np.ascontiguousarray(array))
        for axis, label in enumerate(dims):
            ds.dims[axis].label = label
        _set_attrs(ds, attrs, f"{where}: {name}")


def _per_image(ds: h5py.Dataset) -> bool:
    """A dataset with one row per image (axis 0 labelled 'image', or unlabelled as in packed files); the others
    are summaries over the images (topk/*, class_mean/*, examples/*), which collation merges, never concatenates."""
    return ds.ndim > 0 and ds.dims[0].label in ("image", "")


# NXdata-style tags (NeXus): H5Web and `silx view` plot a file's default image with no plugin. Groups under
# /entry hold soft links to the data (never hard links: a second hard name would change what visititems
# lists); h5ls/h5dump show the links as links.
_NX_IMAGES = ("images", "act/", "deconv/", "invert/", "featviz/")


def tag_nxdata(f: h5py.File) -> None:
    """/entry (NXentry, the root's `default`) with one NXdata group per image dataset: entry/images,
    entry/act_<block>, entry/deconv_<block>_<path>, entry/invert_<block>, entry/featviz_<block> (a block's feature
    visualizations, one image per channel), entry/examples_<block> (the grid)."""
    names = [n for n, ds in _datasets(f) if (n.startswith(_NX_IMAGES) and ds.ndim == 4)
             or (n.startswith("examples/") and n.endswith("/grid"))]
    if not names:
        return
    entry = f.require_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    for name in names:
        grid = name.endswith("/grid")
        group = entry.require_group((name[:-len("/grid")] if grid else name).replace("/", "_"))
        group.attrs.update({"NX_class": "NXdata", "signal": "data",
                            "axes": np.array(["."] * (f[name].ndim - grid), dtype=h5py.string_dtype())})
        if "data" not in group:
            group["data"] = h5py.SoftLink("/" + name)
        f[name].attrs["interpretation"] = "rgb-image" if grid else "image"
    entry.attrs["default"] = "images" if "images" in names else entry[sorted(entry)[0]].name.rsplit("/", 1)[-1]
    f.attrs["NX_class"] = "NXroot"
    f.attrs["default"] = "entry"


def _dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
    """The dataset `name`, refusing a virtual one whose source files are gone."""
    obj = f.get(name.strip("/")) if name.strip("/") else f
    if not isinstance(obj, h5py.Dataset):
        parts, group = name.strip("/").split("/"), f
        for i in range(len(parts), 0, -1):  # list the members of the deepest group that does exist
            if isinstance(f.get("/".join(parts[:i])), h5py.Group):
                group = f["/".join(parts[:i])]
                break
        prefix = group.name.strip("/") + "/" if group.name != "/" else ""
        valid = [prefix + k + ("/" if isinstance(group.get(k), h5py.Group) else "") for k in group.keys()
                 if group.get(k, getclass=True) is not h5py.Group or "NX_class" not in group[k].attrs]  # viewers' links
        raise _error(where, f"no dataset {name!r}; valid: {', '.join(valid) or '(none)'}",
                     "hint: show the tree with python jobs/inspect_results.py FILE")
    if obj.is_virtual:
        _check_sources(f, obj, where)
    return obj


def _check_sources(f: h5py.File, ds: h5py.Dataset, where: str) -> None:
    """Refuse a virtual dataset whose source file is not where HDF5 looks first. HDF5 (2.0) looks for a relative
    source under HDF5_VDS_PREFIX's folders, then next to the file, then in the current directory (a prefix, even
    `${ORIGIN}`, only adds a place to look; none can be removed): a source missing next to viz.h5 reads another
    file of the same name from wherever the reader runs, or fill values, both without any error."""
    base = Path(f.filename).absolute().parent
    prefixes = [Path(p) for p in os.environ.get("HDF5_VDS_PREFIX", "").split(":") if p and "$" not in p]
    for name in sorted({m.file_name for m in ds.virtual_sources()} - {"."}):
        if os.path.isabs(name):
            found = [Path(name)] if Path(name).is_file() else []
        else:
            found = [p / name for p in prefixes if (p / name).is_file()] + [base / name] * (base / name).is_file()
        if not found:
            raise _error(where, f"/{ds.name.strip('/')} reads from {name}, which is missing next to it (HDF5 would "
                                "read fill values, or a file of that name in the current directory)",
                         "hint: rerun the array task that writes it, then collate again")
        if (base / name).is_file() and found[0] != base / name and not found[0].samefile(base / name):
            raise _error(where, f"/{ds.name.strip('/')} would read {found[0]} (HDF5_VDS_PREFIX) in place of "
                                f"{base / name}", "hint: unset HDF5_VDS_PREFIX")


@contextlib.contextmanager
def open_checked(path: str | os.PathLike) -> Iterator[h5py.File]:
    """An hpcviz file as a read-only h5py.File, for reading with h5py directly: every virtual dataset's sources
    checked first (see _check_sources), so that no data of another file is read as this one's."""
    with _open(path) as (f, where):
        for _, ds in _datasets(f):
            if ds.is_virtual:
                _check_sources(f, ds, where)
        yield f
