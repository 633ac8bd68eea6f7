"""Every relative link in README.md and docs/*.md resolves: the file exists and, with a ``#fragment``, the target
has a heading of that name; every page in docs/ is in mkdocs.yml's nav and every nav entry exists. Runs without
mkdocs (``mkdocs build --strict`` checks the same for the site)."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _pages() -> list[str]:
    pages = [os.path.join(ROOT, "README.md")]
    pages += sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return pages


def _prose(text: str) -> str:
    """The text outside code blocks and inline code, where a link is a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading (for the headings these pages use, the two agree)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"[\s-]+", "-", text).strip("-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {slug(h) for h in HEADING.findall(text)}


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return LINK.findall(_prose(f.read()))


def broken_links(path: str) -> list[str]:
    out = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):     # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            out.append(f"{target}: no such file {os.path.relpath(dest, ROOT)}")
        elif fragment and dest.endswith(".md") and fragment not in anchors(dest):
            out.append(f"{target}: no heading #{fragment} in {os.path.relpath(dest, ROOT)}")
    return out


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Some heading\n\n## A `code` heading, with punctuation!\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-heading) [ok](other.md#a-code-heading-with-punctuation) [web](https://x.org)\n"
                    "[gone](missing.md) [bad](other.md#nope) [self](#nowhere) `[code](ignored.md)`\n"
                    "```\n[fenced](ignored.md)\n```\n")
    rel = lambda name: os.path.relpath(tmp_path / name, ROOT)  # noqa: E731
    assert broken_links(str(page)) == ["missing.md: no such file " + rel("missing.md"),
                                       "other.md#nope: no heading #nope in " + rel("other.md"),
                                       "#nowhere: no heading #nowhere in " + rel("page.md")]


def test_mkdocs_nav_lists_every_page():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", f.read(), re.M))
    pages = {f for f in os.listdir(DOCS) if f.endswith(".md")}
    assert nav == pages
