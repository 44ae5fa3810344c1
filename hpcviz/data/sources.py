"""Image sets for hpcviz: load (`--data SPEC`, see DATA_FORMS), split, normalise and augment.

A set is held in memory as one (N, 3, H, W) uint8 tensor (CIFAR-10: 150 MB), so training indexes
batches directly and moves uint8 (4x less traffic than float32) to the GPU, where `augment` and
`normalize` run batched. FILE.h5 is the packed form written by jobs/pack_data.py (hpcviz.store).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["DataError", "ImageSet", "SourceFacts", "peek", "check_split", "ImageFolderStream", "DATA_FORMS",
           "BUILTIN_CLASSES", "IMAGE_EXTENSIONS", "load_images",
           "make_builtin", "resize_images", "split_indices", "channel_stats", "norm_tensors", "normalize", "augment",
           "fingerprint"]

log = logging.getLogger("hpcviz")

DATA_FORMS = "builtin | builtin:N_PER_CLASS | cifar10:DIR | cifar10-test:DIR | DIR (ImageFolder) | FILE.h5 (packed)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
BUILTIN_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                   "h_stripes", "v_stripes", "checker", "dots", "gradient")
_TV_DECODES = (".jpg", ".jpeg", ".png")  # torchvision.io decodes these ~3x faster than PIL


class DataError(InputError):
    """A --data spec (or a file it points at) cannot be turned into an ImageSet."""


def _error(spec: str, problem: str, hint: str) -> DataError:
    return DataError(f"--data {spec}: {problem}; valid forms: {DATA_FORMS}; hint: {hint}")


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor      # (N, 3, H, W) uint8, CPU, contiguous
    labels: torch.Tensor      # (N,) int64
    classes: tuple[str, ...]  # class names, index = label
    source: str               # the spec it was loaded from

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _make_set(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], source: str,
              image_size: int | None) -> ImageSet:
    if image_size is not None:
        images = resize_images(images, image_size)
    return ImageSet(images.contiguous(), labels.to(torch.int64).contiguous(), tuple(classes), source)


def load_images(spec: str, image_size: int | None = None, *, download: bool = False,
                skip_bad: bool = False, seed: int = 0) -> ImageSet:
    """Load the image set named by `spec` (one of DATA_FORMS), resized to `image_size` if given.

    `seed` only affects ``builtin``; `download` only ``cifar10*``; `skip_bad` only ImageFolder.
    """
    if image_size is not None and image_size < 1:
        raise _error(spec, f"--image-size {image_size} must be a positive integer", "e.g. --image-size 32")
    if spec == "builtin" or spec.startswith("builtin:"):
        n_text = spec.partition(":")[2] or "500"
        if not n_text.isdigit() or int(n_text) < 1:
            raise _error(spec, f"N_PER_CLASS {n_text!r} is not a positive integer", "e.g. builtin:500")
        return replace(make_builtin(int(n_text), image_size or 32, seed), source=spec)
    for prefix, train in (("cifar10:", True), ("cifar10-test:", False)):
        if spec.startswith(prefix):
            images, labels, classes = _load_cifar10(spec, spec[len(prefix):] or ".", train, download)
            return _make_set(images, labels, classes, spec, image_size)
    if spec.lower().endswith((".h5", ".hdf5")):
        return _load_packed(spec, image_size)
    if os.path.isdir(spec):
        images, labels, classes = _load_image_folder(spec, image_size, skip_bad)
        return _make_set(images, labels, classes, spec, image_size)
    problem = "no such directory" if not os.path.exists(spec) else "not a directory or a .h5 file"
    raise _error(spec, problem, "check the path, or use --data builtin for the embedded set")


def check_source(spec: str, download: bool = False) -> None:
    """The cheap part of load_images' checks (names, paths, folder layout), without decoding
    anything: launchers run it before submitting, so a typo fails at once, not in the queue."""
    if spec == "builtin" or spec.startswith("builtin:"):
        n_text = spec.partition(":")[2] or "500"
        if not n_text.isdigit() or int(n_text) < 1:
            raise _error(spec, f"N_PER_CLASS {n_text!r} is not a positive integer", "e.g. builtin:500")
        return
    for prefix in ("cifar10:", "cifar10-test:"):
        if spec.startswith(prefix):
            root = spec[len(prefix):] or "."
            if not download and not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
                raise _error(spec, f"no {os.path.join(root, 'cifar-10-batches-py')}",
                             "point at the folder holding cifar-10-batches-py, or pass --download")
            return
    if spec.lower().endswith((".h5", ".hdf5")):
        if not os.path.isfile(spec):
            raise _error(spec, "no such file", "pack one with jobs/pack_data.py, or check the path")
        return
    if os.path.isdir(spec):
        _list_image_folder(spec)
        return
    problem = "no such directory" if not os.path.exists(spec) else "not a directory or a .h5 file"
    raise _error(spec, problem, "check the path (it must be visible from the compute nodes too)")


@dataclass(frozen=True)
class SourceFacts:
    """What can be known of a --data source without decoding it (None: not without decoding)."""
    classes: tuple[str, ...] | None
    per_class: tuple[int, ...] | None   # images per class
    fingerprint: str | None             # fingerprint() of the set at the requested image size
    stored: tuple[int, int] | None = None  # (H, W) of the images as stored (packed files, CIFAR-10)
    n: int | None = None                # images (where per_class is not known: CIFAR-10 batches)


def peek(spec: str, image_size: int) -> SourceFacts:
    """The cheap facts of a source that check_source accepted: launchers check a request with them (an empty
    validation split, a --resume of another class count or data set) before anything is queued or written."""
    if spec == "builtin" or spec.startswith("builtin:"):
        n = int(spec.partition(":")[2] or "500")
        small = n * len(BUILTIN_CLASSES) * image_size ** 2 <= 2 ** 25  # drawn in about a second at most
        return SourceFacts(BUILTIN_CLASSES, (n,) * len(BUILTIN_CLASSES),
                           fingerprint(make_builtin(n, image_size)) if small else None)
    if spec.lower().endswith((".h5", ".hdf5")):
        from ..store import PackedReader, StoreError
        try:
            with PackedReader(spec) as reader:
                counts = np.bincount(reader.labels, minlength=len(reader.classes))
                same_size = tuple(reader.shape[2:]) == (image_size, image_size)
                fp = str(reader.attrs.get("fingerprint", "")) if same_size else ""
                return SourceFacts(tuple(reader.classes), tuple(int(c) for c in counts), fp or None,
                                   (int(reader.shape[2]), int(reader.shape[3])))
        except StoreError as e:
            raise DataError(f"--data {e}") from None
    if os.path.isdir(spec) and not spec.startswith(("cifar10:", "cifar10-test:")):
        classes, samples = _list_image_folder(spec)
        counts = np.bincount([label for _, label in samples], minlength=len(classes))
        return SourceFacts(tuple(classes), tuple(int(c) for c in counts), None)
    if spec.startswith(("cifar10:", "cifar10-test:")):  # torchvision's layout: 5 batches of 10,000, or 1
        return SourceFacts(None, None, None, (32, 32), 10000 if spec.startswith("cifar10-test:") else 50000)
    return SourceFacts(None, None, None)


def split_sizes(per_class: Sequence[int], val_fraction: float) -> tuple[int, int]:
    """(training, validation) images of split_indices' stratified split of classes of these sizes."""
    n_val = sum(min(int(n * val_fraction + 0.5), n - 1) for n in per_class if n)
    return sum(per_class) - n_val, n_val


def check_split(spec: str, facts: SourceFacts, val_fraction: float) -> None:
    """Refuse a source whose validation split would be empty (split_indices' rounding, per class)."""
    if facts.per_class is None:
        return
    n_val = split_sizes(facts.per_class, val_fraction)[1]
    if n_val == 0:
        raise DataError(f"--data {spec}: the validation split would be empty ({sum(facts.per_class)} images, at most "
                        f"{max(facts.per_class)} per class, --val-fraction {val_fraction:g}); hint: use more images "
                        "per class (e.g. builtin:20) or a larger --val-fraction")


def source_labels(spec: str, skip_bad: bool = False) -> tuple[torch.Tensor, tuple[str, ...]] | None:
    """(labels (N,) int64, classes) of a source without decoding its images, or None where that cannot be
    known (CIFAR batches, an image folder with skip_bad: which files are unreadable is only known by decoding)."""
    if spec == "builtin" or spec.startswith("builtin:"):
        n = int(spec.partition(":")[2] or "500")
        return torch.from_numpy(_builtin_labels(np.random.Generator(np.random.PCG64(0)), n)), BUILTIN_CLASSES
    if spec.lower().endswith((".h5", ".hdf5")):
        from ..store import PackedReader, StoreError
        try:
            with PackedReader(spec) as reader:
                return torch.from_numpy(np.asarray(reader.labels, dtype=np.int64)), tuple(reader.classes)
        except StoreError as e:
            raise DataError(f"--data {e}") from None
    if os.path.isdir(spec) and not skip_bad:
        classes, samples = _list_image_folder(spec)
        return torch.tensor([label for _, label in samples], dtype=torch.int64), tuple(classes)
    return None


def load_rows(spec: str, image_size: int, rows: Sequence[int], skip_bad: bool = False) -> torch.Tensor:
    """The images at positions `rows` of the source (N, 3, S, S) uint8, in the order given, reading only
    those: rows of a packed file at `image_size`, the files of an image folder. Other sources (builtin,
    CIFAR batches, a packed file of another size, a folder with skip_bad) are loaded whole, then indexed."""
    idx = np.asarray(rows, dtype=np.int64)
    if spec.lower().endswith((".h5", ".hdf5")):
        from ..store import PackedReader
        with PackedReader(spec) as reader:
            if tuple(reader.shape[2:]) == (image_size, image_size):
                out = np.empty((len(idx), *reader.shape[1:]), np.uint8)
                return torch.from_numpy(reader.read_rows(idx, out))
    elif os.path.isdir(spec) and not skip_bad:
        _, samples = _list_image_folder(spec)
        tvio = _tv_io()
        decoded = []
        for i in idx.tolist():
            img = _decode(samples[i][0], tvio)
            if img is None:
                raise _error(spec, f"cannot decode {samples[i][0]}", "pass --skip-bad to skip unreadable files")
            decoded.append(resize_images(torch.from_numpy(img).permute(2, 0, 1)[None], image_size)[0])
        return torch.stack(decoded) if decoded else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    ds = load_images(spec, image_size, skip_bad=skip_bad)
    return ds.images[torch.from_numpy(idx)]


# ----------------------------------------------------------------------------- builtin
def _builtin_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-image random parameters, (n,) each; unit image coordinates, x right, y down."""
    def uni(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * rng.random(n)
    q = {"r": uni(0.14, 0.36)}
    q["cx"], q["cy"] = q["r"] + (1 - 2 * q["r"]) * rng.random(n), q["r"] + (1 - 2 * q["r"]) * rng.random(n)
    tilt = uni(-0.6, 0.6)  # rotation as a (cos, sin) pair built with sqrt only: no libm, same bytes everywhere
    q["c"], q["s"] = 1 / np.sqrt(1 + tilt * tilt), tilt / np.sqrt(1 + tilt * tilt)
    ga, gb = uni(-1, 1), uni(-1, 1)
    gnorm = np.maximum(np.sqrt(ga * ga + gb * gb), 0.1)
    q["ga"], q["gb"] = ga / gnorm, gb / gnorm
    q["p"], q["phase"] = uni(0.12, 0.28), rng.random(n)
    q["w"], q["h"] = uni(0.45, 1.0), uni(0.45, 1.0)
    q["x0"], q["y0"] = (1 - q["w"]) * rng.random(n), (1 - q["h"]) * rng.random(n)
    q["bg"] = rng.integers(0, 256, (n, 3)).astype(np.float64)
    q["fg"] = (q["bg"] + rng.integers(32, 225, (n, 3))) % 256  # every channel differs by >= 32 levels
    q["noise"] = rng.integers(0, 65, n)
    return q


def _builtin_mask(name: str, x: np.ndarray, y: np.ndarray, q: dict[str, np.ndarray]) -> np.ndarray:
    """Foreground weight in [0, 1], (k, S, S), for k images of one class; q values are (k, 1, 1)."""
    dx, dy, r, c, s = x - q["cx"], y - q["cy"], q["r"], q["c"], q["s"]
    u, v = c * dx + s * dy, c * dy - s * dx  # shape frame: rotated about the centre
    rx, ry = x - q["x0"], y - q["y0"]
    tu, tv = (c * rx + s * ry) / q["p"] + q["phase"], (c * ry - s * rx) / q["p"] + q["phase"]
    region = (rx >= 0) & (rx <= q["w"]) & (ry >= 0) & (ry <= q["h"])  # textures fill a random box
    if name == "circle":
        m = dx * dx + dy * dy <= r * r
    elif name == "square":
        m = (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    elif name == "triangle":  # apex up, base at v = r/2
        m = (v <= 0.5 * r) & (np.abs(u) <= 0.577 * (v + r))
    elif name == "cross":
        m = ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    elif name == "ring":
        d2 = dx * dx + dy * dy
        m = (d2 <= r * r) & (d2 >= 0.36 * r * r)
    elif name == "h_stripes":
        m = region & (np.floor(tv) % 2 == 0)
    elif name == "v_stripes":
        m = region & (np.floor(tu) % 2 == 0)
    elif name == "checker":
        m = region & ((np.floor(tu) + np.floor(tv)) % 2 == 0)
    elif name == "dots":
        du, dv = tu % 1 - 0.5, tv % 1 - 0.5
        m = region & (du * du + dv * dv <= 0.09)
    else:  # gradient: a smooth ramp from bg to fg along a random direction, no edges at all
        return np.clip((x - 0.5) * q["ga"] + (y - 0.5) * q["gb"] + 0.5, 0.0, 1.0)
    return m.astype(np.float64)


def _builtin_labels(rng: np.random.Generator, n_per_class: int) -> np.ndarray:
    """The builtin set's labels: its generator's first draw (so source_labels needs no image)."""
    return rng.permutation(np.repeat(np.arange(len(BUILTIN_CLASSES)), n_per_class))


def make_builtin(n_per_class: int = 500, image_size: int = 32, seed: int = 0) -> ImageSet:
    """Procedural 10-class set, `n_per_class` images per class, drawn directly at `image_size`.

    Classes (BUILTIN_CLASSES): circle, square, triangle, cross, ring (shapes of random centre,
    radius 0.14-0.36 of the image, tilt up to +-31 deg); h_stripes, v_stripes, checker, dots
    (textures of random period, phase and tilt filling a random box covering 20-100 % of the
    image); gradient (a linear ramp in a random direction). Colours of shape and background
    are random with >= 32 levels of difference per channel; uniform integer noise of random
    amplitude 0-64 is added. Labels are shuffled, classes exactly balanced. Only integer draws,
    + - * / and sqrt are used, so the bytes are identical for the same seed on every machine.
    """
    if n_per_class < 1 or image_size < 1:
        raise DataError(f"make_builtin: n_per_class={n_per_class} and image_size={image_size} must be >= 1; "
                        f"valid forms: {DATA_FORMS}; hint: use e.g. builtin:500")
    rng = np.random.Generator(np.random.PCG64(seed))
    n, size = n_per_class * len(BUILTIN_CLASSES), image_size
    labels = _builtin_labels(rng, n_per_class)  # (N,)
    q = _builtin_params(rng, n)
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres
    x, y = grid[None, None, :], grid[None, :, None]  # (1, 1, S), (1, S, 1)
    images = np.empty((n, 3, size, size), np.uint8)
    chunk = max(1, 2 ** 20 // (size * size))  # bounds the float64 temporaries to ~100 MB at any size
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        mask = np.empty((hi - lo, size, size))  # (k, S, S)
        for label, name in enumerate(BUILTIN_CLASSES):
            sel = np.flatnonzero(labels[lo:hi] == label)
            if sel.size:
                mask[sel] = _builtin_mask(name, x, y, {k: v[lo:hi][sel, None, None] for k, v in q.items()
                                                       if v.ndim == 1})
        bg, fg = q["bg"][lo:hi, None, None, :], q["fg"][lo:hi, None, None, :]  # (k, 1, 1, 3)
        amp = q["noise"][lo:hi, None, None, None]
        noise = rng.integers(-amp, amp + 1, (hi - lo, size, size, 3))  # (k, S, S, 3)
        pixels = np.rint(bg + (fg - bg) * mask[..., None]) + noise
        images[lo:hi] = np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                    BUILTIN_CLASSES, f"builtin:{n_per_class}")


# ----------------------------------------------------------------------------- cifar10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers and numpy arrays
    (rebuilt by numpy's `_reconstruct` from `ndarray` and `dtype`); the batches were pickled by Python 2,
    protocol 2. A pickle may call any importable function as it loads (`__reduce__`): every other global is
    refused before anything is called, so a hostile batch runs nothing."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _cifar_globals().get((module, name))
        if allowed is None:
            raise _Refused(f"{module}.{name}")
        return allowed


class _Refused(pickle.UnpicklingError):
    """A global that a CIFAR-10 batch never holds."""


def _latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3's protocol-2 pickles call for bytes (`_codecs.encode(text, 'latin1')`), that codec only."""
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    import importlib
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    return {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,   # numpy < 2 wrote this name
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,  # numpy >= 2
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1}


def _read_cifar_pickle(spec: str, path: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()  # the batches were pickled by Python 2
    except FileNotFoundError:
        raise _error(spec, f"missing {path}", "pass --download to fetch CIFAR-10 into DIR, or point DIR at "
                     "the folder that contains cifar-10-batches-py") from None
    except _Refused as e:
        raise _error(spec, f"{path} is not a CIFAR-10 batch: its pickle calls {e}, which a batch never holds "
                     "(only dicts, lists, strings, numbers and numpy arrays); refused before running anything",
                     "do not use files from an unknown source; fetch the real ones with --download") from None
    except Exception as e:  # unpickling garbage raises anything from EOFError to UnpicklingError
        raise _error(spec, f"cannot read {path} ({type(e).__name__})", "delete it and pass --download") from None
    if not isinstance(entry, dict):
        raise _error(spec, f"{path} holds a {type(entry).__name__}, not a CIFAR-10 batch (a dict)",
                     "delete it and pass --download")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _load_cifar10(spec: str, root: str, train: bool,
                  download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10 as ((N,3,32,32) uint8, (N,) labels, classes).

    With `download`, torchvision fetches and md5-verifies the files. Without it we read the
    torchvision file layout ourselves, without md5 checks: that gives one-line errors naming
    the missing file, and lets tests use small fake batches.
    """
    from torchvision.datasets import CIFAR10
    if download:
        try:
            ds = CIFAR10(root, train=train, download=True)
        except Exception as e:  # URLError, md5 mismatch, disk full...
            raise _error(spec, f"download into {root} failed ({type(e).__name__}: {e})",
                         "check network access, or download elsewhere and copy cifar-10-batches-py") from e
        data, targets, classes = np.asarray(ds.data), ds.targets, list(ds.classes)  # data: (N, 32, 32, 3)
        return torch.from_numpy(data.transpose(0, 3, 1, 2).copy()), torch.as_tensor(targets), classes
    folder = os.path.join(root, CIFAR10.base_folder)
    names = [name for name, _md5 in (CIFAR10.train_list if train else CIFAR10.test_list)]
    batches = [_read_cifar_pickle(spec, os.path.join(folder, name)) for name in names]
    meta = _read_cifar_pickle(spec, os.path.join(folder, CIFAR10.meta["filename"]))
    try:
        data = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        labels = np.concatenate([np.asarray(b.get("labels", b.get("fine_labels")), np.int64) for b in batches])
        classes = [str(c) for c in meta[CIFAR10.meta["key"]]]
    except (KeyError, ValueError, TypeError) as e:
        raise _error(spec, f"unexpected contents in {folder} ({type(e).__name__}: {e})",
                     "delete the folder and pass --download") from e
    if labels.shape[0] != data.shape[0] or labels.min() < 0 or labels.max() >= len(classes):
        raise _error(spec, f"labels in {folder} do not match the images or classes", "re-download it")
    return torch.from_numpy(data), torch.from_numpy(labels), classes


# ----------------------------------------------------------------------------- ImageFolder
def _list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes sorted like torchvision's ImageFolder, and (path, label) for every image file."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise _error(root, "no class subfolders", "lay images out as DIR/<class>/<image>.jpg")
    samples = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, _dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise _error(root, f"class folder {os.path.join(root, name)} has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})", "remove the folder or add images to it")
        samples += [(path, label) for path in sorted(found)]
    return classes, samples


def _decode(path: str, tvio: ModuleType | None) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, or None if unreadable. `tvio`: torchvision.io, ~3x faster than PIL on JPEG/PNG."""
    if tvio is not None and path.lower().endswith(_TV_DECODES):
        try:
            with open(path, "rb") as f:
                raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            img = tvio.decode_image(raw, mode=tvio.ImageReadMode.RGB)  # (3, H, W)
            if img.dtype == torch.uint8:  # else a 16-bit PNG: PIL maps it to 8 bits below
                return img.permute(1, 2, 0).numpy()
        except (RuntimeError, ValueError, OSError):
            pass  # fall through: PIL reads some files libjpeg/libpng reject (CMYK JPEG...)
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None


def _flush_resizes(decoded: list[torch.Tensor], pending: dict[tuple[int, int], list[int]], size: int) -> int:
    """Resize pending images in place in `decoded`, one batch per input size (~10x faster than one by one)."""
    for idx in pending.values():
        batch = resize_images(torch.stack([decoded[i] for i in idx]), size)  # (b, 3, size, size)
        for i, img in zip(idx, batch):
            decoded[i] = img
    pending.clear()
    return 0


def _load_image_folder(spec: str, image_size: int | None,
                       skip_bad: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes, samples = _list_image_folder(spec)
    decoded, labels, bad = [], [], []
    pending: dict[tuple[int, int], list[int]] = {}  # input size -> indices into decoded awaiting resize
    n_pending = 0
    import torchvision.io as tvio  # its decoders are deprecated since 0.29: use them while they exist
    tvio = tvio if hasattr(tvio, "decode_image") and hasattr(tvio, "ImageReadMode") else None
    with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode call
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        for path, label in samples:
            img = _decode(path, tvio)
            if img is None:
                if not skip_bad:
                    raise _error(spec, f"cannot decode {path}", "pass --skip-bad to skip unreadable files")
                bad.append(path)
                continue
            decoded.append(torch.from_numpy(img).permute(2, 0, 1))  # (3, H, W)
            labels.append(label)
            if image_size is not None and img.shape[:2] != (image_size, image_size):
                pending.setdefault(img.shape[:2], []).append(len(decoded) - 1)
                n_pending += 1
                if n_pending >= 1024:  # bounds memory when the originals are large photos
                    n_pending = _flush_resizes(decoded, pending, image_size)
    _flush_resizes(decoded, pending, image_size or 0)
    if bad:
        log.warning("--data %s: skipped %d unreadable file(s): %s%s", spec, len(bad),
                    ", ".join(bad[:5]), " ..." if len(bad) > 5 else "")
    if not decoded:
        raise _error(spec, "no readable images", "check the files")
    sizes = sorted({tuple(img.shape[1:]) for img in decoded})
    if len(sizes) > 1:
        raise _error(spec, f"images have {len(sizes)} different sizes (e.g. {sizes[0]} and {sizes[-1]})",
                     "pass --image-size S to resize all to S x S")
    return torch.stack(decoded), torch.tensor(labels, dtype=torch.int64), classes  # (N, 3, H, W)


_STREAM_BYTES = 64 * 2 ** 20  # a streamed batch, and the originals awaiting resize, each stay under this


def _tv_io() -> ModuleType | None:
    """torchvision.io where it still has its decoders (deprecated since 0.29), else None (PIL only)."""
    import torchvision.io as tvio
    return tvio if hasattr(tvio, "decode_image") and hasattr(tvio, "ImageReadMode") else None


class ImageFolderStream:
    """An ImageFolder decoded batch by batch, never held whole: the same images, labels, classes and
    pixels, in the same order, as load_images(spec, image_size, skip_bad=...), in bounded memory
    (~2 x 64 MB of batch and originals), so jobs/pack_data.py can pack a folder of any size.

    A class, not a bare generator: the packer needs `classes` and `n_files` before the first batch,
    and `files_done` (decoded or skipped) for its progress bar while iterating.
    """

    def __init__(self, spec: str, image_size: int | None = None, *, skip_bad: bool = False,
                 batch: int = 256) -> None:
        if image_size is not None and image_size < 1:
            raise _error(spec, f"--image-size {image_size} must be a positive integer", "e.g. --image-size 32")
        if not os.path.isdir(spec):
            raise _error(spec, "no such directory" if not os.path.exists(spec) else "not a directory",
                         "check the path")
        classes, self._samples = _list_image_folder(spec)  # same one-line errors as load_images
        self.spec, self.image_size, self.skip_bad, self.batch = spec, image_size, skip_bad, max(1, batch)
        self.classes: tuple[str, ...] = tuple(classes)
        self.n_files = len(self._samples)  # the set's size if no file is skipped
        self.files_done = 0
        self.n_images = 0                  # readable images yielded so far
        self.skipped: list[str] = []
        self._first: tuple[tuple[int, int], str] | None = None  # (H, W) and path of the first image

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (b, 3, H, W) uint8, labels (b,) int64), b <= batch, in file order; H = W = image_size
        if given. Raises DataError (as load_images) on an unreadable file without skip_bad, on mixed
        sizes without image_size (at the first image whose size differs) and if nothing was readable."""
        self.files_done, self.n_images, self.skipped, self._first = 0, 0, [], None
        tvio = _tv_io()
        while self.files_done < self.n_files:
            decoded, labels = self._next_batch(tvio)
            if decoded:
                self.n_images += len(decoded)
                yield torch.stack(decoded), torch.tensor(labels, dtype=torch.int64)  # (b, 3, H, W), (b,)
        if self.skipped:
            log.warning("--data %s: skipped %d unreadable file(s): %s%s", self.spec, len(self.skipped),
                        ", ".join(self.skipped[:5]), " ..." if len(self.skipped) > 5 else "")
        if not self.n_images:
            raise _error(self.spec, "no readable images", "check the files")

    def _next_batch(self, tvio: ModuleType | None) -> tuple[list[torch.Tensor], list[int]]:
        """Decode files from `files_done` on until `batch` images or ~64 MB; resize like _load_image_folder
        (grouped by input size: resize_images is per-image exact, so the grouping changes no pixel)."""
        size = self.image_size
        decoded: list[torch.Tensor] = []
        labels: list[int] = []
        pending: dict[tuple[int, int], list[int]] = {}  # input size -> indices into decoded awaiting resize
        nbytes = pending_bytes = 0
        with warnings.catch_warnings():  # per batch, not around a yield: the caller's code runs in between
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            while self.files_done < self.n_files and len(decoded) < self.batch and nbytes < _STREAM_BYTES:
                path, label = self._samples[self.files_done]
                self.files_done += 1
                img = self._decode_checked(path, tvio)  # (H, W, 3) or None (skipped)
                if img is None:
                    continue
                decoded.append(torch.from_numpy(img).permute(2, 0, 1))  # (3, H, W)
                labels.append(label)
                nbytes += 3 * size * size if size else img.nbytes
                if size is not None and img.shape[:2] != (size, size):
                    pending.setdefault(img.shape[:2], []).append(len(decoded) - 1)
                    pending_bytes += img.nbytes
                    if pending_bytes >= _STREAM_BYTES:  # large photos: resize before decoding more
                        pending_bytes = _flush_resizes(decoded, pending, size)
        _flush_resizes(decoded, pending, size or 0)
        return decoded, labels

    def _decode_checked(self, path: str, tvio: ModuleType | None) -> np.ndarray | None:
        img = _decode(path, tvio)
        if img is None:
            if not self.skip_bad:
                raise _error(self.spec, f"cannot decode {path}", "pass --skip-bad to skip unreadable files")
            self.skipped.append(path)
            return None
        if self.image_size is None:  # sizes must agree; the whole set is never seen at once, so check as we go
            if self._first is None:
                self._first = (img.shape[:2], path)
            elif img.shape[:2] != self._first[0]:
                raise _error(self.spec, f"images have at least 2 different sizes (e.g. {self._first[0]} in "
                             f"{self._first[1]} and {img.shape[:2]} in {path})",
                             "pass --image-size S to resize all to S x S")
        return img


# ----------------------------------------------------------------------------- packed
def _load_packed(spec: str, image_size: int | None) -> ImageSet:
    from ..store import StoreError, read_packed
    if not os.path.isfile(spec):
        raise _error(spec, "no such file", "check the path, or write it with python jobs/pack_data.py --out FILE.h5")
    try:
        images, labels, classes, _attrs = read_packed(spec)
    except StoreError as e:  # callers catch DataError for every --data problem
        raise DataError(f"--data {e}") from e
    return _make_set(torch.from_numpy(images), torch.from_numpy(labels), classes, spec, image_size)


# ----------------------------------------------------------------------------- tensor stages
def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), antialiased bilinear; no-op if already that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    step = max(1, 2 ** 22 // (images.shape[1:].numel() + 3 * size * size))  # chunk: bounded float32 temporaries
    for lo in range(0, images.shape[0], step):
        x = images[lo:lo + step].float()  # (b, 3, H, W)
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[lo:lo + step] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, deterministic (train, val) split: sorted int64 index tensors, disjoint, covering all.

    Each class contributes round(n_c * val_fraction) images to val (at least one stays in train).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"split_indices: val_fraction={val_fraction} must be in [0, 1); hint: e.g. 0.1")
    y = labels.cpu().numpy()
    rng = np.random.Generator(np.random.PCG64(seed))
    val = []
    for c in np.unique(y):  # sorted classes, so the draw order is fixed
        idx = np.flatnonzero(y == c)
        n_val = min(int(idx.size * val_fraction + 0.5), idx.size - 1)
        val.append(rng.permutation(idx)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_mask = np.ones(y.shape[0], bool)
    train_mask[val_idx] = False
    return torch.from_numpy(np.flatnonzero(train_mask).astype(np.int64)), torch.from_numpy(val_idx.astype(np.int64))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std on the [0, 1] scale of uint8 (N, 3, H, W) images.

    Sums are exact int64 (no float rounding, order-independent), accumulated in chunks of ~4M values.
    """
    if images.numel() == 0:
        raise DataError(f"channel_stats: got no pixels, shape {tuple(images.shape)}; hint: check the split")
    total, total_sq = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    step = max(1, 2 ** 22 // images.shape[1:].numel())
    for lo in range(0, images.shape[0], step):
        x = images[lo:lo + step].to(torch.int64)  # (b, 3, H, W)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += (x * x).sum(dim=(0, 2, 3)).cpu()
    return stats_from_sums(total, total_sq, images.shape[0] * images.shape[2] * images.shape[3])


def stats_from_sums(total: torch.Tensor, total_sq: torch.Tensor,
                    count: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) on the [0, 1] scale from exact int64 per-channel sums of pixels and their squares
    over `count` pixels per channel (shared by channel_stats and one-pass streaming statistics)."""
    mean = total.double() / count
    std = (total_sq.double() / count - mean * mean).clamp_(min=0).sqrt()
    m, s = (mean / 255).tolist(), (std / 255).tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def norm_tensors(mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1) float32 tensors on `device`: build them once, not every step
    (each build is a host-to-device copy)."""
    ms = torch.tensor([list(mean), list(std)], dtype=torch.float32).view(2, 1, -1, 1, 1)
    if torch.device(device).type == "cuda":
        ms = ms.pin_memory().to(device, non_blocking=True)  # no wait, even once per epoch
    else:
        ms = ms.to(device)
    return ms[0], ms[1]


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float32 (B, 3, H, W) on that device: (x/255 - mean)/std.
    mean/std: sequences, or the tensors of `norm_tensors` (no host-device copy then)."""
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        m, s = mean, std
    else:
        m, s = norm_tensors(cast(Sequence[float], mean), cast(Sequence[float], std), images.device)
    return (images.float() / 255 - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero-padding by `pad` + random horizontal flip, batched on the images' device.

    Offsets are drawn from the CPU `generator` in a fixed order (row offsets, column offsets,
    then flips if `flip`), so the same seed gives bit-identical results on CPU and GPU.
    """
    if generator.device.type != "cpu":
        raise DataError(f"augment: generator is on {generator.device}, expected a CPU torch.Generator; "
                         "hint: torch.Generator().manual_seed(seed)")
    b, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)  # (B,) top row of the crop in padded frame
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.randint(0, 2, (b,), generator=generator).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)  # reading columns backwards = mirrored crop
    if images.device.type == "cuda":  # pinned + non_blocking: the step does not wait for the copy
        both = torch.cat([rows, cols], 1).pin_memory().to(images.device, non_blocking=True)  # (B, H + W)
        rows, cols = both[:, :h], both[:, h:]
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H+2p, W+2p), zeros
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def fingerprint(ds: ImageSet) -> str:
    """sha256 hex over the images' shape and bytes, the labels (int64 LE) and the class names."""
    h = hashlib.sha256()
    images = ds.images.contiguous().cpu().numpy()
    h.update(json.dumps(list(images.shape)).encode())
    h.update(images.data.cast("B"))
    h.update(ds.labels.cpu().numpy().astype("<i8").tobytes())
    h.update(json.dumps(list(ds.classes)).encode())
    return h.hexdigest()
