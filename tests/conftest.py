"""Shared fixtures: tiny configs, a free port, and the SLURM marker's skip/fail rule."""
from __future__ import annotations

import html.parser
import os
import pickle
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import h5py
import numpy as np
import pytest
from PIL import Image

from hpcviz.store import PACKED_FORMAT, ShardWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_tiny(run: Path) -> Path:
    """A ResNet-20 trained one epoch on 180 built-in images at 16 px, in this process (a few seconds): the run the
    visualization tests take their checkpoint from."""
    from hpcviz.config import TrainConfig
    from hpcviz.train.loop import train
    train(TrainConfig(data="builtin:20", image_size=16, arch="resnet20", epochs=1, batch_size=32, lr=0.05,
                      device="cpu", run_dir=str(run), log_every=1000))
    return run


def run_job(script: str, *args: object, timeout: float = 600, cpu: bool = False,
            **kw: object) -> subprocess.CompletedProcess:
    """`python jobs/SCRIPT ARGS` from the checkout, stdout and stderr captured as text: how tests run a command.
    cpu: hide any GPU (CUDA_VISIBLE_DEVICES=''), for tests that promise CPU behaviour."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


def slurm_available() -> tuple[bool, str]:
    if not shutil.which("sinfo"):
        return False, "sinfo is not on PATH (start it with: bash slurm/testcluster.sh start)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"sinfo failed: {e}"
    if r.returncode != 0:
        return False, f"no SLURM cluster answers ({r.stderr.strip()[:120]}); start one: bash slurm/testcluster.sh start"
    return True, ""


def scontrol_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


_SLURM: tuple[bool, str] | None = None


# files whose tests are many minutes together: their tests spread over the workers (a module fixture is then
# built once per worker that runs one of them, a few seconds against minutes)
_SPREAD = ("tests/commands/test_commands.py", "tests/launch/test_pipeline.py")


@pytest.hookimpl(tryfirst=True)  # the groups are set before xdist's own hook reads them
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`make test` runs 2 workers, `--dist loadgroup`): every SLURM test on one worker, first
    (their jobs would queue behind each other's and meet their waits' limits; first, so their waiting overlaps
    the rest), a file's tests on one worker (its module fixtures, a trained run, built once), except the few
    long files whose tests spread."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "slurm" if "slurm" in item.keywords else item.nodeid if path in _SPREAD else path
        item.add_marker(pytest.mark.xdist_group(group))
    items[:] = sorted(items, key=lambda item: "slurm" not in item.keywords)  # stable: the rest keep their order


def pytest_runtest_setup(item):
    """Tests marked `slurm` skip (with the reason) without a cluster; under CI=true they fail instead."""
    global _SLURM
    if "slurm" not in item.keywords:
        return
    if _SLURM is None:
        _SLURM = slurm_available()
    ok, why = _SLURM
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no SLURM cluster: {why}")
    pytest.skip(f"no SLURM cluster: {why}")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A TrainConfig that trains a ResNet-20 on 200 builtin 16 px images in a few seconds."""
    from hpcviz.config import TrainConfig

    def make(**kw):
        base = dict(data="builtin:20", image_size=16, arch="resnet20", epochs=2, batch_size=32, lr=0.05,
                    eval_batch_size=64, run_dir=str(tmp_path / "run"), device="cpu", log_every=1000)
        base.update(kw)
        return TrainConfig(**base)
    return make


# ------------------------------------------------------------------------------------------ data sets on disk
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root: Path, n: int = 4, bytes_keys: bool = False) -> dict[str, np.ndarray]:
    """The torchvision layout root/cifar-10-batches-py, n images per batch file (md5s will not match)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        (folder / name).write_bytes(pickle.dumps({key("data"): data, key("labels"): labels}))
        written[name] = data
    (folder / "batches.meta").write_bytes(pickle.dumps({key("label_names"): CIFAR_CLASSES}))
    return written


def write_image_folder(root: Path, size: tuple[int, int] = (8, 8)) -> dict[str, np.ndarray]:
    """root/{cat,ant}/ with two PNGs and a JPEG each (ant sorts first); returns the PNG pixels by path."""
    rng = np.random.default_rng(1)
    pngs = {}
    for cls in ("cat", "ant"):
        (root / cls).mkdir(parents=True)
        for i, ext in enumerate(("png", "PNG", "jpg")):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)  # (H, W, 3)
            path = root / cls / f"img{i}.{ext}"
            Image.fromarray(pixels).save(path, format="PNG" if ext.lower() == "png" else "JPEG")
            if ext.lower() == "png":
                pngs[str(path)] = pixels
        (root / cls / "notes.txt").write_text("not an image, and not an image extension: ignored")
    return pngs


def write_mixed_folder(root: Path) -> list[Path]:
    """The write_image_folder set plus photos of other sizes (some already 6x6) and two unreadable files."""
    write_image_folder(root)
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(12, 10), (6, 6), (30, 17), (12, 10), (6, 6)]):
        cls = ("ant", "cat")[i % 2]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"x{i}.png")
    bad = [root / "cat" / "broken.jpg", root / "ant" / "text.png"]
    bad[0].write_bytes((root / "cat" / "img2.jpg").read_bytes()[:60])  # truncated JPEG
    bad[1].write_text("hello")
    return bad


# ------------------------------------------------------------------------------------------ store fixtures
CLASSES = ["a", "b", "c"]


def tiny(n: int = 300, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 3, n)


def one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "hint" in msg
    return msg



ROOT_ATTRS = {"run": "r1", "checkpoint_sha256": "ab" * 32, "arch": "resnet20", "image_size": 4, "lr": 0.1,
              "flag": True, "class_names": ["cat", "dog"], "mean": [0.5, 0.25, 0.125],
              "config": {"viz": {"split": "val", "blocks": ["layer1.0"]}, "epochs": 2}}
DIMS = {"index": ("image",), "images": ("image", "channel", "y", "x"), "label": ("image",),
        "logits": ("image", "class"), "act/layer1.0": ("image", "channel", "y", "x"),
        "deconv/layer1.0/residual": ("image", "channel", "y", "x")}


def shard_data(n: int, seed: int = 0, offset: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"index": np.arange(offset, offset + n, dtype=np.int64),
            "images": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
            "label": rng.integers(0, 2, n),
            "logits": rng.standard_normal((n, 2)).astype(np.float32),
            "act/layer1.0": rng.standard_normal((n, 5, 2, 2)).astype(np.float32),
            "deconv/layer1.0/residual": rng.standard_normal((n, 3, 4, 4)).astype(np.float32)}


def write_shard(path: Path, data: dict[str, np.ndarray], batch: int = 4, compression: str | None = None,
                **attrs) -> dict[str, np.ndarray]:
    """Write `data` in batches like an array task (act/* as float16); returns what should read back."""
    n = len(data["index"])
    with ShardWriter(path, n, {**ROOT_ATTRS, **attrs}, compression=compression) as w:
        for name, array in data.items():
            act = name.startswith("act/")
            for start in range(0, n, batch):
                w.write(name, start, array[start:start + batch], dims=DIMS[name],
                        dtype=np.float16 if act else None, attrs={"block": "layer1.0"} if act else None)
    with np.errstate(over="ignore"):  # planted overflows
        return {k: v.astype(np.float16) if k.startswith("act/") else v for k, v in data.items()}


def make_shards(folder: Path, sizes: list[int], **kw) -> tuple[list[Path], list[dict[str, np.ndarray]]]:
    paths, datas, offset = [], [], 0
    for k, n in enumerate(sizes):
        paths.append(folder / f"shard-{k:05d}.h5")
        datas.append(write_shard(paths[-1], shard_data(n, seed=k, offset=offset), shard=k, **kw))
        offset += n
    return paths, datas


def write_chunked(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A packed file in the layout written before /images became contiguous (chunked by 256 images)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(min(256, len(images)), *images.shape[1:]))
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.attrs.update({"format": PACKED_FORMAT, "classes": '["a", "b", "c"]', "n": len(images),
                        "image_size": images.shape[2], "height": images.shape[2], "width": images.shape[3]})


# ------------------------------------------------------------------------------------------ HTML pages
class Page(html.parser.HTMLParser):
    """What a page links and defines: hrefs and srcs, ids, tags."""

    def __init__(self, text):
        super().__init__()
        self.links, self.ids, self.tags, self.imgs, self.attrs = [], set(), [], [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.update(a)
        self.ids.update([a["id"]] if "id" in a else [])
        self.links += [a[k] for k in ("href", "src") if k in a]
        if tag == "img":
            self.imgs.append(a)


def check_links(files: dict[str, bytes], exempt: tuple[str, ...] = ("../report.html",), under: str = "") -> int:
    """Every link of every HTML page of `files` ({path: bytes}, paths relative to one folder) under `under` is
    relative and resolves to one of `files`, and its anchor to an id there (`exempt`: links not checked).
    Returns the links checked."""
    pages = {p: Page(b.decode()) for p, b in files.items() if p.endswith(".html")}
    checked = 0
    for path, page in pages.items():
        if not path.startswith(under):
            continue
        for link in page.links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, (path, link)  # nothing outside the atlas
            if parts.path in exempt:
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), unquote(parts.path))) \
                if parts.path else path
            assert target in files, (path, link)
            if parts.fragment:
                assert parts.fragment in pages[target].ids, (path, link)
            checked += 1
    return checked


# ------------------------------------------------------------------------------------------ memory
def peak_bytes(fn) -> int:
    """The most bytes `fn` held at once beyond what existed before it, on the CPU: torch's profiler records every
    allocation and free of c10's CPU allocator (which every tensor's storage goes through) with its size and
    time; the peak is the largest running sum. What oneDNN allocates inside a kernel for itself is not seen."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
