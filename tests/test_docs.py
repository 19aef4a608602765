"""The README is a short start page and its links hold: every relative link in README.md and docs/*.md
points at a file or folder that exists (and at a heading, when it names an anchor), and every
`merges/*.yaml` the documentation mentions is a recipe of the repository. Reads text only; loads no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = ["methods.md", "results.md", "serving.md", "app.md", "python.md"]
FIRST_BLOCK = [
    "```bash",
    "./setup.sh && .venv/bin/workbench demo",
    "./setup.sh dev && .venv/bin/python -m pytest -q",
    "```",
]
MAX_README_LINES = 150

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]\n]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
MERGES_PATH = re.compile(r"(?<![\w./-])(?:\.\./)?(merges/[\w.*?\[\]-]+\.yaml)")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    """The text outside fenced blocks and inline code spans (links there are not links)."""
    out, fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            out.append("")
            continue
        out.append("" if fence else re.sub(r"`[^`\n]*`", "", line))
    return "\n".join(out)


def links(text: str) -> list[str]:
    prose = _without_code(text)
    return [m["target"] for m in LINK.finditer(prose)] + [m["target"] for m in IMAGE.finditer(prose)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode-aware, as GitHub's slugger
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, duplicates numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fence = False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        m = None if fence else re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m[1])
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target} -> no such file or folder")
        elif anchor and dest.suffix == ".md" and dest.is_file() and anchor.lower() not in anchors(dest):
            problems.append(f"{path.relative_to(ROOT)}: {target} -> no heading gives #{anchor}")
    return problems


def test_readme_is_a_short_start_page():
    lines = README.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    assert lines[: len(FIRST_BLOCK)] == FIRST_BLOCK, "README.md must open with the two commands' bash block"


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_exists_and_is_linked_from_readme(page):
    assert (ROOT / "docs" / page).is_file(), f"docs/{page} is missing"
    assert f"docs/{page}" in links(README.read_text(encoding="utf-8")), f"README.md does not link docs/{page}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_mentioned_recipes_exist(path):
    missing = []
    for rel in sorted(set(MERGES_PATH.findall(path.read_text(encoding="utf-8")))):
        if any(c in rel for c in "*?["):
            if not list(ROOT.glob(rel)):
                missing.append(f"{rel} (matches nothing)")
        elif not (ROOT / rel).is_file():
            missing.append(rel)
    assert missing == [], f"{path.relative_to(ROOT)} mentions recipes that do not exist: {missing}"


def test_link_checker_catches_breakage(tmp_path):
    """The checks above would fail on a broken link, a wrong anchor or a missing recipe."""
    (tmp_path / "other.md").write_text("# A heading: `code`, and more\n## Twice\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-code-and-more) [dup](other.md#twice-1) [self](#top) [web](https://x.y/z)\n"
        "[gone](missing.md) [bad anchor](other.md#nope)\n# Top\n"
        "`[not a link](missing-too.md)`\n```\n[nor this](missing-three.md)\n```\n",
        encoding="utf-8",
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        problems = broken_links(page)
    finally:
        ROOT = saved
    assert problems == ["page.md: missing.md -> no such file or folder", "page.md: other.md#nope -> no heading gives #nope"]
    assert MERGES_PATH.findall("run `workbench merge merges/x-y.yaml` or ../merges/*.yaml") == ["merges/x-y.yaml",
                                                                                            "merges/*.yaml"]
