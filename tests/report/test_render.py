"""Tables and the report's text formats: hand-computed tables, escaping of untrusted text."""
import csv
import io

import numpy as np

from hpcviz.report import render as report
from hpcviz.report.render import Fixed

EVAL = {"split": "val", "n": 10, "accuracy": 0.7, "train_n": 90, "train_accuracy": 0.8,
        "classes": ["cat", "dog", "<b>x"],
        # rows = true class: cat 3/4 right (1 -> dog), dog 2/3 (1 -> <b>x), <b>x 2/3 (1 -> cat)
        "confusion": [[3, 1, 0], [0, 2, 1], [1, 0, 2]],
        "per_class_accuracy": {"cat": 0.75, "dog": 2 / 3, "<b>x": 2 / 3}}


def test_accuracy_and_per_class_tables_by_hand():
    headers, rows = report.accuracy_table(EVAL)
    assert headers == ["split", "images", "accuracy (%)"]
    assert [[r[0], r[1], str(r[2])] for r in rows] == [["train", 90, "80.00"], ["val", 10, "70.00"]]
    headers, rows = report.per_class_table(EVAL)
    assert [r[:3] for r in rows] == [["cat", 4, 3], ["dog", 3, 2], ["<b>x", 3, 2]]
    assert [str(r[3]) for r in rows] == ["75.00", "66.67", "66.67"]
    assert [r[4] for r in rows] == ["dog (1)", "<b>x (1)", "cat (1)"]


def test_inversion_table_statistics():
    e = {"conv1": np.array([0.1, 0.2, 0.3, 0.4, np.nan]), "layer1.0": np.array([np.nan])}
    _, rows = report.inversion_table(e)
    block, n, median, mean, p90, mx = rows[0]
    assert (block, n) == ("conv1", 4)  # the NaN (a row of a vanished shard) is not counted
    np.testing.assert_allclose([median, mean, p90, mx], [0.25, 0.25, 0.37, 0.4])
    assert str(median) == "0.2500"
    assert rows[1] == ["layer1.0", 0, None, None, None, None]


def test_params_table_resolves_the_stem_and_names_the_optimizer():
    _, rows = report.params_table({"arch": "resnet20", "stem": "", "nesterov": True, "augment": False, "lr": 0.2},
                                  {"world_size": 4})
    d = dict((r[0], r[1]) for r in rows)
    assert d["stem"] == "cifar" and d["optimizer"] == "SGD (Nesterov)" and d["augmentation"] == "none"
    assert d["peak learning rate"] == 0.2 and d["world_size"] == 4


def test_csv_round_trips_and_markdown_escapes():
    headers, rows = ["name", "value"], [["a|b", Fixed(1.5, 2)], ["<script>alert(1)</script>", None]]
    back = list(csv.reader(io.StringIO(report.to_csv(headers, rows))))
    assert back == [["name", "value"], ["a|b", "1.50"], ["<script>alert(1)</script>", ""]]
    md = report.to_markdown(headers, rows)
    assert "a\\|b" in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script" not in md
    assert md.splitlines()[1] == "| --- | ---: |"  # numbers right-aligned


HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


def test_markdown_syntax_in_untrusted_text_stays_text():
    caption = "x](http://evil/p.png) ![y"  # would close our image and open a remote one
    md = report.render_markdown([("fig", "figures/a.png", caption),
                                 ("p", "[t](javascript:alert(1)) *b* `c` $x$ _d_ ~~e~~ \x1b[31mred")])
    assert "![x\\](http://evil/p.png) !\\[y](figures/a.png)" in md
    # emphasis, strike-through and math (GitHub renders $...$) are escaped too: a class name shows as written,
    # and a control character is \xNN, not a terminal code in a file someone may `cat`
    assert "\\[t\\](javascript:alert(1)) \\*b\\* \\`c\\` \\$x\\$ \\_d\\_ \\~\\~e\\~\\~ \\\\x1b\\[31mred" in md
    assert "\x1b" not in md


def test_html_and_markdown_escape_every_text_and_embed_figures():
    png = b"\x89PNG\r\n\x1a\nfake"
    doc = [("h", 1, HOSTILE), ("p", HOSTILE), ("warn", HOSTILE), ("table", [HOSTILE], [[HOSTILE]]),
           ("fig", "figures/a.png", HOSTILE), ("pre", HOSTILE)]
    page = report.render_html(doc, HOSTILE, {"figures/a.png": png})
    assert "<script" not in page and "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert page.count("&lt;script&gt;") == 9  # title, h1, p, warn, th, td, img alt, figcaption, pre
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in page  # embedded: the page stands alone
    linked = report.render_html(doc, "t")
    assert 'src="figures/a.png"' in linked
    md = report.render_markdown(doc)
    body = md.split("```")[0]  # everything before the code block
    assert "<script" not in body and "&lt;script&gt;" in body and "![" in body
