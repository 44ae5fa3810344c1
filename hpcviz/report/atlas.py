"""The atlas: every channel of every block on one card, in static HTML pages beside the report (report/atlas/).

A card shows what a channel responds to, three ways: its feature visualization (the input optimised to excite
it, /featviz/<block>), its dataset examples (the patches of the images where it fires most, with their
deconvnet projections, /examples/<block>/{patch,deconv}, and those images' classes, /topk/<block>/*) and its
class statistics (its class selectivity and the mean activation per class, /selectivity, /class_mean).

    atlas/index.html                 the blocks, and per class its most selective channels
    atlas/<block>.html               a block's cards, 256 per page: <block>-2.html, ... after the first
    atlas/img/<block>/fv-NNNN.png    channel NNNN's feature visualization (its own pixels: the page enlarges it)
    atlas/img/<block>/ex-NNNN.png    its top patches (top row) above their projections (bottom row)

Every card has an anchor (<block>.html#c17) and every page links the index, its neighbouring pages and blocks.
The pages hold no script and link only relative files, so the atlas works from a file system and from any
static web server. Pure functions: they take arrays and return {path inside report/: bytes}; the aggregation
reads viz.h5 and writes the files. Every text from the run (class names above all) is escaped.
"""
from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..explain.tiles import tile_rgb
from .render import html_text as esc

__all__ = ["BlockData", "PAGE", "atlas_files", "block_files", "index_page", "page_name", "card_href",
           "featviz_pixels"]

PAGE = 256          # channels per page
_TILE = 24          # example tiles are enlarged (nearest) to at least this many pixels a side
_FEATVIZ_PX = 128   # a feature visualization is shown this large (pixelated)
_BARS = 10          # class-mean bars per card (the classes with the largest means, beyond 10 classes)
_PER_CLASS = 6      # most selective channels listed per class on the index


@dataclass
class BlockData:
    """What a block's cards show; any part may be missing (None) and is then said so on the card."""
    name: str
    channels: int
    featviz: np.ndarray | None = None        # (C, H, W, 3) uint8 pixels (`featviz_pixels`)
    featviz_value: np.ndarray | None = None  # (C,) the activation the image reaches
    featviz_steps: np.ndarray | None = None  # (C,) the steps it took
    patch: np.ndarray | None = None          # (C, k, 3, P, Q) uint8
    deconv: np.ndarray | None = None         # (C, k, 3, P, Q) float, any scale
    topk_value: np.ndarray | None = None     # (C, k) the activation peaks of the top images
    topk_label: np.ndarray | None = None     # (C, k) their classes
    selectivity: np.ndarray | None = None    # (C,)
    selective_class: np.ndarray | None = None  # (C,)
    class_mean: np.ndarray | None = None     # (K, C)


def featviz_pixels(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Feature visualizations in the normalised input space (C, 3, H, W) -> pixels (C, H, W, 3) uint8."""
    m, s = np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    pixels = np.nan_to_num(np.clip(x * s + m, 0, 1), nan=0.0)
    return np.round(255 * pixels).astype(np.uint8).transpose(0, 2, 3, 1)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # zlib level 6, not 9: 1.5 vs 5.0 ms a tile for 0.4% more bytes (measured on a ResNet-20 atlas's 704 PNGs)
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _slug(block: str) -> str:
    """A file name for a block: module names are [A-Za-z0-9_.]; anything else becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", block).lstrip(".") or "_"


def page_name(block: str, page: int) -> str:
    """The page (0-based) of a block, relative to atlas/."""
    return f"{_slug(block)}.html" if page == 0 else f"{_slug(block)}-{page + 1}.html"


def card_href(block: str, channel: int) -> str:
    """The card of a channel, relative to atlas/ (a link target: percent-encoded)."""
    return quote(page_name(block, channel // PAGE)) + f"#c{channel}"


def _img(block: str, kind: str, channel: int) -> str:
    return f"img/{_slug(block)}/{kind}-{channel:04d}.png"


def _strip(patch: np.ndarray, deconv: np.ndarray, gap: int = 2) -> np.ndarray:
    """(k, 3, P, Q) patches above their (k, 3, P, Q) projections (each min-max scaled), tiles enlarged to at
    least _TILE pixels: (H, W, 3) uint8 on white."""
    k, _, p, q = patch.shape
    s = max(1, -(-_TILE // max(p, q)))
    th, tw = p * s, q * s
    out = np.full((2 * th + 3 * gap, k * (tw + gap) + gap, 3), 255, np.uint8)
    for row, tiles in enumerate((patch, deconv)):
        for j, t in enumerate(tiles):
            rgb = tile_rgb(t)
            pix = rgb if rgb.dtype == np.uint8 else np.round(255 * rgb).astype(np.uint8)
            y0, x0 = gap + row * (th + gap), gap + j * (tw + gap)
            out[y0:y0 + th, x0:x0 + tw] = pix.repeat(s, 0).repeat(s, 1)
    return out


def _class(classes: Sequence[str], k: int) -> str:
    return classes[k] if 0 <= k < len(classes) else f"class {k}" if k >= 0 else "?"


def _num(v: float) -> str:
    return f"{v:.3g}" if np.isfinite(v) else "n/a"


def _bars(means: np.ndarray, prefer: int, classes: Sequence[str]) -> str:
    """The channel's mean activation per class as labelled bars (its largest classes beyond _BARS)."""
    m = np.nan_to_num(np.asarray(means, np.float64), nan=0.0)
    order = np.arange(len(m)) if len(m) <= _BARS else np.argsort(-m, kind="stable")[:_BARS]
    top = float(m.max()) if len(m) and m.max() > 0 else 1.0
    rows = []
    for k in order:
        width = max(0.0, min(100.0, 100 * float(m[k]) / top))
        cls = " class=\"pref\"" if int(k) == prefer else ""
        rows.append(f"<li{cls}><span class=\"cn\">{esc(_class(classes, int(k)))}</span><span class=\"track\">"
                    f"<span class=\"fill\" style=\"width:{width:.1f}%\"></span></span>"
                    f"<span class=\"v\">{_num(float(means[k]))}</span></li>")
    more = f"<p class=\"note\">the {_BARS} of {len(m)} classes with the largest means</p>" if len(m) > _BARS else ""
    return f"<div class=\"means\"><h4>mean activation per class</h4><ol>{''.join(rows)}</ol>{more}</div>"


def _card(b: BlockData, c: int, classes: Sequence[str], files: dict[str, bytes]) -> str:
    """One channel's card; its images are added to `files`."""
    head = f"<h3><a href=\"#c{c}\">channel {c}</a></h3>"
    if b.selectivity is not None and b.selective_class is not None:
        sel, pref = float(b.selectivity[c]), int(b.selective_class[c])
        head += (f"<p class=\"sel\">class selectivity <b>{_num(sel)}</b>, prefers <b>{esc(_class(classes, pref))}"
                 "</b></p>" if np.isfinite(sel) and pref >= 0 else "<p class=\"sel\">class selectivity: n/a</p>")
    if b.featviz is not None:
        files[f"atlas/{_img(b.name, 'fv', c)}"] = _png(b.featviz[c])
        value = f"activation {_num(float(b.featviz_value[c]))}" if b.featviz_value is not None else ""
        steps = f", {int(b.featviz_steps[c])} steps" if b.featviz_steps is not None else ""
        fv = (f"<figure class=\"fv\"><img src=\"{_img(b.name, 'fv', c)}\" width=\"{_FEATVIZ_PX}\" "
              f"height=\"{_FEATVIZ_PX}\" alt=\"feature visualization of {esc(b.name)} channel {c}\">"
              f"<figcaption>{value}{steps}</figcaption></figure>")
    else:
        fv = "<p class=\"fv none\">no feature visualization</p>"
    means = _bars(b.class_mean[:, c], int(b.selective_class[c]) if b.selective_class is not None else -1,
                  classes) if b.class_mean is not None else ""
    return (f"<article class=\"card\" id=\"c{c}\">{head}<div class=\"top\">{fv}{means}</div>"
            f"{_examples(b, c, classes, files)}</article>")


def _examples(b: BlockData, c: int, classes: Sequence[str], files: dict[str, bytes]) -> str:
    if b.topk_value is None:
        return "<p class=\"note\">no dataset examples</p>"
    k = b.topk_value.shape[1]
    labels = "".join(f"<li title=\"activation {_num(float(v))}\">{esc(_class(classes, int(y)))}</li>"
                     for v, y in zip(b.topk_value[c], b.topk_label[c] if b.topk_label is not None else [-1] * k))
    if b.patch is None or b.deconv is None:
        return f"<div class=\"ex\"><p class=\"note\">the {k} strongest images (not projected)</p><ol " \
               f"class=\"labels\" style=\"--k:{k}\">{labels}</ol></div>"
    pixels = _strip(b.patch[c], b.deconv[c])
    files[f"atlas/{_img(b.name, 'ex', c)}"] = _png(pixels)
    return (f"<div class=\"ex\"><img src=\"{_img(b.name, 'ex', c)}\" width=\"{pixels.shape[1]}\" "
            f"height=\"{pixels.shape[0]}\" alt=\"the {k} strongest patches of {esc(b.name)} channel {c} and their "
            f"projections\"><ol class=\"labels\" style=\"--k:{k}\">{labels}</ol>"
            f"<p class=\"note\">top: the {k} image patches where it fires most; below: each projected by the "
            "deconvnet</p></div>")


def _nav(block: str, page: int, pages: int, neighbours: tuple[str | None, str | None]) -> str:
    prev_b, next_b = neighbours
    links = ["<a href=\"index.html\">index</a>"]
    if prev_b is not None:
        links.append(f"<a href=\"{quote(page_name(prev_b, 0))}\" rel=\"prev\">&larr; {esc(prev_b)}</a>")
    if page > 0:
        links.append(f"<a href=\"{quote(page_name(block, page - 1))}\">&lsaquo; page {page}</a>")
    links.append(f"<span class=\"here\">{esc(block)}, page {page + 1} of {pages}</span>")
    if page + 1 < pages:
        links.append(f"<a href=\"{quote(page_name(block, page + 1))}\">page {page + 2} &rsaquo;</a>")
    if next_b is not None:
        links.append(f"<a href=\"{quote(page_name(next_b, 0))}\" rel=\"next\">{esc(next_b)} &rarr;</a>")
    return f"<nav>{' '.join(links)}</nav>"


def _page(title: str, body: str) -> bytes:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title><style>{_CSS}</style></head>"
            f"<body>{body}</body></html>\n").encode()


def block_files(b: BlockData, classes: Sequence[str], run: str,
                neighbours: tuple[str | None, str | None]) -> dict[str, bytes]:
    """A block's pages (PAGE cards each) and their images, {path inside report/: bytes}."""
    files: dict[str, bytes] = {}
    pages = max(1, -(-b.channels // PAGE))
    for page in range(pages):
        lo, hi = page * PAGE, min(b.channels, (page + 1) * PAGE)
        nav = _nav(b.name, page, pages, neighbours)
        cards = "".join(_card(b, c, classes, files) for c in range(lo, hi))
        body = (f"{nav}<header><h1>{esc(b.name)}: channels {lo}&ndash;{hi - 1} of {b.channels}</h1><p>{esc(run)}"
                "</p></header>" f"<main class=\"grid\">{cards}</main>{nav}")
        files[f"atlas/{page_name(b.name, page)}"] = _page(f"{b.name}, page {page + 1}: hpcviz atlas of {run}", body)
    return files


@dataclass
class _Summary:
    """What the index needs of a block, kept while its pages are made."""
    name: str
    channels: int
    selectivity: np.ndarray | None
    selective_class: np.ndarray | None
    featviz: bool
    median_value: float | None
    mean_steps: float | None


def _summary(b: BlockData) -> _Summary:
    return _Summary(b.name, b.channels, b.selectivity, b.selective_class, b.featviz is not None,
                    float(np.nanmedian(b.featviz_value)) if b.featviz_value is not None else None,
                    float(np.mean(b.featviz_steps)) if b.featviz_steps is not None else None)


def _per_class(summaries: Sequence[_Summary], classes: Sequence[str]) -> str:
    """Per class, its most selective channels over every block, as thumbnails linked to their cards."""
    items = []
    for k, name in enumerate(classes):
        found = []
        for s in summaries:
            if s.selectivity is None or s.selective_class is None:
                continue
            found += [(float(s.selectivity[c]), s, int(c)) for c in np.flatnonzero(s.selective_class == k)
                      if np.isfinite(s.selectivity[c])]
        found.sort(key=lambda t: -t[0])
        cells = "".join(f"<a class=\"thumb\" href=\"{card_href(s.name, c)}\">" + (
            f"<img src=\"{_img(s.name, 'fv', c)}\" width=\"48\" height=\"48\" alt=\"\">" if s.featviz else "")
            + f"<span>{esc(s.name)} #{c}<br>{sel:.2f}</span></a>" for sel, s, c in found[:_PER_CLASS])
        items.append(f"<li><h3>{esc(name)}</h3><div class=\"thumbs\">{cells or 'no channel prefers it'}</div></li>")
    return f"<ol class=\"classes\">{''.join(items)}</ol>"


def index_page(summaries: Sequence[_Summary], classes: Sequence[str], run: str) -> bytes:
    rows = []
    for s in summaries:
        pages = max(1, -(-s.channels // PAGE))
        links = " ".join(f"<a href=\"{quote(page_name(s.name, p))}\">{p + 1}</a>" for p in range(pages))
        fv = "" if s.median_value is None else f"{_num(s.median_value)} after {s.mean_steps:.0f} steps (mean)"
        rows.append(f"<tr><td><a href=\"{quote(page_name(s.name, 0))}\">{esc(s.name)}</a></td>"
                    f"<td class=\"n\">{s.channels}</td><td>{links}</td><td>{fv or 'not computed'}</td></tr>")
    body = (f"<header><h1>Atlas of {esc(run)}</h1><p><a href=\"../report.html\">the report</a></p></header><main>"
            f"<section><p>{_ABOUT}</p></section><section><h2>Blocks</h2><table><thead><tr><th>block</th>"
            "<th>channels</th><th>pages</th><th>feature visualization: median activation</th></tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table></section><section><h2>The most class-selective channels of each "
            f"class</h2>{_per_class(summaries, classes)}</section></main>")
    return _page(f"hpcviz atlas of {run}", body)


def atlas_files(blocks: Iterable[str], read: Callable[[str], BlockData], classes: Sequence[str],
                run: str) -> dict[str, bytes]:
    """Every file of the atlas: `read(block)` gives a block's data, one block at a time (a block's examples can
    be large; only its PNGs are kept)."""
    names = list(blocks)
    files: dict[str, bytes] = {}
    summaries = []
    for i, name in enumerate(names):
        b = read(name)
        neighbours = (names[i - 1] if i else None, names[i + 1] if i + 1 < len(names) else None)
        files.update(block_files(b, classes, run, neighbours))
        summaries.append(_summary(b))
    files["atlas/index.html"] = index_page(summaries, classes, run)
    return files


_ABOUT = ("One card per channel. Left: its feature visualization, the input optimised to excite it (its mean "
          "activation over the image, and the steps it took); right: its mean activation per class, the class it "
          "prefers highlighted. Below: the image patches where it fires most, over the visualized images, with "
          "each projected back to the pixels by the deconvnet, and those images' classes. Each card links to "
          "itself (#c17): a link to a channel is its page's address with that anchor.")

_CSS = """:root{--ink:#1d2330;--mute:#5b6475;--line:#dfe3ea;--bg:#f6f7f9;--accent:#2f6fdb}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--ink);
background:var(--bg)}header,main,nav{max-width:90rem;margin:0 auto;padding:.6rem 1.2rem}
h1{font-size:1.4rem;margin:.4rem 0}h2{font-size:1.15rem}h3{font-size:1rem;margin:0}a{color:var(--accent)}
nav{display:flex;flex-wrap:wrap;gap:.4rem 1rem;align-items:baseline;border-bottom:1px solid var(--line)}
nav .here{font-weight:600}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(21rem,1fr));gap:1rem}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.7rem .8rem;overflow:hidden}
.card:target{outline:3px solid var(--accent)}.card h3 a{color:var(--ink);text-decoration:none}
.sel{margin:.1rem 0 .5rem;color:var(--mute)}.top{display:flex;gap:.8rem;align-items:flex-start}
.fv{margin:0;text-align:center}.fv img,.thumb img{image-rendering:pixelated;image-rendering:crisp-edges;
border-radius:4px;background:#000}.fv figcaption{font-size:.8rem;color:var(--mute)}
.none{width:128px;color:var(--mute);font-size:.85rem}.means{flex:1;min-width:0}
.means h4{margin:0 0 .2rem;font-size:.8rem;color:var(--mute);font-weight:500}.means ol{list-style:none;margin:0;
padding:0}.means li{display:grid;grid-template-columns:5.5rem 1fr 3rem;gap:.3rem;align-items:center;
font-size:.78rem}.cn{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.track{background:var(--bg);
height:.7rem;border-radius:3px}.fill{display:block;height:100%;background:#9db4d9;border-radius:3px}
.pref .fill{background:var(--accent)}.pref .cn{font-weight:600}.v{text-align:right;color:var(--mute)}
.ex{margin-top:.6rem}.ex img{image-rendering:pixelated;image-rendering:crisp-edges;display:block;width:100%;
height:auto}
.labels{list-style:none;margin:.15rem 0 0;padding:0;display:grid;grid-template-columns:repeat(var(--k),1fr);
font-size:.7rem;color:var(--mute)}.labels li{overflow:hidden;text-overflow:ellipsis;white-space:nowrap;
text-align:center}.note{font-size:.75rem;color:var(--mute);margin:.2rem 0}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid var(--line);padding:.3rem .6rem;
text-align:left}td.n{text-align:right}.classes{list-style:none;padding:0;display:grid;
grid-template-columns:repeat(auto-fill,minmax(28rem,1fr));gap:.8rem}.classes li{background:#fff;
border:1px solid var(--line);border-radius:8px;padding:.5rem .7rem}.thumbs{display:flex;flex-wrap:wrap;gap:.5rem}
.thumb{display:flex;flex-direction:column;align-items:center;font-size:.72rem;text-decoration:none;
color:var(--mute)}"""
