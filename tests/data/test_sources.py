"""hpcviz.data: the four --data sources on tiny fixtures, and the tensor stages."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcviz.data.sources import BUILTIN_CLASSES, DATA_FORMS, DataError, ImageSet, fingerprint, load_images, load_rows, make_builtin, source_labels
from hpcviz.data.transforms import augment, channel_stats, normalize, resize_images, split_indices
from hpcviz.store import write_packed

from conftest import CIFAR_CLASSES, write_fake_cifar, write_image_folder, write_mixed_folder



def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- fixtures
# ----------------------------------------------------------------------------- cifar10
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_train_and_test(tmp_path, bytes_keys):
    written = write_fake_cifar(tmp_path, n=4, bytes_keys=bytes_keys)
    ds = load_images(f"cifar10:{tmp_path}")
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous() and ds.labels.dtype == torch.int64
    assert ds.classes == tuple(CIFAR_CLASSES) and ds.source == f"cifar10:{tmp_path}"
    row = written["data_batch_2"][1]  # image 5: CIFAR rows are the R, G, B planes, each 32x32 row-major
    assert torch.equal(ds.images[5], torch.from_numpy(row.reshape(3, 32, 32)))
    test = load_images(f"cifar10-test:{tmp_path}", image_size=16)
    assert test.images.shape == (4, 3, 16, 16)


def test_cifar10_missing_file_suggests_download(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_images(f"cifar10:{tmp_path}")
    assert "data_batch_3" in one_line(e) and "--download" in str(e.value)
    with pytest.raises(DataError, match="--download"):
        load_images(f"cifar10-test:{tmp_path / 'elsewhere'}")


# ----------------------------------------------------------------------------- ImageFolder
def test_image_folder_png_jpg(tmp_path):
    pngs = write_image_folder(tmp_path)
    ds = load_images(str(tmp_path))
    assert ds.classes == ("ant", "cat")  # sorted like torchvision's ImageFolder
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 3, 8, 8) and ds.images.dtype == torch.uint8
    first_png = str(tmp_path / "ant" / "img0.png")  # files sort: img0.png, img1.PNG, img2.jpg
    assert torch.equal(ds.images[0], torch.from_numpy(pngs[first_png]).permute(2, 0, 1))
    resized = load_images(str(tmp_path), image_size=4)
    assert resized.images.shape == (6, 3, 4, 4)


def test_image_folder_class_order(tmp_path):
    names = ["cat", "ant", "zebra", "Bee", "dog", "b2", "_x"]  # created unsorted; scandir order is arbitrary
    for i, name in enumerate(names):
        (tmp_path / name / "deep").mkdir(parents=True)  # images in nested folders count, like torchvision
        Image.new("RGB", (2, 2), (i, 0, 0)).save(tmp_path / name / "deep" / "x.png")
    ds = load_images(str(tmp_path))
    assert list(ds.classes) == sorted(names) == ["Bee", "_x", "ant", "b2", "cat", "dog", "zebra"]
    assert [names[int(ds.images[i, 0, 0, 0])] for i in range(len(ds))] == list(ds.classes)
    assert ds.labels.tolist() == list(range(7))


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    write_image_folder(tmp_path / "a", size=(8, 8))
    Image.new("RGB", (12, 10), (255, 0, 0)).save(tmp_path / "a" / "cat" / "big.png")
    with pytest.raises(DataError, match="--image-size"):
        load_images(str(tmp_path / "a"))
    ds = load_images(str(tmp_path / "a"), image_size=6)
    assert ds.images.shape == (7, 3, 6, 6)
    big = ds.images[ds.labels == 1][0]  # cat/big.png sorts first among cat's files
    assert (big[0] == 255).all() and (big[1:] == 0).all()


def test_corrupt_file_error_and_skip_bad(tmp_path):
    write_image_folder(tmp_path)
    bad = [tmp_path / "cat" / "broken.jpg", tmp_path / "ant" / "text.png"]
    bad[0].write_bytes((tmp_path / "cat" / "img2.jpg").read_bytes()[:60])  # truncated JPEG
    bad[1].write_text("hello")
    with pytest.raises(DataError) as e:
        load_images(str(tmp_path))
    assert "text.png" in one_line(e) and "pass --skip-bad to skip unreadable files" in str(e.value)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # the 'hpcviz' logger may not propagate (hpcviz.log), so listen directly
    logger = logging.getLogger("hpcviz")
    logger.addHandler(handler)
    try:
        ds = load_images(str(tmp_path), skip_bad=True)
    finally:
        logger.removeHandler(handler)
    assert len(ds) == 6
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2" in warnings[0]
    assert "broken.jpg" in warnings[0] and "text.png" in warnings[0]


@pytest.mark.parametrize("batch,stream_bytes", [(256, None), (2, None), (3, 300)])
def test_image_folder_stream_same_pixels_as_load_images(tmp_path, monkeypatch, batch, stream_bytes):
    """Batches (and resize flushes) cut anywhere give the same set as load_images, bit for bit."""
    import hpcviz.data.sources as data
    write_mixed_folder(tmp_path)
    if stream_bytes:  # tiny byte bounds: a batch ends early, pending resizes flush after ~every image
        monkeypatch.setattr(data, "_STREAM_BYTES", stream_bytes)
    whole = load_images(str(tmp_path), image_size=6, skip_bad=True)
    stream = data.ImageFolderStream(str(tmp_path), 6, skip_bad=True, batch=batch)
    assert stream.classes == whole.classes and stream.n_files == 13
    got = list(stream)
    assert all(images.shape[0] <= batch and images.dtype == torch.uint8 and labels.dtype == torch.int64
               for images, labels in got)
    assert len(got) > 1 or batch == 256
    images, labels = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
    assert images.shape == (11, 3, 6, 6) and torch.equal(images, whole.images) and torch.equal(labels, whole.labels)
    assert stream.files_done == 13 and stream.n_images == 11 and len(stream.skipped) == 2
    assert fingerprint(ImageSet(images, labels, stream.classes, "x")) == fingerprint(whole)


def test_image_folder_stream_errors(tmp_path):
    import hpcviz.data.sources as data
    bad = write_mixed_folder(tmp_path / "a")
    with pytest.raises(DataError) as e:  # unreadable file: the same message as load_images
        list(data.ImageFolderStream(str(tmp_path / "a"), 6))
    assert "text.png" in one_line(e) and "pass --skip-bad" in str(e.value)
    for path in bad:
        path.unlink()
    with pytest.raises(DataError) as e:  # mixed sizes without image_size: found on the fly, both files named
        list(data.ImageFolderStream(str(tmp_path / "a"), batch=2))
    msg = one_line(e)
    assert "different sizes" in msg and "(8, 8)" in msg and "(12, 10)" in msg and "x0.png" in msg
    assert "--image-size S" in msg and DATA_FORMS in msg
    (tmp_path / "b" / "cat").mkdir(parents=True)
    (tmp_path / "b" / "cat" / "x.png").write_text("not a png")
    with pytest.raises(DataError, match="no readable images"):
        list(data.ImageFolderStream(str(tmp_path / "b"), skip_bad=True))
    for spec, size, expect in [(str(tmp_path / "a"), 0, "positive integer"),
                               (str(tmp_path / "c"), 4, "no such directory")]:
        with pytest.raises(DataError, match=expect):  # bad size, no folder: before decoding anything
            data.ImageFolderStream(spec, size)


@pytest.mark.parametrize("layout,expect", [
    ("missing", "no such directory"),
    ("empty", "no class subfolders"),
    ("files_only", "no class subfolders"),
    ("empty_class", "has no images"),
])
def test_image_folder_bad_layouts(tmp_path, layout, expect):
    root = tmp_path / "root"
    if layout != "missing":
        root.mkdir()
    if layout == "files_only":
        Image.new("RGB", (4, 4)).save(root / "x.png")
    if layout == "empty_class":
        write_image_folder(root)
        (root / "zebra").mkdir()
        (root / "zebra" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        load_images(str(root))
    assert expect in one_line(e) and DATA_FORMS in str(e.value)


@pytest.mark.parametrize("spec", ["nonsense", "builtin:x", "builtin:0", "missing.h5"])
def test_bad_specs(tmp_path, spec):
    with pytest.raises(DataError) as e:
        load_images(str(tmp_path / spec) if spec.endswith(".h5") else spec)
    assert DATA_FORMS in one_line(e)


# ----------------------------------------------------------------------------- packed
def test_packed_source(tmp_path):
    src = make_builtin(3, 8, seed=1)
    path = tmp_path / "p.h5"
    write_packed(path, src.images.numpy(), src.labels.numpy(), src.classes, {"source": "builtin:3"})
    ds = load_images(str(path))
    assert torch.equal(ds.images, src.images) and torch.equal(ds.labels, src.labels)
    assert ds.classes == src.classes and fingerprint(ds) == fingerprint(src)
    assert load_images(str(path), image_size=4).images.shape == (30, 3, 4, 4)
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not an HDF5 file"):
        load_images(str(path))


@pytest.mark.parametrize("source", ["builtin:3", "packed", "packed16", "folder", "cifar10"])
def test_rows_and_labels_without_loading_the_whole_source(tmp_path, monkeypatch, source):
    """load_rows gives exactly load_images' rows, and source_labels its labels; the packed file at its own size
    and the folder are read row by row (load_images is never called, only the asked files are decoded)."""
    import hpcviz.data.sources as data
    if source.startswith("packed"):
        src = make_builtin(3, 8, seed=1)
        spec = str(tmp_path / "p.h5")
        write_packed(spec, src.images.numpy(), src.labels.numpy(), src.classes, {"source": "builtin:3"})
    elif source == "folder":
        write_image_folder(tmp_path)
        spec = str(tmp_path)
    elif source == "cifar10":
        write_fake_cifar(tmp_path)
        spec = f"cifar10:{tmp_path}"
    else:
        spec = source
    size = 16 if source == "packed16" else 8
    whole = load_images(spec, image_size=size)
    rows = [5, 0, 3, 3]
    labels = source_labels(spec)
    if source == "cifar10":
        assert labels is None  # only known by reading the batches
    else:
        assert labels is not None and torch.equal(labels[0], whole.labels) and labels[1] == whole.classes
    decoded = []
    if source in ("packed", "folder", "builtin:3"):
        def refuse(*a, **k):
            raise AssertionError("load_images called: the whole source was read")
        monkeypatch.setattr(data, "load_images", refuse)
        real = data._decode
        monkeypatch.setattr(data, "_decode", lambda path, tvio: decoded.append(path) or real(path, tvio))
    got = load_rows(spec, size, rows)
    assert got.dtype == torch.uint8 and torch.equal(got, whole.images[rows])
    assert len(decoded) == (4 if source == "folder" else 0)
    assert load_rows(spec, size, []).shape == (0, 3, size, size)


# ----------------------------------------------------------------------------- builtin
def test_builtin_deterministic_and_balanced():
    a, b, c = make_builtin(20, 16, seed=0), make_builtin(20, 16, seed=0), make_builtin(20, 16, seed=1)
    assert a.images.shape == (200, 3, 16, 16) and a.images.dtype == torch.uint8 and a.images.is_contiguous()
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert torch.bincount(a.labels, minlength=10).tolist() == [20] * 10
    assert a.classes == BUILTIN_CLASSES and len(set(a.classes)) == 10
    assert a.labels[:20].unique().numel() > 3  # shuffled, not sorted by class
    per_image_std = a.images.float().std(dim=(1, 2, 3))
    assert (per_image_std > 5).all()  # every image has some structure or noise


@pytest.mark.parametrize("n,size", [(500, 32), (4, 224)])
def test_builtin_rows_are_the_whole_sets(n, size):
    """The built-in set's images at some rows, byte for byte those of the whole set: rows in any order, twice,
    in several of the generator's chunks (1,024 images at 32 px, 20 at 224 px) and in the last one."""
    from hpcviz.data import builtin
    whole, labels = builtin.draw(n, size, 0)
    rows = np.array([10 * n - 1, 3, 1500 % (10 * n), 3, 21, 0])
    got, got_labels = builtin.draw(n, size, 0, rows)
    assert got.dtype == np.uint8 and np.array_equal(got, whole[rows]) and np.array_equal(got_labels, labels)
    assert builtin.draw(n, size, 0, np.array([], np.int64))[0].shape == (0, 3, size, size)
    for bad in (10 * n, -1):
        with pytest.raises(IndexError, match=f"rows 0..{10 * n - 1}"):
            builtin.draw(n, size, 0, np.array([0, bad]))


def test_builtin_via_spec():
    ds = load_images("builtin:2", image_size=12, seed=3)
    assert len(ds) == 20 and ds.images.shape[-2:] == (12, 12) and ds.source == "builtin:2"
    assert torch.equal(ds.images, make_builtin(2, 12, seed=3).images)
    assert load_images("builtin").images.shape == (5000, 3, 32, 32)


# ----------------------------------------------------------------------------- stages
def test_resize_images():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert resize_images(x, 8) is x
    const = torch.full((2, 3, 9, 7), 77, dtype=torch.uint8)
    y = resize_images(const, 4)
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.uint8 and (y == 77).all()


def test_split_indices():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    train, val = split_indices(labels, 0.1, seed=5)
    again_train, again_val = split_indices(labels, 0.1, seed=5)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert train.dtype == val.dtype == torch.int64
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))  # disjoint, union = all
    assert torch.bincount(labels[val], minlength=3).tolist() == [5, 3, 2]  # stratified
    assert not torch.equal(split_indices(labels, 0.1, seed=6)[1], val)
    assert split_indices(labels, 0.0, seed=0)[1].numel() == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(labels, 1.0, seed=0)


def test_channel_stats():
    x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    x[1, 0] = 255            # channel 0: half 0, half 255  -> mean 0.5, std 0.5
    x[:, 1] = 51             # channel 1: constant 51       -> mean 0.2, std 0
    x[0, 2, 0, 0] = 255      # channel 2: one 255 in 8      -> mean 1/8, std sqrt(1/8 - 1/64)
    mean, std = channel_stats(x)
    assert mean == pytest.approx((0.5, 0.2, 0.125), abs=1e-12)
    assert std == pytest.approx((0.5, 0.0, (1 / 8 - 1 / 64) ** 0.5), abs=1e-12)
    big = torch.randint(0, 256, (3000, 3, 32, 32), dtype=torch.uint8)  # > one chunk
    ref = big.numpy().astype(np.float64) / 255
    mean, std = channel_stats(big)
    assert mean == pytest.approx(tuple(ref.mean(axis=(0, 2, 3))), abs=1e-12)
    assert std == pytest.approx(tuple(ref.std(axis=(0, 2, 3))), abs=1e-12)


def test_normalize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x, (0.5, 0.5, 0.2), (0.25, 0.5, 1.0))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2) and y.device == x.device
    assert torch.allclose(y[:, 0], torch.tensor(-2.0)) and torch.allclose(y[:, 1], torch.tensor(1.0))
    assert torch.allclose(y[:, 2], torch.tensor(0.0), atol=1e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_shape_dtype_and_seeding(dtype):
    x = torch.randint(0, 256, (16, 3, 10, 12), dtype=torch.uint8).to(dtype)
    a = augment(x, _gen(0))
    assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
    assert torch.equal(a, augment(x, _gen(0)))
    assert not torch.equal(a, augment(x, _gen(1)))
    assert torch.equal(augment(x, _gen(3), pad=0, flip=False), x)


def test_augment_flip_only():
    x = torch.randint(0, 256, (32, 3, 5, 6), dtype=torch.uint8)
    a = augment(x, _gen(0), pad=0, flip=True)
    flipped = torch.flip(x, dims=[3])
    is_flipped = (a == flipped).flatten(1).all(1)
    is_same = (a == x).flatten(1).all(1)
    assert (is_flipped ^ is_same).all()  # random images are never symmetric: exactly one holds
    assert 0 < is_flipped.sum() < 32
    assert torch.equal(a[is_flipped], torch.flip(x[is_flipped], dims=[3]))


def test_augment_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.randint(1, 256, (12, 3, 6, 6), dtype=torch.uint8)  # no zeros, so padding is visible
    pad = 2
    a = augment(x, _gen(7), pad=pad, flip=False)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(12):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(a[i], padded[i, :, dy:dy + 6, dx:dx + 6])]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 1


def test_fingerprint_sensitivity():
    ds = make_builtin(2, 8)
    base = fingerprint(ds)
    assert len(base) == 64 and int(base, 16) >= 0
    images = ds.images.clone()
    images[0, 0, 0, 0] ^= 1
    labels = ds.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    classes = ("x",) + ds.classes[1:]
    for changed in (ImageSet(images, ds.labels, ds.classes, ds.source),
                    ImageSet(ds.images, labels, ds.classes, ds.source),
                    ImageSet(ds.images, ds.labels, classes, ds.source)):
        assert fingerprint(changed) != base
    assert fingerprint(ImageSet(ds.images, ds.labels, ds.classes, "other source")) == base
