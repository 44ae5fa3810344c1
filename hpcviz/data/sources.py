"""Image sources for hpcviz (`--data SPEC`, see DATA_FORMS): the built-in set, CIFAR-10, image folders and packed
files, loaded whole, peeked at without decoding, or read row by row.

A set is held in memory as one (N, 3, H, W) uint8 tensor (CIFAR-10: 150 MB), so training indexes
batches directly and moves uint8 (4x less traffic than float32) to the GPU, where `augment` and
`normalize` (hpcviz.data.transforms) run batched. FILE.h5 is the packed form written by jobs/pack_data.py
(hpcviz.store).
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

import numpy as np
import torch

from ..errors import InputError
from . import builtin
from .builtin import BUILTIN_CLASSES
from .transforms import resize_images
from ..store import PackedReader, StoreError, read_packed

__all__ = ["DataError", "ImageSet", "SourceFacts", "peek", "check_split", "ImageFolderStream", "DATA_FORMS",
           "BUILTIN_CLASSES", "IMAGE_EXTENSIONS", "load_images", "make_builtin", "fingerprint"]

log = logging.getLogger("hpcviz")

DATA_FORMS = "builtin | builtin:N_PER_CLASS | cifar10:DIR | cifar10-test:DIR | DIR (ImageFolder) | FILE.h5 (packed)"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
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
    _check_size(spec, image_size)
    if (n := _builtin_n(spec)) is not None:
        return replace(make_builtin(n, image_size or 32, seed), source=spec)
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


def _check_size(spec: str, image_size: int | None) -> None:
    if image_size is not None and image_size < 1:
        raise _error(spec, f"--image-size {image_size} must be a positive integer", "e.g. --image-size 32")


def _builtin_n(spec: str) -> int | None:
    """N_PER_CLASS of a `builtin[:N_PER_CLASS]` spec (default 500), checked; None for any other source."""
    if not (spec == "builtin" or spec.startswith("builtin:")):
        return None
    n_text = spec.partition(":")[2] or "500"
    if not n_text.isdigit() or int(n_text) < 1:
        raise _error(spec, f"N_PER_CLASS {n_text!r} is not a positive integer", "e.g. builtin:500")
    return int(n_text)


def check_source(spec: str, download: bool = False) -> None:
    """The cheap part of load_images' checks (names, paths, folder layout), without decoding
    anything: launchers run it before submitting, so a typo fails at once, not in the queue."""
    if _builtin_n(spec) is not None:
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
    if (n := _builtin_n(spec)) is not None:
        small = n * len(BUILTIN_CLASSES) * image_size ** 2 <= 2 ** 25  # drawn in about a second at most
        return SourceFacts(BUILTIN_CLASSES, (n,) * len(BUILTIN_CLASSES),
                           fingerprint(make_builtin(n, image_size)) if small else None)
    if spec.lower().endswith((".h5", ".hdf5")):
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
    if (n := _builtin_n(spec)) is not None:
        return torch.from_numpy(builtin.labels(n, 0)), BUILTIN_CLASSES
    if spec.lower().endswith((".h5", ".hdf5")):
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
    those: rows of a packed file at `image_size`, the files of an image folder, the built-in set's images (its
    generator still runs up to the last of them). Other sources (CIFAR batches, a packed file of another size, a
    folder with skip_bad) are loaded whole, then indexed."""
    idx = np.asarray(rows, dtype=np.int64)
    if (n := _builtin_n(spec)) is not None:
        _check_size(spec, image_size)
        return torch.from_numpy(builtin.draw(n, image_size, 0, idx)[0])
    if spec.lower().endswith((".h5", ".hdf5")):
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


def make_builtin(n_per_class: int = 500, image_size: int = 32, seed: int = 0) -> ImageSet:
    """The procedural 10-class set (hpcviz.data.builtin), `n_per_class` images per class, drawn at `image_size`."""
    if n_per_class < 1 or image_size < 1:
        raise DataError(f"make_builtin: n_per_class={n_per_class} and image_size={image_size} must be >= 1; "
                        f"valid forms: {DATA_FORMS}; hint: use e.g. builtin:500")
    images, labels = builtin.draw(n_per_class, image_size, seed)
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
        _check_size(spec, image_size)
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
    if not os.path.isfile(spec):
        raise _error(spec, "no such file", "check the path, or write it with python jobs/pack_data.py --out FILE.h5")
    try:
        images, labels, classes, _attrs = read_packed(spec)
    except StoreError as e:  # callers catch DataError for every --data problem
        raise DataError(f"--data {e}") from e
    return _make_set(torch.from_numpy(images), torch.from_numpy(labels), classes, spec, image_size)


def fingerprint(ds: ImageSet) -> str:
    """sha256 hex over the images' shape and bytes, the labels (int64 LE) and the class names."""
    h = hashlib.sha256()
    images = ds.images.contiguous().cpu().numpy()
    h.update(json.dumps(list(images.shape)).encode())
    h.update(images.data.cast("B"))
    h.update(ds.labels.cpu().numpy().astype("<i8").tobytes())
    h.update(json.dumps(list(ds.classes)).encode())
    return h.hexdigest()
