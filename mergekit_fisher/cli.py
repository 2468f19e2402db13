"""The ``mergekit-fisher`` command line.

``--help`` must answer instantly, so torch, transformers and mergekit are imported inside the
commands, never at module level.
"""

from __future__ import annotations

import logging
import sys

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
            from mergekit_fisher.errors import is_user_error

            if not is_user_error(error) or logging.getLogger().level <= logging.DEBUG:
                raise
            click.echo(f"error: {error}", err=True)
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
@click.option("--data", "data", multiple=True, required=True, help="Held-out data (repeatable).")
@click.option(
    "--grid",
    multiple=True,
    help="KEY=V1,V2,... (repeatable). `weight` is searched per model (all but the first); "
    "shared keys such as epsilon or alpha as listed. Default: weight=0.25,0.5,1,2,4.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Best recipe (YAML).")
@click.option("--num-samples", default=64, show_default=True, help="Held-out sequences to score.")
@click.option("--max-length", default=256, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where candidates are scored.")
@click.option("--cuda", is_flag=True, help="Merge candidates on the GPU (mergekit --cuda).")
@click.option("-v", "--verbose", count=True)
def search_command(
    recipe: str,
    data: tuple[str, ...],
    grid: tuple[str, ...],
    out: str,
    num_samples: int,
    max_length: int,
    batch_size: int,
    text_field: str,
    device: str,
    cuda: bool,
    verbose: int,
) -> None:
    """Search a recipe's merge coefficients by held-out loss; write the best recipe."""
    import os
    from pathlib import Path

    import yaml

    from mergekit_fisher.search import parse_grid, search

    _setup_logging(verbose)
    source = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    result = search(
        source,
        data,
        grid=parse_grid(grid),
        num_samples=num_samples,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        text_field=text_field,
        merge_options={"cuda": cuda},
    )
    click.echo(f"{'held-out loss':>14}  {'seconds':>8}  candidate")
    for candidate in sorted(result.candidates, key=lambda c: c.loss):
        mark = "*" if candidate is result.best else " "
        click.echo(f"{candidate.loss:>13.4f}{mark}  {candidate.seconds:>8.1f}  {candidate.label()}")
    tmp = Path(out).with_name(f".{Path(out).name}.partial")
    tmp.write_text(yaml.safe_dump(result.best_recipe, sort_keys=False), encoding="utf-8")
    os.replace(tmp, out)
    click.echo(
        f"best: {result.best.label()} (loss {result.best.loss:.4f} on {result.sample_tokens} "
        f"tokens); {len(result.candidates)} candidates in {result.seconds:.1f}s; wrote {out}"
    )


@main.command("inspect")
@click.argument("store")
@click.option("--revision", default=None, help="Hub revision, for a repo id.")
@click.option("--verify", is_flag=True, help="Read every tensor to check the files in full.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor's statistics.")
def inspect_command(store: str, revision: str | None, verify: bool, show_tensors: bool) -> None:
    """Show a Fisher store's provenance, settings and statistics (no tensor reads by default)."""
    from mergekit_fisher.store import open_store

    opened = open_store(store, revision)
    config = opened.config
    stats = config["statistics"]
    click.echo(f"store        {opened.path}")
    click.echo(f"model        {opened.model} (revision {config['model'].get('revision')})")
    click.echo(f"granularity  {opened.granularity}; stored as {config['store_dtype']}")
    click.echo(f"tensors      {stats['num_tensors']} covering {stats['num_elements']:,} weights")
    click.echo(f"global L2    {stats['global_l2_norm']:.6g}")
    click.echo(f"bound        {'yes' if opened.is_bound else 'no (merges cannot check weights)'}")
    for key, value in (config.get("estimator") or {}).items():
        click.echo(f"  {key:<20} {value}")
    if show_tensors:
        for name in opened.names:
            s = opened.stats(name)
            click.echo(
                f"{name}  {list(s.shape)}->{list(s.weight_shape)}  sum={s.sum:.4g} max={s.max:.4g}"
            )
    if verify:
        opened.verify()
        click.echo("verified     every tensor read back: finite, non-negative, complete")


if __name__ == "__main__":
    main()
