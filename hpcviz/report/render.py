"""Tables and the report as text: CSV, Markdown and one self-contained HTML page, from plain data.

Pure functions: they take dicts and arrays and return strings; `hpcviz.aggregate` reads the run and
writes the files. A report is a list of blocks, rendered twice (Markdown and HTML):

    ("h", level, text)            a heading
    ("p", text)                   a paragraph
    ("warn", text)                a warning paragraph (missing shards, failed stages)
    ("table", headers, rows)      a table; cells are str, int, float or None
    ("fig", relpath, caption)     a figure (PNG relative to the report)
    ("pre", text)                 preformatted text (the config)
    ("links", text, [(label, relpath), ...])   a line of links to files beside the report (full-size figures)

Every text that comes from a run (class names, run names, config values, error messages) is
untrusted: report.html escapes it (`html.escape`) and never contains a script; report.md writes `&`,
`<` and `>` as HTML entities (Markdown passes raw HTML through) and backslash-escapes brackets,
backticks, backslashes, emphasis marks, table pipes and dollars (a class name shows as written); terminal
output shows control characters as \\xNN (`terminal_text`).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import default_stem

Block = tuple
Cell = Any

__all__ = ["accuracy_table", "per_class_table", "inversion_table", "params_table", "to_csv", "to_markdown",
           "render_markdown", "render_html", "terminal_text", "html_text"]


class Fixed(float):
    """A float shown with a fixed number of decimals in every format (81.90, not 81.9)."""
    digits = 2

    def __new__(cls, value: float, digits: int = 2) -> Fixed:
        obj = super().__new__(cls, value)
        obj.digits = digits
        return obj

    def __str__(self) -> str:
        return f"{float(self):.{self.digits}f}"

    __repr__ = __str__


def _pct(x: float | None) -> Fixed | None:
    return None if x is None else Fixed(100.0 * float(x), 2)


def accuracy_table(ev: Mapping[str, Any]) -> tuple[list[str], list[list[Cell]]]:
    """Overall accuracy from eval.json: one row per split (train, val)."""
    headers = ["split", "images", "accuracy (%)"]
    rows = [["train", ev.get("train_n"), _pct(ev.get("train_accuracy"))],
            [ev.get("split", "val"), ev.get("n"), _pct(ev.get("accuracy"))]]
    return headers, rows


def per_class_table(ev: Mapping[str, Any]) -> tuple[list[str], list[list[Cell]]]:
    """Per class: images, correct, accuracy, and the class it is most often mistaken for (from the
    confusion matrix, rows = true class)."""
    classes = list(ev["classes"])
    conf = np.asarray(ev["confusion"], dtype=np.int64)  # (K, K)
    rows = []
    for i, name in enumerate(classes):
        n = int(conf[i].sum())
        off = conf[i].copy()
        off[i] = -1
        j = int(off.argmax()) if len(classes) > 1 else i
        confused = f"{classes[j]} ({int(conf[i, j])})" if j != i and conf[i, j] > 0 else ""
        rows.append([name, n, int(conf[i, i]), _pct(conf[i, i] / n) if n else None, confused])
    return ["class", "images", "correct", "accuracy (%)", "most confused with (count)"], rows


def inversion_table(errors: Mapping[str, np.ndarray]) -> tuple[list[str], list[list[Cell]]]:
    """Per block: the relative feature error ||phi(x) - phi0|| / ||phi0|| over all images."""
    rows = []
    for block, e in errors.items():
        e = np.asarray(e, dtype=np.float64)
        e = e[np.isfinite(e)]
        if not e.size:
            rows.append([block, 0, None, None, None, None])
            continue
        rows.append([block, int(e.size), *(Fixed(float(v), 4) for v in
                                           (np.median(e), e.mean(), np.quantile(e, 0.9), e.max()))])
    return ["block", "images", "median", "mean", "90th percentile", "max"], rows


def params_table(train: Mapping[str, Any],
                 extra: Mapping[str, Any] | None = None) -> tuple[list[str], list[list[Cell]]]:
    """The training parameters of the course report's table, from the train config (and manifest)."""
    keys = [("architecture", "arch"), ("stem", "stem"), ("data", "data"), ("image size (px)", "image_size"),
            ("validation fraction", "val_fraction"), ("epochs", "epochs"), ("global batch", "batch_size"),
            ("optimizer", None), ("peak learning rate", "lr"), ("momentum", "momentum"),
            ("schedule", "schedule"), ("warm-up epochs", "warmup_epochs"), ("weight decay", "weight_decay"),
            ("label smoothing", "label_smoothing"), ("augmentation", "augment"), ("mixed precision", "amp"),
            ("seed", "seed"), ("recipe", "recipe")]
    rows: list[list[Cell]] = []
    for label, key in keys:
        if key is None:
            rows.append([label, "SGD" + (" (Nesterov)" if train.get("nesterov") else "")])
        elif key == "augment":
            rows.append([label, "random crop (4 px pad) + horizontal flip" if train.get(key) else "none"])
        elif key == "stem" and not train.get("stem"):
            rows.append([label, default_stem(str(train.get("arch", "")))])
        elif key in train:
            rows.append([label, train[key]])
    rows += [[k, v] for k, v in (extra or {}).items()]
    return ["parameter", "value"], rows


# ----------------------------------------------------------------------------- text formats

def _cell(v: Cell) -> str:
    if v is None:
        return ""
    if isinstance(v, Fixed):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v else f"{v:.6g}"
    return str(v)


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow(["" if v is None else str(v) if isinstance(v, Fixed) else v for v in row])
    return buf.getvalue()


# no link or image without [ ], no code span without `, no emphasis, strike-through or math ($) from a run
_MD_SPECIAL = re.compile(r"([\\`\[\]*_~$|])")
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}  # C0, DEL, C1: terminal escapes


def terminal_text(text: Any) -> str:
    """Untrusted text for a terminal: control characters (ESC sequences, carriage returns, newlines) shown as
    \\xNN, so a class or file name can neither restyle nor overwrite what is printed. (rich markup is the
    caller's: pass the result as a rich Text, never as a markup string.)"""
    return str(text).translate(_CONTROL)


def _md_text(text: Any) -> str:
    """Untrusted text for Markdown, on one line: HTML-special characters as entities (Markdown passes
    raw HTML through) and Markdown's brackets, backticks, backslashes, emphasis (* _ ~), table pipes and math
    dollars backslash-escaped, so a class name shows as written: no link, image, code span, emphasis or
    formula can be smuggled in."""
    one_line = terminal_text(str(text).replace("\r", " ").replace("\n", " "))
    return html.escape(_MD_SPECIAL.sub(r"\\\1", one_line), quote=False)


def to_markdown(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    def cells(values):
        return "| " + " | ".join(_md_text(_cell(v)) for v in values) + " |"
    numeric = [all(isinstance(r[k], (int, float)) or r[k] is None for r in rows) and bool(rows)
               for k in range(len(headers))]
    rule = "|" + "|".join(" ---: " if num else " --- " for num in numeric) + "|"
    return "\n".join([cells(headers), rule, *(cells(r) for r in rows)]) + "\n"


def _md_path(rel: str) -> str:
    """A relative link target: block names hold only [A-Za-z0-9_.]; anything else is percent-encoded."""
    from urllib.parse import quote
    return quote(str(rel), safe="/._-")


def render_markdown(doc: Sequence[Block]) -> str:
    out = []
    for block in doc:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + _md_text(block[2]))
        elif kind == "p":
            out.append(_md_text(block[1]))
        elif kind == "warn":
            out.append("> **Warning:** " + _md_text(block[1]))
        elif kind == "table":
            out.append(to_markdown(block[1], block[2]).rstrip("\n"))
        elif kind == "fig":
            out.append(f"![{_md_text(block[2])}]({block[1]})\n\n*{_md_text(block[2])}*")
        elif kind == "pre":
            out.append("```\n" + str(block[1]).replace("```", "'''") + "\n```")
        elif kind == "links":
            out.append(_md_text(block[1]) + " " + ", ".join(f"[{_md_text(t)}]({_md_path(r)})" for t, r in block[2]))
        else:
            raise AssertionError(f"unknown report block {kind!r}")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f2f2f2}td.n{text-align:right}figure{margin:1.2em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}.warn{background:#fff3cd;border-left:4px solid #e0a800;padding:.5em 1em}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}"""


def _e(text: Any) -> str:
    """Untrusted text for HTML: its special characters as entities, line breaks as spaces (as in Markdown), other
    control characters as \\xNN."""
    return html.escape(terminal_text(str(text).replace("\r", " ").replace("\n", " ")))


html_text = _e  # for the other pages made from a run (the atlas)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    e = _e
    head = "".join(f"<th>{e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{e(_cell(v))}</td>" if isinstance(v, (int, float))
                                    else f"<td>{e(_cell(v))}</td>" for v in r) + "</tr>\n" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def render_html(doc: Sequence[Block], title: str, images: Mapping[str, bytes] | None = None) -> str:
    """One HTML page. `images`: {relpath: PNG bytes} to embed as data URIs (self-contained); figures
    not in it are linked by their relative path."""
    e = _e
    images = images or {}
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for block in doc:
        kind = block[0]
        if kind == "h":
            level = min(max(int(block[1]), 1), 6)
            parts.append(f"<h{level}>{e(str(block[2]))}</h{level}>")
        elif kind == "p":
            parts.append(f"<p>{e(str(block[1]))}</p>")
        elif kind == "warn":
            parts.append(f"<p class=\"warn\"><strong>Warning:</strong> {e(str(block[1]))}</p>")
        elif kind == "table":
            parts.append(_html_table(block[1], block[2]))
        elif kind == "fig":
            data = images.get(block[1])
            src = f"data:image/png;base64,{base64.b64encode(data).decode()}" if data is not None else e(block[1])
            parts.append(f"<figure><img src=\"{src}\" alt=\"{e(str(block[2]))}\">"
                         f"<figcaption>{e(str(block[2]))}</figcaption></figure>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(str(block[1]))}</pre>")  # its lines are ours (JSON escapes the rest)
        elif kind == "links":
            parts.append(f"<p>{e(str(block[1]))} " + ", ".join(f"<a href=\"{e(_md_path(r))}\">{e(str(t))}</a>"
                                                           for t, r in block[2]) + "</p>")
        else:
            raise AssertionError(f"unknown report block {kind!r}")
    parts.append("</body></html>\n")
    return "\n".join(parts)
