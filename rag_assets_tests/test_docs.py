"""The README and docs/ hold together: every relative link reaches a file (and a heading of it, when
it names one), every `make` target they name exists, and the README stays a short user's page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 260

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
# [text](target) or [text](target "title"), images too; the text may hold `code` and one level of
# brackets, and may run over a line break.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# `make dev PORT=3300` names `dev`; `make VAR=1 run` names `run`.
MAKE = re.compile(r"\bmake((?:[ \t]+[A-Za-z_][A-Za-z0-9_]*=\S*)*)[ \t]+([A-Za-z0-9_-]+)")
TARGET = re.compile(r"^([A-Za-z0-9_-]+):", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, …


def split(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The page's prose lines (fenced blocks blanked, so line numbers hold) and its code: the lines
    of fenced blocks and the code spans of the prose, each with its line number."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
            code.extend((number, span.group(2)) for span in CODE_SPAN.finditer(line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase; only letters, digits, spaces, hyphens and
    underscores kept; spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split(path.read_text(encoding="utf-8"))
    return {slug(m.group(2)) for line in prose if (m := HEADING.match(line))}


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link outside code."""
    prose, _ = split(path.read_text(encoding="utf-8"))
    text = "\n".join(CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line) for line in prose)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: ({target})"
        if not linked.exists():
            problems.append(f"{where}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}: no heading with anchor #{anchor} in {linked.name}")
    return problems


def make_targets_named(path: Path) -> list[tuple[int, str]]:
    _, code = split(path.read_text(encoding="utf-8"))
    return [(number, m.group(2)) for number, text in code for m in MAKE.finditer(text)]


def makefile_targets() -> set[str]:
    return set(TARGET.findall((ROOT / "Makefile").read_text(encoding="utf-8")))


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_pages_to_check() -> None:
    names = {"architecture.md", "operations.md", "retrieval.md", "deployment.md", "benchmarks.md"}
    assert README.exists()
    assert names <= {p.name for p in DOCS}


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_relative_links_reach_a_file_and_heading(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_make_targets_named_exist(path: Path) -> None:
    targets = makefile_targets()
    named = make_targets_named(path)
    assert [f"line {number}: make {target}" for number, target in named if target not in targets] == []


def test_readme_is_a_short_users_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


@pytest.mark.parametrize("path", DOCS, ids=page_id)
def test_docs_page_opens_with_what_it_is_for(path: Path) -> None:
    """A title, then a paragraph of prose (not a list, table, quote, heading or code) first."""
    prose, _ = split(path.read_text(encoding="utf-8"))
    first = [line for line in prose if line.strip()][:2]
    assert first[0].startswith("# "), first[0]
    assert not re.match(r"\s*([-*|>#]|\d+\.)", first[1]), f"{path.name} opens with {first[1]!r}"


# The checks themselves, on pages of their own.


def test_slug_follows_githubs_rule() -> None:
    assert slug("Modes: `RAG_RERANKER`") == "modes-rag_reranker"
    assert slug("The deployment rehearsal: `make rehearse`") == "the-deployment-rehearsal-make-rehearse"
    assert slug("1M chunks: `make bench-1m`") == "1m-chunks-make-bench-1m"
    assert slug('No good match: "relevance" & min') == "no-good-match-relevance--min"


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md#a-section) [ok](#here) [ok](https://example.org/x#y) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [a link\nover two lines](#there)\n"
        "```text\n[in a code block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        f"page.md:6: (missing.md): no file {tmp_path / 'missing.md'}",
        "page.md:6: (other.md#nope): no heading with anchor #nope in other.md",
        "page.md:6: (#there): no heading with anchor #there in page.md",
    ]


def test_make_targets_are_read_from_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\nTo make it run: `make dev PORT=3300`, `BENCH_SCALE= make bench`, `make`.\n"
        "```bash\nmake RAG_DATA_DIR=/tmp/x run   # see make test\n```\n",
        encoding="utf-8",
    )
    assert make_targets_named(page) == [(3, "dev"), (3, "bench"), (5, "run"), (5, "test")]
