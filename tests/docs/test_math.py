"""Formulas render offline: the built pages load the vendored KaTeX (no CDN), whose files are all
in the site (issue 22: arithmatex was enabled but no renderer was loaded, and raw ``\\(c = ...\\)``
showed). Rendering itself was checked in headless Chromium (see the issue's note)."""

from __future__ import annotations

import re
from pathlib import Path

KATEX = ("assets/katex/katex.min.js", "assets/katex/contrib/auto-render.min.js",
         "assets/katex/katex.min.css", "javascripts/katex.js")


REMOTE = re.compile(r"[a-z][a-z0-9+.-]*:|//")


def referenced(page: Path) -> set[str]:
    """Scripts and stylesheets a page loads, as written in it (relative paths or URLs)."""
    html = page.read_text()
    refs = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
    refs += re.findall(r'<link[^>]*\brel="stylesheet"[^>]*\bhref="([^"]+)"', html)
    return set(refs)


def test_algorithm_page_loads_the_vendored_katex(site: Path) -> None:
    page = site / "algorithm" / "index.html"
    html = page.read_text()
    assert html.count('class="arithmatex"') >= 10  # the formulas KaTeX is to render
    loaded = {(page.parent / ref.split("?")[0]).resolve() for ref in referenced(page)
              if not REMOTE.match(ref)}
    for path in KATEX:
        assert (site / path).resolve() in loaded, f"algorithm page does not load {path}"
        assert (site / path).stat().st_size > 0


def test_every_katex_font_is_in_the_site(site: Path) -> None:
    css = (site / "assets/katex/katex.min.css").read_text()
    fonts = set(re.findall(r"url\((fonts/[\w-]+\.woff2)\)", css))
    assert len(fonts) >= 20
    for font in fonts:
        assert (site / "assets/katex" / font).is_file(), font


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    for page in site.rglob("*.html"):
        remote = sorted(ref for ref in referenced(page) if REMOTE.match(ref))
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def test_init_script_renders_the_arithmatex_elements(site: Path) -> None:
    script = (site / "javascripts/katex.js").read_text()
    assert "renderMathInElement" in script and ".arithmatex" in script
