"""The atlas: its pages from synthetic arrays (pages of 256 cards, neighbours linked, every link and anchor
resolving, no script, hostile class names escaped), and the same pages in a real browser (headless Chromium,
from the file system: every image there and decoding, a screenshot that is not blank)."""
import io
import os
import shutil
import subprocess
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from hpcviz.report.atlas import PAGE, BlockData, atlas_files, card_href, featviz_pixels, page_name

from conftest import Page, check_links

HOSTILE = ["<script>alert(1)</script>", "a\"b' onload=x", "cat & dog", "[/]", "</li><li>", "ok"]


def block(name, channels, k=4, classes=6, size=8, featviz=True, projected=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(channels, 3, size, size)).astype(np.float32)
    mean = rng.uniform(0, 2, size=(classes, channels)).astype(np.float32)
    mean[0, 0] = np.nan  # a class without images
    return BlockData(
        name, channels, featviz_pixels(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)) if featviz else None,
        rng.uniform(0, 3, channels).astype(np.float32) if featviz else None,
        rng.integers(1, 128, channels) if featviz else None,
        rng.integers(0, 256, (channels, k, 3, 5, 5), dtype=np.uint8) if projected else None,
        rng.normal(size=(channels, k, 3, 5, 5)).astype(np.float32) if projected else None,
        np.sort(rng.uniform(0, 5, (channels, k)))[:, ::-1], rng.integers(-1, classes, (channels, k)),
        rng.uniform(0, 1, channels).astype(np.float32), rng.integers(0, classes, channels), mean)


@pytest.fixture(scope="module")
def files():
    data = {"conv1": block("conv1", 16, featviz=False), "layer1.0": block("layer1.0", PAGE + 44, seed=1),
            "layer2.0": block("layer2.0", 32, projected=False, seed=2)}
    return atlas_files(list(data), data.__getitem__, HOSTILE, "run <b>&")


def test_pages_cards_and_links(files):
    assert set(p for p in files if p.endswith(".html")) == {
        "atlas/index.html", "atlas/conv1.html", "atlas/layer1.0.html", "atlas/layer1.0-2.html", "atlas/layer2.0.html"}
    assert check_links(files) > 3 * (16 + PAGE + 44 + 32)  # cards, images, navigation
    first, second = Page(files["atlas/layer1.0.html"].decode()), Page(files["atlas/layer1.0-2.html"].decode())
    assert {i for i in first.ids if i.startswith("c")} == {f"c{c}" for c in range(PAGE)}  # at most 256 cards a page
    assert {i for i in second.ids if i.startswith("c")} == {f"c{c}" for c in range(PAGE, PAGE + 44)}
    assert card_href("layer1.0", 300) == "layer1.0-2.html#c300" and page_name("layer1.0", 0) == "layer1.0.html"
    # neighbours: the previous and next block, the next page
    for link in ("conv1.html", "layer2.0.html", "layer1.0-2.html", "index.html"):
        assert link in first.links, link
    assert "layer1.0.html" in second.links and "layer2.0.html" in second.links
    # every card's images; the feature visualization is the channel's own pixels
    assert Image.open(io.BytesIO(files["atlas/img/layer1.0/fv-0017.png"])).size == (8, 8)
    strip = Image.open(io.BytesIO(files["atlas/img/layer1.0/ex-0017.png"]))
    assert strip.size[0] > 4 * 24 and strip.size[1] > 2 * 24  # 4 tiles of 5 px enlarged to 25, two rows
    assert not any(p.startswith("atlas/img/conv1/fv-") for p in files)  # not computed: said on the card
    assert "no feature visualization" in files["atlas/conv1.html"].decode()
    assert not any(p.startswith("atlas/img/layer2.0/ex-") for p in files)  # not projected: the labels only
    index = files["atlas/index.html"].decode()
    assert index.count('class="thumb"') >= len(HOSTILE) - 1


def test_no_script_and_every_text_escaped(files):
    for path, data in files.items():
        if not path.endswith(".html"):
            continue
        text = data.decode()
        page = Page(text)
        assert "script" not in page.tags and "<script" not in text.lower(), path
        assert not [a for a in page.attrs if a.startswith("on")], path  # no event handler attribute
        assert "a\"b'" not in text and "run <b>&" not in text, path  # a class name and the run's name escaped
    layer = files["atlas/layer1.0.html"].decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in layer and "cat &amp; dog" in layer
    assert "&lt;/li&gt;&lt;li&gt;" in layer and "a&quot;b&#x27; onload=x" in layer


def test_featviz_pixels_undo_the_normalisation():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = (pixels.transpose(0, 3, 1, 2) / 255 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    assert np.array_equal(featviz_pixels(x.astype(np.float32), mean, std), pixels)


# ------------------------------------------------------------------------------------------ in a browser
def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture
def browser():
    path = chromium()
    if path is None:
        why = "chromium is not on PATH (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return path


def run_chromium(exe, profile, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    r = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_a_block_page_in_headless_chromium(files, browser, tmp_path):
    root = tmp_path / "report"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "report.html").write_text("<!DOCTYPE html><title>report</title>")
    page = root / "atlas" / "layer1.0.html"
    dom = run_chromium(browser, tmp_path / "profile1", "--dump-dom", page.as_uri())
    loaded = Page(dom)
    assert "script" not in loaded.tags and len([i for i in loaded.ids if i.startswith("c")]) == PAGE
    assert len(loaded.imgs) == 2 * PAGE  # the browser's DOM: every card's two images
    for img in loaded.imgs:  # each one a file beside the page that decodes, at its stated size or enlarged
        with Image.open(page.parent / unquote(img["src"])) as im:
            im.load()
            assert im.size[0] >= 1 and int(img["width"]) >= im.size[0]
    shot = tmp_path / "shot.png"
    run_chromium(browser, tmp_path / "profile2", "--window-size=1200,900", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 10  # drawn: text, bars and images, not blank
    assert (pixels.reshape(-1, 3).std(1) > 30).mean() > 0.01  # colour: the images were drawn
