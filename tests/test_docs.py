"""The documentation holds together: every relative link in README.md, docs/*.md and slurm/README.md points to a
file of the repository and, with a #fragment, to a heading there; the README stays short and docs/ has its pages.

Anchors follow GitHub's rule: the heading's text (inline Markdown removed), lowercased, punctuation dropped,
spaces turned into '-', and a repeated heading numbered -1, -2, ...
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from conftest import ROOT

README_MAX_LINES = 200
DOCS_MIN_PAGES = 5

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; `blank_code`: inline code blanked (links there are
    examples, not links)."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")        # HTML tags, code marks
    text = re.sub(r"(\*\*|__|\*)", "", text)                    # emphasis marks (a lone _ stays: a word char)
    kept = "".join(c for c in text.lower()
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    for m in re.finditer(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""", path.read_text(encoding="utf-8")):
        out.add(m.group(1))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
        out += [(n, m.group(1)) for m in HTML_REF.finditer(line)]
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: target: why' for every relative link of `path` that does not resolve."""
    problems = []
    for n, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{where}: outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            problems.append(f"{where}: no heading with anchor #{fragment} in {dest.relative_to(root.resolve())}")
    return problems


def test_every_link_resolves():
    problems = [p for f in markdown_files() for p in broken_links(f)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short_and_docs_have_their_pages():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it <= {README_MAX_LINES}, move the rest to docs/"
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= DOCS_MIN_PAGES, f"docs/ has {len(pages)} pages: {pages}"


def test_every_docs_page_is_linked_from_the_readme():
    targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if not EXTERNAL.match(t)}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in targets]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_slug_follows_githubs_rule():
    assert slug("The run directory") == "the-run-directory"
    assert slug("Viewers: H5Web, silx, h5ls") == "viewers-h5web-silx-h5ls"
    assert slug("`jobs/benchmark.py` and `--data auto`") == "jobsbenchmarkpy-and---data-auto"
    assert slug("Bring your own ResNet (import_model)") == "bring-your-own-resnet-import_model"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The run directory\n\ntext\n")
    page = tmp_path / "README.md"
    page.write_text("# R\n\n[ok](docs/a.md#the-run-directory) [ok](#r) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#run-directory) [self](#nope)\n"
                    '<img src="pic.png"> [web](https://example.org/x)\n')
    problems = broken_links(page, tmp_path)
    assert [p.split(": ", 2)[1] for p in problems] == ["docs/b.md", "docs/a.md#run-directory", "#nope", "pic.png"]


CODE_PATH = re.compile(r"`((?:hpcviz|tests|jobs|slurm)/[\w/.-]*\w)`")
DOTTED = re.compile(r"`(hpcviz(?:\.\w+)+)")


def test_every_file_and_module_the_docs_name_exists():
    """A page that names `tests/x.py`, `hpcviz/pkg/` or `hpcviz.pkg.module.function` names something that is
    there (files move; the pages must follow)."""
    import importlib
    wrong = []
    for page in markdown_files():
        text = page.read_text(encoding="utf-8")
        for path in CODE_PATH.findall(text):
            if not (ROOT / path).exists():
                wrong.append(f"{page.relative_to(ROOT)}: {path}")
        for dotted in DOTTED.findall(text):
            parts, obj = dotted.split("."), None
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr, None)
                break
            if obj is None:
                wrong.append(f"{page.relative_to(ROOT)}: {dotted}")
    assert not wrong, wrong
