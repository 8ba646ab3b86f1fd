"""The API reference documents every public class and function once, by its public path, with
its signature (issue 22: ``::: spdecay.param_groups`` rendered the module of that name)."""

from __future__ import annotations

import ast
import importlib.util
from html.parser import HTMLParser
from pathlib import Path

import spdecay

ROOT = Path(__file__).resolve().parents[2]
INTEGRATIONS = ROOT / "src" / "spdecay" / "integrations"


def public_names() -> list[str]:
    """Public paths of every class and function: ``spdecay.__all__`` (an alias of another public
    name, the same object, counts once) and each integration module's ``__all__``."""
    names = []
    for name in spdecay.__all__:
        obj = getattr(spdecay, name)
        if getattr(obj, "__name__", name) == name:  # not an alias such as X = Y
            names.append(f"spdecay.{name}")
    for path in sorted(INTEGRATIONS.glob("[!_]*.py")):  # read statically: no transformers import
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body
                   if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
        exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                        and any(getattr(t, "id", None) == "__all__" for t in n.targets))
        names += [f"spdecay.integrations.{path.stem}.{n}" for n in exported if n in defined]
    return names


class Headings(HTMLParser):
    """Each heading's text (without its permalink and labels) and the text of the signature block
    that follows it; also whether any heading is a module's."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[list] = []  # [level, heading text, signature text]
        self.module_headings = 0
        self._in_heading = False
        self._skip = 0       # depth inside a permalink or label element
        self._signature = 0  # depth inside a signature block

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag in {"h1", "h2", "h3", "h4", "h5", "h6"}:
            self._in_heading = True
            self.found.append([int(tag[1]), "", ""])
        elif self._in_heading:
            if self._skip or "headerlink" in classes or "doc-labels" in classes:
                self._skip += 1
            if "doc-symbol-module" in classes:
                self.module_headings += 1
        elif tag == "div" and ("doc-signature" in classes or self._signature):
            self._signature += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in {"h1", "h2", "h3", "h4", "h5", "h6"}:
            self._in_heading, self._skip = False, 0
        elif self._in_heading and self._skip:
            self._skip -= 1
        elif tag == "div" and self._signature:
            self._signature -= 1

    def handle_data(self, data: str) -> None:
        if self._in_heading and not self._skip:
            self.found[-1][1] += data
        elif self._signature and self.found:
            self.found[-1][2] += data


def api_headings(site: Path) -> Headings:
    parser = Headings()
    parser.feed((site / "api" / "index.html").read_text())
    return parser


def test_the_public_names_are_what_the_issue_lists() -> None:
    names = public_names()
    for expected in ("spdecay.AdamSPD", "spdecay.adam_spd", "spdecay.SelectiveProjectionDecay",
                     "spdecay.AdamL2SP", "spdecay.param_groups", "spdecay.llrd_param_groups",
                     "spdecay.LPFT", "spdecay.interpolate", "spdecay.SPDStats",
                     "spdecay.integrations.hf.AdamSPDFactory",
                     "spdecay.integrations.deepspeed.attach"):
        assert expected in names


def test_every_public_name_is_one_heading_with_its_signature(site: Path) -> None:
    found = [(level, " ".join(text.split()), " ".join(sig.split()))
             for level, text, sig in api_headings(site).found]
    texts = [text for _, text, _ in found]
    for name in public_names():
        assert texts.count(name) == 1, f"{name} is a heading {texts.count(name)} times, not once"
        i = texts.index(name)
        level, _, signature = found[i]
        short = name.rsplit(".", 1)[1]
        if not signature:  # a class called with no arguments: what it is called with is __call__
            members = []
            for member_level, _, member_signature in found[i + 1:]:
                if member_level <= level:
                    break
                members.append(member_signature)
            assert any(s.startswith("__call__(") for s in members), f"{name}: no signature"
        else:
            assert signature.startswith(f"{short}("), f"{name}: signature {signature[:60]!r}"


def test_no_module_is_documented_in_place_of_a_public_object(site: Path) -> None:
    assert api_headings(site).module_headings == 0


def load_hook():
    spec = importlib.util.spec_from_file_location("public_api", ROOT / "docs/hooks/public_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_redirects_only_names_a_submodule_hides() -> None:
    hook = load_hook()
    hidden = hook.shadowed("spdecay")
    # A public name whose submodule shares its name points at the object __init__ imports.
    for name, target in hidden.items():
        assert (ROOT / "src" / Path(*name.split("."))).with_suffix(".py").exists() or \
            (ROOT / "src" / Path(*name.split(".")) / "__init__.py").exists()
        assert target.endswith("." + name.rsplit(".", 1)[1]) and target != name
    text = ("::: spdecay.x\n    options:\n      show_source: true\n\n::: spdecay.AdamSPD\n")
    out = hook.rewrite(text, {"spdecay.x": "spdecay._impl.x"})
    assert out == ("[](){#spdecay.x}\n::: spdecay._impl.x\n    options:\n"
                   "      heading: spdecay.x\n      toc_label: x\n      show_source: true\n"
                   "\n::: spdecay.AdamSPD\n")
    assert hook.rewrite("::: spdecay.x\n", {"spdecay.x": "spdecay._impl.x"}) == (
        "[](){#spdecay.x}\n::: spdecay._impl.x\n    options:\n"
        "      heading: spdecay.x\n      toc_label: x\n")
