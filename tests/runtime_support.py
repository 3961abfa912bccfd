"""Helpers for the runtime tests: an exported models folder, synthetic clips, galleries.

The models folder is `petal_export.export_models` of the shipped default checkpoint (trained
adapters and the shipped IQA), cached on disk under .pytest_cache, keyed by the sources and weights
it depends on, and in memory for the session.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from petal_train.default import default_checkpoint_path

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"
CACHE = REPO / ".pytest_cache" / "petal-runtime"
MODEL_SOURCES = ("petal_train/lora.py", "petal_train/model.py", "petal_train/iqa.py", "petal_train/backbones/sface.py",
                 "petal_runtime/contract.py", "petal_runtime/files.py")
CLIP_SOURCES = ("petal_train/synth.py", "petal_train/degrade.py")
IQA_WEIGHTS = REPO / "petal_train" / "weights" / "iqa_faces.pth"
DEFAULT_CHECKPOINT = default_checkpoint_path()


def _key(sources: tuple[str, ...], *extra: str) -> str:
    digest = hashlib.sha256()
    for rel in sources:
        path = REPO / rel
        digest.update(path.read_bytes() if path.is_file() else b"-")
    if sources is MODEL_SOURCES:
        for weights in (IQA_WEIGHTS, DEFAULT_CHECKPOINT):
            digest.update(weights.read_bytes())
    for e in extra:
        digest.update(e.encode())
    return digest.hexdigest()[:16]


def _atomic_dir(target: Path, build) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=None)
def exported_models() -> Path:
    """A petal-export output folder: the exporter's own export of the shipped default checkpoint."""
    from petal_export import export_models

    # petal_export/triton.py writes a Triton repository from a finished export and changes nothing in it.
    sources = MODEL_SOURCES + tuple(str(p.relative_to(REPO)) for p in sorted((REPO / "petal_export").glob("*.py"))
                                    if p.name != "triton.py")
    return _atomic_dir(CACHE / f"models-export-{_key(sources)}", lambda out: export_models("default", out, log=None))


def lfw_gallery_folder(skip_first: int = 1, per_identity: int = 4) -> Path:
    """LFW10 identity folders with each person's photos after the first (the clip uses the first)."""
    target = CACHE / f"lfw-gallery-{skip_first}-{per_identity}"

    def build(out: Path) -> None:
        for person in sorted((SHARED_FACES / "lfw10").iterdir()):
            files = sorted(person.glob("*.jpg"))[skip_first:skip_first + per_identity]
            (out / person.name).mkdir()
            for f in files:
                shutil.copy(f, out / person.name / f.name)

    return _atomic_dir(target, build)


class Invoked:
    def __init__(self, exit_code: int, output: str, exception: BaseException | None) -> None:
        self.exit_code, self.output, self.exception = exit_code, output, exception


def invoke(command, args) -> Invoked:
    """Run a click command in-process the way its console script does: PetalError -> `error: ...`, 2."""
    from click.testing import CliRunner

    from petal_runtime.errors import PetalError

    result = CliRunner().invoke(command, [str(a) for a in args])
    if isinstance(result.exception, PetalError):
        return Invoked(result.exception.exit_code, result.output + f"error: {result.exception}\n", result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Invoked(result.exit_code, result.output, result.exception)


@functools.lru_cache(maxsize=None)
def lfw_gallery(models_dir: Path) -> Path:
    """gallery.npy of the 10 LFW10 people from their photos 2-5, built with these models (cached)."""
    from petal_runtime.gallery import GALLERY_FORMAT, build_gallery
    from petal_runtime.models import Models

    target = CACHE / f"gallery-{Path(models_dir).name}-v{GALLERY_FORMAT}"

    def build(out: Path) -> None:
        with Models(models_dir) as models:
            gallery, _ = build_gallery(models, lfw_gallery_folder(skip_first=1, per_identity=4))
        gallery.meta["models_dir"] = str(models_dir)
        gallery.save(out / "gallery.npy")

    return _atomic_dir(target, build) / "gallery.npy"


@functools.lru_cache(maxsize=None)
def synth_clip(name: str, people_spec: str = "lfw10", count: int = 3, seed: int = 1, **config):
    """A cached SynthClip: `count` LFW10 people (their first usable photo), or nobody ("none").

    `config` holds SynthConfig fields (tuples as tuples); the clip and its truth JSON are cached.
    """
    from petal_train.synth import SynthConfig, make_clip, people_from_folder

    key = _key(CLIP_SOURCES, name, people_spec, str(count), str(seed), repr(sorted(config.items())))
    path = CACHE / f"{name}-{key}.mp4"
    if path.is_file() and path.with_suffix(".truth.json").is_file():
        return _reload_clip(path)
    people = []
    if people_spec == "lfw10":
        everyone = people_from_folder(SHARED_FACES / "lfw10", per_identity=1)
        people = [everyone[i] for i in np.random.default_rng(seed).permutation(len(everyone))[:count]]
    return make_clip(path, people, SynthConfig(seed=seed, **config))


def lfw_clip():
    """Three LFW10 people walking through a 640x360 scene for 3 s at 28-48 px."""
    return synth_clip("lfw", face_px=(28, 48), seconds=3.0)


def _reload_clip(path: Path):
    from petal_train.synth import SynthClip, TrackTruth

    data = json.loads(path.with_suffix(".truth.json").read_text())
    data["path"] = Path(data["path"])
    data["tracks"] = [TrackTruth(**{**t, "face_px": tuple(t["face_px"])}) for t in data["tracks"]]
    return SynthClip(**data)


@pytest.fixture(scope="module")
def setup(shared_faces):
    """(exported models folder, LFW10 gallery, LFW clip) for the pipeline and petal-run tests."""
    from conftest import require_models

    require_models()
    models = exported_models()
    return models, lfw_gallery(models), lfw_clip()


def run(*args) -> Invoked:
    """petal-run in-process, as its console script runs."""
    from petal_runtime.cli import run_cli

    return invoke(run_cli, args)
