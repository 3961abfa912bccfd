"""Each CLI's shown defaults and choices are read from the config dataclass (or function) they fill, so
an option and its default exist once: a click default that repeats a literal would drift from it."""
from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner


def _shown_defaults(command: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in command.params if isinstance(p, click.Option) and p.show_default}


def _choices(command: click.Command) -> dict[str, tuple]:
    return {p.name: tuple(p.type.choices) for p in command.params if isinstance(p.type, click.Choice)}


def _dataclass_defaults(instance) -> dict[str, object]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def test_petal_run_defaults_and_choices_are_the_pipeline_configs():
    from petal_runtime.cli import MIN_TRACK_FRAMES, run_cli
    from petal_runtime.models import PRECISIONS
    from petal_runtime.pipeline import DROP_POLICIES, SELECTION_MODES, PipelineConfig

    config = _dataclass_defaults(PipelineConfig())
    shown = _shown_defaults(run_cli)
    shared = sorted(set(shown) & set(config))
    assert shared == ["detect_every", "drop", "min_face", "per_track", "selection", "top_k"]
    assert {name: shown[name] for name in shared} == {name: config[name] for name in shared}
    assert set(shown) - set(shared) == {"backend", "min_track_frames"} and shown["min_track_frames"] == MIN_TRACK_FRAMES
    choices = _choices(run_cli)
    assert choices["selection"] == SELECTION_MODES and choices["drop"] == DROP_POLICIES
    assert choices["precision"] == PRECISIONS


def test_min_face_help_names_the_floor_the_config_checks():
    from petal_runtime.cli import run_cli
    from petal_runtime.errors import PetalError
    from petal_runtime.pipeline import MIN_FACE, PipelineConfig

    text = " ".join(CliRunner().invoke(run_cli, ["--help"], terminal_width=200).output.split())
    assert f"Smallest face (px) to detect; down to {MIN_FACE}. [default: {PipelineConfig().min_face}]" in text
    PipelineConfig(min_face=MIN_FACE)
    with pytest.raises(PetalError, match=f"use {MIN_FACE} or more"):
        PipelineConfig(min_face=MIN_FACE - 1)


def test_petal_run_far_and_threshold_help_name_the_open_set_defaults():
    from petal_runtime.cli import run_cli
    from petal_runtime.openset import DEFAULT_FAR, FALLBACK_THRESHOLD

    text = " ".join(CliRunner().invoke(run_cli, ["--help"], terminal_width=200).output.split())
    assert f"[default: {DEFAULT_FAR:g}]" in text and f"calibration: {FALLBACK_THRESHOLD:g}, with a warning" in text


@pytest.mark.parametrize("command", ["build", "calibrate"])
def test_petal_gallery_calibration_defaults_are_calibrate_gallerys(command):
    from petal_runtime.cli import gallery_cli
    from petal_runtime.openset import calibrate_gallery

    params = inspect.signature(calibrate_gallery).parameters
    shown = _shown_defaults(gallery_cli.commands[command])
    assert shown["max_faces"] == params["limit"].default
    assert shown["seed"] == params["seed"].default
    assert shown["gallery_photos"] == params["with_gallery_photos"].default


def test_petal_export_batch_default_is_the_profiles():
    from petal_export.cli import cli
    from petal_export.export import export_models
    from petal_runtime.profiles import DEFAULT_BATCH, parse_batch

    shown = _shown_defaults(cli)
    assert parse_batch(shown["batch"]) == DEFAULT_BATCH
    assert inspect.signature(export_models).parameters["batch"].default == DEFAULT_BATCH


def test_petal_train_fit_defaults_are_fit_configs():
    pytest.importorskip("torch")
    from petal_train.fit import FitConfig, fit_command

    config = _dataclass_defaults(FitConfig(data="", out=""))
    shown = _shown_defaults(fit_command)
    assert len(shown) >= 15 and set(shown) <= set(config)
    assert shown == {name: config[name] for name in shown}
