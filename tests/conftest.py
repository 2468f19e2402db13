"""Shared fixtures: tiny real transformers models and a character tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-=*:,.?!\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def fresh_cache():  # type: ignore[no-untyped-def]
    """The process-wide store cache emptied before and after a test (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("fresh_cache")``)."""
    from mergekit_fisher.store import clear_cache

    clear_cache()
    yield
    clear_cache()


def make_tokenizer():  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", **overrides):  # type: ignore[no-untyped-def]
    """A transformers config for a tiny model of a real architecture family."""
    from transformers import AutoConfig

    vocab = len(make_tokenizer())
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def save_tiny_model(
    path: Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """Build a randomly initialised tiny model and save it (with tokenizer) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    # Random norm weights: an untrained model's all-ones norms cannot be told apart by binding.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path.resolve()


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different models of the same architecture (the usual merge inputs)."""
    root = tmp_path_factory.mktemp("pair")
    return save_tiny_model(root / "a", seed=1), save_tiny_model(root / "b", seed=2)


# ------------------------------------------------------------------ merge helpers (shared)


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def make_store(
    model: Path,
    out: Path,
    seed: int,
    *,
    broadcast: tuple[str, ...] = (),
    broadcast_columns: tuple[str, ...] = (),
    zero_fraction: float = 0.3,
    drop: tuple[str, ...] = (),
    **kwargs: Any,
) -> Path:
    """A store of random Fisher values (some exactly zero) bound to ``model``'s weights; the
    ``broadcast`` weights get one value per row ([out, 1]), ``broadcast_columns`` one per
    column ([1, in]), as node stores hold."""
    weights = model_tensors(model)
    g = torch.Generator().manual_seed(seed)
    fisher = {}
    for name, w in weights.items():
        if name in drop:
            continue
        shape = (
            (w.shape[0], 1)
            if name in broadcast
            else (1, w.shape[1])
            if name in broadcast_columns
            else w.shape
        )
        f = torch.rand(shape, generator=g) ** 4
        f[torch.rand(shape, generator=g) < zero_fraction] = 0.0
        fisher[name] = f
    from mergekit_fisher.store import write_store

    write_store(out, fisher, weights={n: weights[n] for n in fisher}, model=str(model), **kwargs)
    return out


def stored_fisher(store: Path) -> dict[str, torch.Tensor]:
    """Read a store's tensors with plain safetensors (independent of the reader under test)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in store.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def run_recipe(recipe: dict[str, Any], out: Path, **options: Any) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_fisher.methods  # noqa: F401  (registers `fisher`)

    run_merge(
        MergeConfiguration.model_validate(recipe),
        str(out),
        options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False, **options),
    )
    return model_tensors(out)


def fisher_recipe(
    models: list[Path], stores: list[Path], weights: list[float], **params: Any
) -> dict:
    return {
        "merge_method": "fisher",
        "models": [
            {"model": str(m), "parameters": {"weight": w, "fisher": str(s)}}
            for m, s, w in zip(models, stores, weights)
        ],
        "parameters": params,
        "dtype": "float32",
    }


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted into a model directory, from the user cache when one is
    set (CI converts once); the test is skipped, with the install line, without the model."""
    from mergekit_fisher.real import smollm2

    try:
        smollm2.gguf_path()
    except smollm2.ModelUnavailable as error:
        pytest.skip(str(error))
    cache = os.environ.get(smollm2.CACHE_ENV)
    return smollm2.model_dir(Path(cache) if cache else tmp_path_factory.mktemp("smol"))
