"""--max-gpu-memory: the memory plan from shapes (8B Llama under 24/48 GiB), offloaded
accumulators bit-identical to resident ones (full, nodes, Gram; resume too), the plan's log
lines and metadata, one-line errors; CUDA versions against the naive references."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import requires_cuda, save_tiny_model, tiny_config
from fisher_reference import naive_fisher, naive_node_fisher, random_examples, rel_error
from transformers import AutoModelForCausalLM

from mergekit_fisher.cli import main
from mergekit_fisher.estimate import EstimateConfig, EstimateError, compute_fisher, estimate_fisher
from mergekit_fisher.estimate.budget import (
    GIB,
    MemoryPlan,
    ModelDims,
    Workload,
    plan_memory,
)
from mergekit_fisher.estimate.nodes import find_layers

torch.set_num_threads(1)

LENGTHS = [9, 17, 4, 12, 17, 6, 2]
TEXTS = ["the quick brown fox", "1 + 2 = 3", "hello world, how are you?", "short", "abc def"]

# --------------------------------------------------------------------------- the planner

LLAMA_8B = dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv=8)


def llama_shapes(statistic: str, granularity: str = "full") -> dict[str, int]:
    """Accumulator bytes (float32) of a Llama-3.1-8B-shaped model, from shapes alone."""
    h, i, v, n = LLAMA_8B["hidden"], LLAMA_8B["intermediate"], LLAMA_8B["vocab"], 32
    kv = h // LLAMA_8B["heads"] * LLAMA_8B["kv"]
    out: dict[str, int] = {}
    for layer in range(n):
        p = f"model.layers.{layer}"
        if statistic == "gram":
            sides = {"qkv": h, "o": h, "gate_up": h, "down": i}
        elif granularity == "nodes":
            sides = {"heads": 32, "kv": 8, "neurons": i}
        else:
            sides = {"q": h * h, "k": kv * h, "v": kv * h, "o": h * h, "gate": i * h, "up": i * h}
            sides.update(down=h * i, in_norm=h, post_norm=h)
        for key, n_ in sides.items():
            out[f"{p}.{key}"] = 4 * (n_ * n_ if statistic == "gram" else n_)
    if statistic == "gram":
        out["lm_head.input"] = 4 * h * h
    elif granularity == "full":
        out.update({"embed": 4 * v * h, "lm_head": 4 * v * h, "norm": 4 * h})
    return out


def plan_8b(gib: float, statistic: str = "fisher", granularity: str = "full") -> MemoryPlan:
    dims = ModelDims(
        hidden=4096, intermediate=14336, layers=32, vocab=128256,
        weight_bytes=16_060_522_496, element_bytes=2,
    )  # fmt: skip
    work = Workload(statistic, 8 * 512, 256 * 1024**2, checkpointing=False, can_checkpoint=True)
    return plan_memory(int(gib * GIB), dims, llama_shapes(statistic, granularity), work, "cuda:0")


def test_8b_full_fisher_plan_at_24_and_48_gib() -> None:
    """Accumulators are 32 GB: at 24 GiB almost all go to CPU memory, at 48 GiB most stay;
    activations of 8 x 512 tokens (~34 GB plain) force checkpointing at both, not uncapped."""
    small, large, h200 = plan_8b(24), plan_8b(48), plan_8b(139)
    assert small.fits and large.fits and h200.fits
    assert small.checkpointing and large.checkpointing and not h200.checkpointing
    total = sum(llama_shapes("fisher").values())
    assert small.bytes["offloaded"] > 0.9 * total
    assert 0.2 * total < large.bytes["offloaded"] < 0.6 * total
    assert not h200.offloaded and len(h200.resident) == len(llama_shapes("fisher"))
    # smallest stay: every resident tensor is no larger than any offloaded one
    sizes = llama_shapes("fisher")
    assert max(sizes[n] for n in large.resident) <= min(sizes[n] for n in large.offloaded)
    assert "embed" in small.offloaded and "model.layers.0.in_norm" in small.resident
    for plan in (small, large):
        used = sum(v for k, v in plan.bytes.items() if k not in ("activations_plain", "offloaded"))
        assert used <= plan.budget


def test_8b_nodes_and_gram_plans() -> None:
    """Nodes keep every accumulator on the GPU at 24 GiB; Grams (33 GB) split at 48 GiB and
    need no checkpointing (forward only); below the weights nothing fits."""
    nodes = plan_8b(24, granularity="nodes")
    assert nodes.fits and nodes.checkpointing and not nodes.offloaded
    gram = plan_8b(48, statistic="gram")
    assert gram.fits and not gram.checkpointing and gram.offloaded and gram.resident
    assert not plan_8b(12).fits


# --------------------------------------------------------------------------- bit-identical


def tiny_model(arch: str = "llama", **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.requires_grad_(False)


CASES = {
    "full": dict(mode="sampled", samples_per_example=2),
    "nodes": dict(mode="empirical", granularity="nodes"),
    "gram": dict(statistic="gram"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tie", [False, True])
def test_offloaded_run_is_bit_identical(case: str, tie: bool) -> None:
    """A budget too small for anything offloads every accumulator (and checkpoints the Fisher's
    layers): float32 sums equal the unconstrained run's bit for bit."""
    examples = random_examples(LENGTHS, tiny_config().vocab_size, seed=3, prompt=3)
    config = EstimateConfig(batch_size=3, seed=7, **CASES[case])
    plain = compute_fisher(tiny_model(tie_word_embeddings=tie), examples, config)
    budgeted = compute_fisher(
        tiny_model(tie_word_embeddings=tie), examples, config.with_(max_gpu_memory="1KiB")
    )
    bank = budgeted.collector.bank
    assert bank.offloaded == set(bank.specs) and not plain.collector.bank.offloaded
    (plan,) = budgeted.collector.plans
    assert plan.checkpointing == (case != "gram")
    assert set(plain.fisher) == set(budgeted.fisher)
    for name, value in plain.fisher.items():
        assert torch.equal(budgeted.fisher[name], value), name


# --------------------------------------------------------------------------- CLI


def test_cli_logs_the_plan_and_refuses_a_bad_size(
    tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS))
    args = ["estimate", str(tiny_llama), "--data", str(data), "--no-progress", "--device", "cpu"]
    bad = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "x"), "--max-gpu-memory", "lots"]
    )
    assert bad.exit_code == 1 and bad.output.count("\n") == 1, bad.output
    assert "--max-gpu-memory 'lots' is not a memory size" in bad.output
    assert not (tmp_path / "x").exists()
    with caplog.at_level(logging.INFO, logger="mergekit_fisher.estimate"):
        ok = CliRunner().invoke(
            main, [*args, "--out", str(tmp_path / "f"), "--max-gpu-memory", "64KiB"]
        )
    assert ok.exit_code == 0, ok.output
    plan_lines = [r.getMessage() for r in caplog.records]
    for expected in (
        "memory plan for 64.0 KiB on cpu",
        "gradient checkpointing on",
        "logits: float32 work in chunks of",
        "accumulators on cpu: 0 tensors",
        "accumulators in CPU memory, added per batch",
    ):
        assert any(expected in line for line in plan_lines), (expected, plan_lines)


def test_bad_budget_in_the_api_is_one_line() -> None:
    with pytest.raises(EstimateError, match="24GiB"):
        EstimateConfig(max_gpu_memory="0GiB")


# --------------------------------------------------------------------------- CUDA


def partial_budget(model: torch.nn.Module, config: EstimateConfig, shares: float = 0.5) -> int:
    """A budget that holds the weights and working set and about ``shares`` of the
    accumulators' bytes (so that some stay and the rest are offloaded)."""
    from mergekit_fisher.estimate.runner import make_collector
    from mergekit_fisher.estimate.taps import BatchState

    probe = make_collector(model, BatchState(), config.with_(max_gpu_memory="1TiB"))
    (plan,) = probe.plans
    need = sum(plan.bytes[k] for k in ("weights", "activations", "logits", "scratch"))
    need += int(shares * plan.bytes["resident"])
    return int(need / 0.9) + 1


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("granularity", ["full", "nodes"])
def test_cuda_offloaded_fisher_matches_reference(granularity: str) -> None:
    model = tiny_model().double()
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=3, prompt=3)
    config = EstimateConfig(
        mode="sampled", samples_per_example=2, seed=7, batch_size=3, granularity=granularity,
        chunk_bytes=1024**2,
    )  # fmt: skip
    if granularity == "full":
        ref = naive_fisher(model, examples, mode="sampled", samples=2, seed=7)
    else:
        ref = naive_node_fisher(model, examples, mode="sampled", samples=2, seed=7)
    cuda = tiny_model().cuda()
    budget = partial_budget(cuda, config)
    plain = compute_fisher(cuda, examples, config)
    offloaded = compute_fisher(tiny_model().cuda(), examples, config.with_(max_gpu_memory=budget))
    bank = offloaded.collector.bank
    assert bank.offloaded and len(bank.offloaded) < len(bank.specs)
    for name, value in plain.fisher.items():
        assert torch.equal(offloaded.fisher[name].cpu(), value.cpu()), name
    if granularity == "nodes":
        values = offloaded.collector.node_values(len(examples) * 2)
        got = {k: values[k] for k in values if not k.endswith(".kv")}
        ref = {k: ref[k] for k in got}
    else:
        got = offloaded.fisher
    for name, value in ref.items():
        assert rel_error(got[name].double().cpu(), value) <= 1e-5, name


@pytest.mark.gpu
@requires_cuda
def test_cuda_offloaded_gram_matches_dense_reference(tmp_path: Path) -> None:
    from test_gram import naive_grams

    path = save_tiny_model(tmp_path / "m", seed=3)
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS))
    config = EstimateConfig(statistic="gram", device="cuda", dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(path).cuda()
    budget = partial_budget(model, config)
    stores = [
        estimate_fisher(path, [data], tmp_path / name, config.with_(max_gpu_memory=limit))
        for name, limit in (("plain", None), ("offloaded", budget))
    ]
    plan = stores[1].config["estimator"]["memory_plan"]["cuda:0"]
    assert plan["offloaded_accumulators"] > 0 and plan["resident_accumulators"] > 0
    ref = naive_grams(path, TEXTS)
    for weight, key in stores[0].config["consumers"].items():
        assert torch.equal(stores[1].get(key), stores[0].get(key)), key
        got = stores[1].get(key, dtype=torch.float64)
        torch.testing.assert_close(got, ref[weight], rtol=2e-5, atol=2e-6)


def test_find_layers_of_the_8b_shape_match_the_planner_shapes() -> None:
    """The fake 8B shapes above are the real collectors' accumulators (on the meta device)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, vocab_size=128256,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = find_layers(model)[0]
    assert (layer.heads, layer.kv_heads, layer.neurons) == (32, 8, 14336)
    params = {n: p.numel() * 4 for n, p in model.named_parameters()}
    fake = llama_shapes("fisher")
    assert params["model.layers.0.self_attn.k_proj.weight"] == fake["model.layers.0.k"]
    assert params["model.layers.0.mlp.down_proj.weight"] == fake["model.layers.0.down"]
    assert params["lm_head.weight"] == fake["lm_head"]


def test_plan_log_is_one_line_per_decision(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mergekit_fisher.estimate"):
        plan_8b(24).log()
    assert len(caplog.records) == 5
    assert "gradient checkpointing on" in caplog.text


def test_reading_accumulators_waits_for_pending_offloaded_adds() -> None:
    from mergekit_fisher.estimate.offload import Accumulators, Banked

    holder = Banked()
    holder.bank = Accumulators()
    holder.bank.declare("a", (4000, 4000), torch.float32, "cpu")
    holder.bank.allocate({"a"})
    holder.bank._submit(lambda: time.sleep(0.3), None, None)  # a slow add ahead in the queue
    holder.bank.add("a", torch.ones(4000, 4000))
    assert torch.equal(holder.accumulators["a"], torch.ones(4000, 4000))


def test_device_map_auto_with_a_budget_equals_the_plain_run(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """--device-map auto (accelerate's placement; all CPU here) keeps working under a budget."""
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS))
    common = dict(store_dtype="float32", progress=False, device="cpu", batch_size=2)
    plain = estimate_fisher(tiny_llama, [data], tmp_path / "plain", **common)
    mapped = estimate_fisher(
        tiny_llama, [data], tmp_path / "mapped", device_map="auto", max_gpu_memory="1KiB", **common
    )
    assert mapped.config["estimator"]["memory_plan"]["cpu"]["resident_accumulators"] == 0
    for name in plain.names:
        assert torch.equal(mapped.get(name), plain.get(name)), name
