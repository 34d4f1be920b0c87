"""Every link in README.md and docs/*.md goes somewhere: a file of this repository (and, with
`#anchor`, a heading in it), or a public https site. Nothing points outside the checkout, where
a clone has nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_follows_github() -> None:
    assert slug("The launcher: `scripts/run.sh` (or `vespa`)") == "the-launcher-scriptsrunsh-or-vespa"
    assert slug("HTTPS workers and Vast's root CA") == "https-workers-and-vasts-root-ca"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if target.startswith("https://"):
            continue  # a public site
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            broken.append(f"{target}: not a relative link nor https")
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, broken
    assert links(page) or page.name != "README.md"


def test_readme_links_every_docs_page_and_fits_a_reader() -> None:
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    assert not [p.name for p in PAGES[1:] if p not in linked]
    assert len(readme.read_text().splitlines()) <= 260
    # The two set-up commands come first.
    first_block = FENCE.search(readme.read_text()).group()
    assert "scripts/run.sh --demo" in first_block and "scripts/test.sh" in first_block
