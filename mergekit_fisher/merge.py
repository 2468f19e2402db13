"""``mergekit-fisher merge``: mergekit-yaml with the pre-flight and an all-or-nothing output.

It parses arguments with mergekit-yaml's own click command, so every mergekit-yaml option is
accepted as-is, checks the recipe, prints which Fisher store serves each model, and merges into
a temporary sibling of OUT_DIR that replaces OUT_DIR only when the merge has succeeded.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

OVERWRITE_FLAG = "--overwrite"


USAGE = """Usage: mergekit-fisher merge RECIPE.yml OUT_DIR [mergekit-yaml options] [--overwrite]

  Merge a mergekit recipe (merge_method: fisher, or any other method) after checking it:
  unknown parameters, every model's Fisher store, which store serves which model. The merged
  model appears in OUT_DIR only when the merge has succeeded.

  Every mergekit-yaml option is accepted as-is (--cuda, --multi-gpu, --low-cpu-memory,
  --out-shard-size, --lazy-unpickle, --copy-tokenizer, ...): `mergekit-yaml --help` lists them.

Options:
  --overwrite  replace a non-empty OUT_DIR (only after the merge has succeeded)
  -h, --help   Show this message and exit.
"""


def run_mergekit_yaml(args: list[str]) -> None:
    """Run mergekit-yaml's command on ``args`` (plus our ``--overwrite``)."""
    if not args or any(a in ("-h", "--help") for a in args):
        click.echo(USAGE)
        return
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_fisher.methods import register_methods
    from mergekit_fisher.preflight import check_recipe, describe, wrap_run_merge
    from mergekit_fisher.store import atomic_directory

    register_methods()
    wrap_run_merge(mergekit.merge)
    overwrite = OVERWRITE_FLAG in args
    args = [a for a in args if a != OVERWRITE_FLAG]
    ctx = mergekit_yaml.make_context("mergekit-fisher merge", args)
    config_file = ctx.params["config_file"]
    out = Path(ctx.params["out_path"])
    try:
        source = Path(config_file).read_text(encoding="utf-8")
    except OSError as error:
        raise click.ClickException(f"cannot read recipe {config_file}: {error.strerror}") from None
    for served in check_recipe(MergeConfiguration.model_validate(yaml.safe_load(source))):
        click.echo(f"{served.store.statistic} store: {describe(served)}", err=True)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        ctx.params["out_path"] = str(tmp)
        with ctx:
            mergekit_yaml.invoke(ctx)
    click.echo(f"merged model written to {out}", err=True)
