"""The operator docs hold together: every relative link in README.md, docs/*.md and the
READMEs of ami/, images/ and bench/ points at a file that exists, and every #anchor at a
heading of its target, named as GitHub names headings. Pure: no network (http(s) links
are not fetched), no master."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text], one level of nested brackets
    r"\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)"  # (destination
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"  # optional "title")
)
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_GITHUB_LINE_ANCHOR = re.compile(r"^L\d+(?:-L\d+)?$")


def _outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        marker = _FENCE.match(line)
        if fence is None:
            if marker:
                fence = marker.group(1)
            else:
                lines.append((number, line))
        elif marker and _closes(fence, marker.group(1), line):
            fence = None
    return lines


def _closes(fence: str, marker: str, line: str) -> bool:
    """A closing fence: the opening's character, at least as long, nothing after it."""
    return marker[0] == fence[0] and len(marker) >= len(fence) and line.strip() == marker


def _heading_text(markdown: str) -> str:
    """A heading's text as GitHub renders it: code spans keep their content, links and
    images their text, HTML tags go."""
    text = _CODE_SPAN.sub(lambda m: m.group(2).strip(), markdown)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"<[^>]+>", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except '-' and '_',
    each space a '-'."""
    text = _heading_text(heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    previous = ""
    for _, line in _outside_code(path.read_text(encoding="utf-8")):
        heading = None
        atx = _ATX.match(line)
        if atx:
            heading = atx.group(2) or ""
        elif (_SETEXT.match(line) and previous.strip() and "|" not in previous
              and not _ATX.match(previous) and not re.match(r"^\s*([-*+]|\d+[.)])\s", previous)):
            heading = previous.strip()
        previous = line
        if heading is None:
            continue
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, destination) of every inline link, image and reference definition
    outside code."""
    found: list[tuple[int, str]] = []
    for number, raw in _outside_code(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("", raw)
        for match in _INLINE_LINK.finditer(line):
            found.append((number, match.group(1).strip("<>")))
        reference = _REFERENCE_DEF.match(line)
        if reference:
            found.append((number, reference.group(1).strip("<>")))
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file under root."""
    problems = []
    for number, destination in links(path):
        where = f"{path.relative_to(root)}:{number}: {destination}"
        if _SCHEME.match(destination):
            continue  # http(s), mailto: not fetched
        target_part, _, anchor = destination.partition("#")
        if not target_part:
            target = path
        else:
            target = (path.parent / unquote(target_part)).resolve()
            if not target.is_relative_to(root.resolve()):
                problems.append(f"{where}: outside the repository")
                continue
            if not target.exists():
                problems.append(f"{where}: no such file")
                continue
        if not anchor:
            continue
        if target.suffix.lower() == ".md" and target.is_file():
            if unquote(anchor) not in anchors(target):
                name = "this file" if target == path else target.relative_to(root.resolve())
                problems.append(f"{where}: no heading with anchor #{anchor} in {name}")
        elif not _GITHUB_LINE_ANCHOR.match(anchor):
            problems.append(f"{where}: #{anchor} on a file that is not Markdown")
    return problems


def _documents() -> list[Path]:
    """README.md, docs/*.md, and the READMEs beside the code that the docs link to."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
            *(REPO / folder / "README.md" for folder in ("ami", "images", "bench"))]


def test_the_docs_exist() -> None:
    assert (REPO / "docs" / "README.md").is_file()
    assert len(_documents()) > 2


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(document: Path) -> None:
    assert broken_links(document, REPO) == []


def test_readme_stays_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move text to docs/"


@pytest.mark.parametrize(("heading", "slug"), [
    ("What happens when...", "what-happens-when"),
    ("Compared with buildbot's EC2LatentWorker", "compared-with-buildbots-ec2latentworker"),
    ("`launch_on_request`", "launch_on_request"),
    ("isolation.py — from one build's end", "isolationpy--from-one-builds-end"),
    ("Pools: caps and warm minimums", "pools-caps-and-warm-minimums"),
    ("Runs, 2026-11-29 04:41-04:52 UTC (final code, `d8d88f5`)",
     "runs-2026-11-29-0441-0452-utc-final-code-d8d88f5"),
    ("A [linked](other.md) heading", "a-linked-heading"),
])
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## Same\n\n## Same\n\nSetext\n---\n")
    (tmp_path / "a.md").write_text(
        "# Top\n\n"
        "[ok](docs/b.md) [ok](docs/b.md#same-1) [ok](docs/b.md#setext) [ok](#top)\n"
        "[ok](https://example.com/nowhere) ![ok](docs/) `[not a link](missing.md)`\n"
        "```\n[not a link](missing.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/b.md#same-2) [bad](#nowhere)\n"
        "[out](../elsewhere.md)\n"
        "[ref]: docs/b.md#nothing\n")
    problems = broken_links(tmp_path / "a.md", tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/missing.md: no such file",
        "docs/b.md#same-2: no heading with anchor #same-2 in docs/b.md",
        "#nowhere: no heading with anchor #nowhere in this file",
        "../elsewhere.md: outside the repository",
        "docs/b.md#nothing: no heading with anchor #nothing in docs/b.md",
    ], problems
