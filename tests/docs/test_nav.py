"""The site's navigation: every results page is listed, and no title repeats inside its section
(issue 22: the evidence-digits report was missing, "Digits report" led to an older report and
the nav read "Results > Results")."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def page_title(path: str) -> str:
    for line in (DOCS / path).read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path


def entries(nav: list) -> list[tuple[str | None, str | list]]:
    """(explicit title or None, page path or child list) for each item of a nav list."""
    out = []
    for item in nav:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            out.append((title, value))
        else:
            out.append((None, item))
    return out


def pages(nav: list) -> list[str]:
    found = []
    for _, value in entries(nav):
        found += pages(value) if isinstance(value, list) else [value]
    return found


def test_every_results_page_is_in_the_nav() -> None:
    listed = set(pages(CONFIG["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in (DOCS / "results").rglob("*.md")
               if "quick" not in p.relative_to(DOCS).parts}
    assert {"results/evidence-digits/report.md", "results/index.md"} <= on_disk
    assert not on_disk - listed, f"not in the nav: {sorted(on_disk - listed)}"


def test_no_title_repeats_in_a_section() -> None:
    indexes = "navigation.indexes" in CONFIG["theme"].get("features", [])

    def check(section: str, nav: list) -> None:
        titles = []
        for k, (title, value) in enumerate(entries(nav)):
            if isinstance(value, list):
                titles.append(title)
                check(title, value)
            elif k == 0 and title is None and value.endswith("index.md") and indexes:
                continue  # the section's own page (navigation.indexes): shown as the section
            else:
                titles.append(title or page_title(value))
        assert section not in titles, f"'{section} > {section}' in the nav"
        assert len(titles) == len(set(titles)), f"repeated titles under {section}: {titles}"

    check("(top)", CONFIG["nav"])


def test_nav_titles_name_the_report_they_lead_to() -> None:
    """A title that names a task and a preset leads to that task's report of that preset."""
    results = next(value for title, value in entries(CONFIG["nav"]) if title == "Results")
    for title, value in entries(results):
        if title is None or not isinstance(value, str) or not value.endswith("report.md"):
            continue
        heading = page_title(value).lower()
        task = title.split(",")[0].split(" ")[0].lower()
        assert {"sentiment": "sentiment", "digits": "digits", "llm": "llm", "segmentation": "segmentation"}[task] in heading
        if "evidence" in title.lower():
            assert "preset `evidence`" in heading, (title, value)
        else:
            assert "evidence" not in heading, (title, value)
