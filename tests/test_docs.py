"""The README and docs/*.md hold together: every relative link resolves to a file of the repository
(and, with `#anchor`, to a heading of that file, slugged as GitHub does), and every page under
docs/ is reachable from the README or another page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[(?:[^\]]|\n)*?\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `#` line in a bash block is no heading)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_prose(path.read_text())):
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a markdown file outside code blocks (images excluded)."""
    return [m.group(1) for m in _LINK.finditer(_prose(path.read_text()))]


def broken_links(path: Path, root: Path) -> list[str]:
    """`path`'s relative links that name no file under `root`, or no heading of the file named."""
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        try:
            dest.relative_to(root.resolve())
        except ValueError:
            bad.append(f"{target} (outside the repository)")
            continue
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(root.resolve())})")
    return bad


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def unlinked_docs(root: Path) -> list[str]:
    """Files under docs/ that neither the README nor another page links to."""
    linked = set()
    for page in pages(root):
        for target in links(page):
            file_part = target.partition("#")[0]
            if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part):
                dest = (page.parent / file_part).resolve()
                if dest != page.resolve():
                    linked.add(dest)
    return [str(p.relative_to(root)) for p in sorted((root / "docs").rglob("*"))
            if p.is_file() and p.resolve() not in linked]


@pytest.mark.parametrize("page", pages(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page, REPO) == []


def test_every_doc_page_is_linked():
    assert unlinked_docs(REPO) == []


def test_docs_pages_open_with_a_title_and_a_summary():
    for page in sorted((REPO / "docs").glob("*.md")):
        paras = page.read_text().split("\n\n")
        assert paras[0].startswith("# "), page
        assert not paras[1].startswith("#") and 1 <= len(paras[1].splitlines()) <= 6, page


def test_slugs_follow_github():
    assert slug("EDM2 / ImageNet 512") == "edm2--imagenet-512"
    assert slug("Speed side by side with the authors' loop") == "speed-side-by-side-with-the-authors-loop"
    assert slug("The timed `make run`") == "the-timed-make-run"
    assert slug("Baselines: ADD and DMD2") == "baselines-add-and-dmd2"


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\nSee [b](b.md#there) and [the\ntop](#a).\n\n```bash\n# no heading\n```\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Here\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    (tmp_path / "README.md").write_text("[a](docs/a.md) [gone](docs/gone.md) [web](https://example.org/x)\n")
    assert broken_links(tmp_path / "docs" / "a.md", tmp_path) == ["b.md#there (no heading #there in docs/b.md)"]
    assert broken_links(tmp_path / "README.md", tmp_path) == ["docs/gone.md (no such file)"]
    assert unlinked_docs(tmp_path) == ["docs/orphan.md"]
