"""The full-granularity estimator against a naive batch-1 float64 loop, plus the run around it:
CLI, store metadata, truncation and prompt masks, resume, non-finite handling, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer, save_tiny_model, tiny_config
from fisher_reference import naive_fisher, random_examples, rel_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_fisher.cli import main
from mergekit_fisher.data import load_calibration_data
from mergekit_fisher.errors import FisherError
from mergekit_fisher.estimate import EstimateConfig, EstimateError, compute_fisher, estimate_fisher
from mergekit_fisher.store import open_store

torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box: threads only spin

FP64_TOL = 1e-6
FP32_TOL = 1e-5  # docs/fisher.md: float32 vs the float64 reference, max-normalised per tensor
LENGTHS = [9, 17, 4, 12, 17, 6, 2]


def tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.requires_grad_(False)


def assert_close(got: dict, ref: dict, tol: float) -> None:
    assert set(got) == set(ref)
    worst = {k: rel_error(got[k], ref[k]) for k in ref}
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, f"relative error above {tol}: {bad}"


@pytest.mark.parametrize(
    ("arch", "mode", "tie"),
    [
        ("llama", "empirical", False),
        ("llama", "sampled", False),
        ("qwen2", "empirical", False),  # q/k/v biases
        ("qwen2", "sampled", True),  # tied lm_head: summed per example before squaring
        ("gpt2", "sampled", True),  # Conv1D ([in, out] weights), position ids shared by the batch
        ("falcon", "empirical", False),  # parallel attention: adds into a tapped output in place
    ],
)
def test_matches_naive_float64(arch: str, mode: str, tie: bool) -> None:
    model = tiny_model(arch, tie_word_embeddings=tie)
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=3, prompt=3)
    samples = 2 if mode == "sampled" else 1
    ref = naive_fisher(model, examples, mode=mode, samples=samples, seed=7)
    config = EstimateConfig(mode=mode, batch_size=3, samples_per_example=samples, seed=7)
    got = compute_fisher(model, examples, config).fisher
    assert_close(got, ref, FP64_TOL)
    if tie:
        embed = model.get_input_embeddings().weight
        embed_name = next(n for n, p in model.named_parameters() if p is embed)
        assert "lm_head.weight" not in got and embed_name in got


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_matches_naive_float64(arch: str) -> None:
    """Gemma 2/3: scaled embeddings, q/k norms (Gemma 3), soft-capping (Gemma 2). Exact on
    equal lengths; on ragged batches transformers' own Gemma forward moves a padded example's
    gradients by ~1e-7 relative in float64 (a batch-1 autograd check shows it too)."""
    model = tiny_model(arch, head_dim=8)
    for lengths, tol in (([9, 9, 9], 1e-12), (LENGTHS, FP64_TOL)):
        examples = random_examples(lengths, model.config.vocab_size, seed=3, prompt=3)
        ref = naive_fisher(model, examples, mode="empirical")
        got = compute_fisher(model, examples, EstimateConfig(mode="empirical", batch_size=3))
        assert_close(got.fisher, ref, tol)


def test_float32_within_documented_tolerance() -> None:
    model = tiny_model("llama")
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=4, prompt=2)
    ref = naive_fisher(model, examples, mode="sampled", seed=1)
    got = compute_fisher(model.float(), examples, EstimateConfig(batch_size=4, seed=1)).fisher
    assert_close(got, ref, FP32_TOL)


def test_batch_size_does_not_change_the_result() -> None:
    model = tiny_model("llama", dtype=torch.float32)
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=5)
    one = compute_fisher(model, examples, EstimateConfig(batch_size=1)).fisher
    many = compute_fisher(model, examples, EstimateConfig(batch_size=5)).fisher
    assert_close(many, one, 1e-5)


def test_gradient_checkpointing_gives_the_same_fisher() -> None:
    model = tiny_model("llama")
    examples = random_examples(LENGTHS[:5], model.config.vocab_size, seed=6)
    plain = compute_fisher(model, examples, EstimateConfig(batch_size=3)).fisher
    ckpt = compute_fisher(
        tiny_model("llama"), examples, EstimateConfig(batch_size=3, gradient_checkpointing=True)
    ).fisher
    assert_close(ckpt, plain, 1e-10)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("est") / "llama", seed=11)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "1 + 2 = 3",
    "a",
    "hello world, how are you today?",
    "x" * 40,
    "short one",
]


def test_store_matches_reference_with_truncation_and_prompt_masks(
    model_dir: Path, tmp_path: Path
) -> None:
    rows = [{"text": t} for t in TEXTS] + [
        {"prompt": "what is 2+2? ", "completion": "it is 4."},
        {"prompt": "name a color: ", "completion": "blue, like the sky over the sea"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    store = estimate_fisher(
        model_dir,
        data,
        tmp_path / "fisher",
        mode="sampled",
        max_length=20,
        batch_size=3,
        dtype="float64",
        store_dtype="float32",
        seed=3,
        progress=False,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration_data([str(data)], tok, max_length=20)
    assert max(len(e.input_ids) for e in calib.examples) == 20  # truncation happened
    assert any(not all(e.target_mask[1:]) for e in calib.examples)  # prompt masks present
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    ref = naive_fisher(model, calib.examples, mode="sampled", seed=3)
    got = {name: store.get(name, dtype=torch.float64) for name in store.names}
    assert_close(got, ref, FP64_TOL)
    est = store.config["estimator"]
    assert est["num_sequences"] == len(calib.examples) == len(rows)
    assert est["num_tokens"] == calib.num_tokens
    assert est["data_fingerprint"] == calib.fingerprint
    assert est["mode"] == "sampled" and est["dtype"] == "float64" and est["max_length"] == 20
    assert store.granularity == "full" and store.is_bound


def test_cli_estimate_writes_a_bound_store(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in TEXTS])
    out = tmp_path / "fisher"
    args = [
        "estimate", str(model_dir), "--data", str(data), "--out", str(out),
        "--text-field", "body", "--mode", "empirical", "--batch-size", "4",
        "--max-length", "16", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "6 sequences" in result.output
    store = open_store(out)
    assert store.config["estimator"]["mode"] == "empirical"
    assert store.config["store_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert set(store.names) == {n for n, _ in model.named_parameters()}
    again = CliRunner().invoke(main, args)  # existing --out: one line, exit 1
    assert again.exit_code == 1
    assert again.output.count("\n") == 1 and "--overwrite" in again.output


@pytest.mark.parametrize("budget", [None, "1KiB"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(
    model_dir: Path, tmp_path: Path, budget: str | None
) -> None:
    """Also with every accumulator offloaded to CPU memory by a memory budget (1 KiB)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t + " " + t} for t in TEXTS * 2])
    common = dict(batch_size=2, store_dtype="float32", progress=False, seed=5)
    full = estimate_fisher(model_dir, data, tmp_path / "full", **common)
    common["max_gpu_memory"] = budget

    class Killed(Exception):
        pass

    def kill_after_three(progress):  # type: ignore[no-untyped-def]
        if progress.batches == 3:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        estimate_fisher(
            model_dir, data, out, checkpoint_every=2, callback=kill_after_three, **common
        )
    assert not out.exists() and Path(f"{out}.checkpoint").is_dir()
    with pytest.raises(EstimateError, match="--resume"):
        estimate_fisher(model_dir, data, out, **common)
    with pytest.raises(EstimateError, match="other settings"):
        estimate_fisher(model_dir, data, out, resume=True, **{**common, "seed": 6})
    seen = []
    resumed = estimate_fisher(
        model_dir, data, out, resume=True, callback=lambda p: seen.append(p.examples), **common
    )
    assert seen[0] == 6  # continued after the checkpointed 2 batches (4) + this batch
    assert not Path(f"{out}.checkpoint").exists()
    for name in full.names:
        assert torch.equal(resumed.get(name), full.get(name)), name
    assert resumed.config["estimator"]["num_sequences"] == full.config["estimator"]["num_sequences"]
    assert "memory_plan" not in full.config["estimator"]
    if budget is not None:
        plan = resumed.config["estimator"]["memory_plan"]["cpu"]
        assert plan["max_gpu_memory"] == 1024 and plan["resident_accumulators"] == 0


def test_nonfinite_example_is_named_or_skipped(tmp_path: Path) -> None:
    path = save_tiny_model(tmp_path / "m", seed=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    tok = make_tokenizer()
    poison = tok.convert_tokens_to_ids("z")
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    texts = ["abc def", "a z here", "plain text", "more words"]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    with pytest.raises(
        EstimateError, match=r"example 1 \(0-based\) of .*d.jsonl.*--skip-nonfinite"
    ):
        estimate_fisher(model, data, tmp_path / "f", tokenizer=tok, batch_size=4, progress=False)
    assert not (tmp_path / "f").exists()
    store = estimate_fisher(
        model, data, tmp_path / "f", tokenizer=tok, batch_size=4, progress=False,
        skip_nonfinite=True, store_dtype="float32", mode="empirical",
    )  # fmt: skip
    assert store.config["estimator"]["skipped_nonfinite"] == 1
    calib = load_calibration_data([str(data)], tok)
    kept = [e for i, e in enumerate(calib.examples) if i != 1]
    ref = naive_fisher(model, kept, mode="empirical")
    ref["model.embed_tokens.weight"][poison] = 0.0  # the poisoned row never enters
    got = {n: store.get(n, dtype=torch.float64) for n in store.names}
    assert_close(got, ref, FP64_TOL)


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ([], {}, "empty dataset"),
        ([{"prompt": "x" * 30, "completion": "y"}], {"max_length": 8}, "no example has a target"),
        ([{"body": "hello"}], {}, "--text-field"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(
    model_dir: Path, tmp_path: Path, rows: list, options: dict, message: str
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(FisherError, match=message) as info:
        estimate_fisher(model_dir, data, tmp_path / "out", progress=False, **options)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(EstimateError, match="--mode"):
        EstimateConfig(mode="exact")
    with pytest.raises(EstimateError, match="--samples-per-example"):
        EstimateConfig(mode="empirical", samples_per_example=2)
    with pytest.raises(EstimateError, match="--dtype"):
        EstimateConfig(dtype="int8")


def test_unknown_model_is_one_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    with pytest.raises(EstimateError, match="cannot load"):
        estimate_fisher(tmp_path / "nope", data, tmp_path / "out", progress=False)


def test_gpt2_store_merges_through_mergekit(tmp_path: Path) -> None:
    """Conv1D stores are keyed and shaped like the checkpoint: mergekit's gpt2 merge uses them."""
    from conftest import fisher_recipe, model_tensors, run_recipe

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    models = [save_tiny_model(tmp_path / f"m{i}", arch="gpt2", seed=i) for i in (1, 2)]
    stores = [
        estimate_fisher(m, data, tmp_path / f"f{i}", progress=False, store_dtype="float32")
        for i, m in enumerate(models)
    ]
    recipe = fisher_recipe(models, [s.path for s in stores], [1.0, 1.0], normalize=False)
    merged = run_recipe(recipe, tmp_path / "out")
    a, b = (model_tensors(m) for m in models)
    name = "transformer.h.1.attn.c_attn.weight"
    fa, fb = (s.get(name) + 1e-8 for s in stores)
    torch.testing.assert_close(merged[name], (fa * a[name] + fb * b[name]) / (fa + fb))


@pytest.mark.parametrize("progress", [False, True])
def test_no_progress_also_silences_transformers_bars(
    model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], progress: bool
) -> None:
    """``--no-progress`` means no bar at all, transformers' "Loading weights" included; its
    own setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    capfd.readouterr()
    estimate_fisher(model_dir, data, tmp_path / "out", progress=progress, batch_size=4)
    assert ("Loading weights" in capfd.readouterr().err) == progress
    assert hf_logging.is_progress_bar_enabled()


def test_logits_in_small_chunks_match_naive_float64() -> None:
    """Vocabulary-wide work (log-sum-exp, the logits' gradient) a few positions at a time."""
    model = tiny_model("llama")
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=3, prompt=3)
    ref = naive_fisher(model, examples, mode="sampled", samples=2, seed=7)
    rows = 3 * 4 * model.config.vocab_size  # engine.logits_rows: 3 positions per chunk
    config = EstimateConfig(batch_size=3, samples_per_example=2, seed=7, chunk_bytes=rows)
    assert_close(compute_fisher(model, examples, config).fisher, ref, FP64_TOL)
