"""The manual holds together: every relative link of README.md, docs/ and bench/RESULTS.md reaches a file (and a
heading, when it names one), the README stays a manual of at most 300 lines, and the configuration reference
documents every model key in its section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from uue.config import SECTION_OF

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "bench" / "RESULTS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (a link-like string in code is code)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_the_anchor_rule_matches_github():
    page = REPO / "docs" / "data.md"
    assert "movielens-as-a-uue-dataset-100k-and-1m" in anchors(page)  # "(100K and 1M)": brackets dropped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not this repository's
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_is_a_manual_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    assert {p.resolve() for p in PAGES[1:]} <= linked


def test_the_configuration_reference_documents_every_model_key_in_its_section():
    text = (REPO / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^## `model\.(\w+)`\n(.*?)(?=^## )", text, flags=re.S | re.M))
    missing = [f"{section}.{key}" for key, section in SECTION_OF.items()
               if not re.search(rf"^\| `{key}` \|", sections.get(section, ""), flags=re.M)]
    assert not missing, missing
