"""mkdocs hook: `::: spdecay.NAME` documents the public object even where a submodule has its name.

``spdecay.adam_spd`` is a function and ``spdecay.param_groups`` a function, but the package also
has submodules ``spdecay/adam_spd.py`` and ``spdecay/param_groups.py``. griffe (which reads the
code for mkdocstrings) gives a submodule precedence over a same-named import in ``__init__.py``
(mkdocstrings/griffe#124), so ``::: spdecay.adam_spd`` would render the module. Before a page is
converted, this hook rewrites such a directive to the path ``spdecay/__init__.py`` imports the name
from, keeps the public path as its heading and adds an anchor with the public path, so links like
``[adam_spd][spdecay.adam_spd]`` still resolve. It reads ``__init__.py`` statically (no import of
torch), so it follows any renaming of the private modules; names without a clash pass through.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("spdecay",)
# A directive line and the indented option lines under it.
DIRECTIVE = re.compile(r"^::: (?P<path>[\w.]+)[ \t]*\n(?P<block>(?:[ \t]+\S.*\n)*)", re.M)


def public_imports(package: str) -> dict[str, str]:
    """Public name -> dotted path it is imported from, read from the package's ``__init__.py``."""
    tree = ast.parse((SRC / package.replace(".", "/") / "__init__.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return found


def shadowed(package: str) -> dict[str, str]:
    """Public path -> defining path, for the names a same-named submodule hides from griffe."""
    folder = SRC / package.replace(".", "/")
    return {
        f"{package}.{name}": target
        for name, target in public_imports(package).items()
        if (folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists()
    }


def rewrite(markdown: str, hidden: dict[str, str]) -> str:
    """Point each directive on a hidden public path at its definition, headed by the public path."""

    def swap(match: re.Match[str]) -> str:
        public = match["path"]
        if public not in hidden:
            return match[0]
        block = match["block"]
        ours = f"      heading: {public}\n      toc_label: {public.rsplit('.', 1)[1]}\n"
        if re.search(r"^[ \t]+options:[ \t]*$", block, re.M):
            block = re.sub(r"^([ \t]+options:[ \t]*\n)", lambda m: m[1] + ours, block, count=1,
                           flags=re.M)
        else:
            block = "    options:\n" + ours + block
        return f"[](){{#{public}}}\n::: {hidden[public]}\n{block}"

    return DIRECTIVE.sub(swap, markdown)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    hidden: dict[str, str] = {}
    for package in PACKAGES:
        hidden.update(shadowed(package))
    return rewrite(markdown, hidden)
