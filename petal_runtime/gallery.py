"""The gallery of known people: a structured numpy array without pickle, tied to the models that built it.

`g.npy` holds one row per identity: `name` (unicode), `embedding` (float32 [D], L2-normalised mean of
that person's image embeddings) and `count` (images averaged). It is written with
`allow_pickle=False` and read back the same way. `g.npy.json` beside it records the models'
fingerprint (sha256 of the recognizer and IQA graphs); a gallery is refused by models with another
fingerprint or embedding size, since its embeddings would not be comparable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from .align import align_face
from .contract import FACE_SIZE, to_model_input
from .errors import PetalError
from .files import atomic_path, atomic_write_text, read_json

NAME_LENGTH = 128
GALLERY_FORMAT = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff"}
UNKNOWN = "unknown"


def gallery_dtype(dim: int) -> np.dtype:
    return np.dtype([("name", f"<U{NAME_LENGTH}"), ("embedding", "<f4", (int(dim),)), ("count", "<i4")])


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Match:
    identity: str  # a gallery name, or "unknown" below the open-set threshold
    score: float  # cosine to the best gallery entry
    top_k: list[tuple[str, float]]  # best first

    def to_dict(self) -> dict:
        return {"identity": self.identity, "score": round(float(self.score), 4),
                "top_k": [{"name": n, "score": round(float(s), 4)} for n, s in self.top_k]}


@dataclass
class Gallery:
    entries: np.ndarray  # structured, gallery_dtype(D)
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    # --- construction
    @classmethod
    def empty(cls, fingerprint) -> "Gallery":
        """An empty gallery for models with this fingerprint (models.Fingerprint)."""
        meta = {"format": GALLERY_FORMAT, **fingerprint.to_dict()}
        return cls(np.zeros(0, gallery_dtype(fingerprint.embedding_size)), meta)

    @property
    def dim(self) -> int:
        return int(self.entries.dtype["embedding"].shape[0])

    @property
    def names(self) -> list[str]:
        return [str(n) for n in self.entries["name"]]

    @property
    def embeddings(self) -> np.ndarray:
        return np.asarray(self.entries["embedding"], np.float32).reshape(len(self.entries), self.dim)

    def __len__(self) -> int:
        return len(self.entries)

    # --- persistence
    @classmethod
    def load(cls, path: str | Path, fingerprint=None) -> "Gallery":
        """Read g.npy (no pickle) and its .json; check them against `fingerprint` where given."""
        path = Path(path)
        if not path.is_file():
            raise PetalError(f"gallery {path} not found (petal-gallery build makes one)")
        try:
            entries = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise PetalError(f"{path} is not a PETAL gallery (a .npy structured array without pickle): "
                             f"{str(exc).splitlines()[0][:120]}") from None
        names = entries.dtype.names or ()
        if entries.ndim != 1 or not {"name", "embedding", "count"} <= set(names):
            raise PetalError(f"{path} is not a PETAL gallery: expected fields name, embedding, count, "
                             f"found {list(names) or entries.dtype.str}")
        emb_shape = entries.dtype["embedding"].shape
        if len(emb_shape) != 1:
            raise PetalError(f"{path}: embedding field has shape {emb_shape}, expected one dimension")
        mpath = meta_path(path)
        meta = read_json(mpath, f"{mpath} is missing: without it the models {path.name} was built with are unknown; "
                                "rebuild the gallery with petal-gallery build",
                         f"{mpath} is not valid JSON; rebuild the gallery with petal-gallery build")
        gallery = cls(entries.astype(gallery_dtype(emb_shape[0])), meta, path)
        if fingerprint is not None:
            gallery.check(fingerprint)
        return gallery

    def check(self, fingerprint) -> None:
        """Refuse a gallery whose embeddings these models cannot be compared with."""
        where = str(self.path) if self.path else "the gallery"
        if self.dim != fingerprint.embedding_size:
            raise PetalError(f"{where} holds {self.dim}-d embeddings but the models produce "
                             f"{fingerprint.embedding_size}-d ones; build the gallery with these models")
        theirs = self.meta.get("models_sha256")
        if theirs != fingerprint.models_sha256:
            raise PetalError(f"{where} was built with other models (sha256 {str(theirs)[:12]}..., these are "
                             f"{fingerprint.models_sha256[:12]}...); rebuild it with petal-gallery build --models")

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path or "")
        if not path.name:
            raise PetalError("no path to save the gallery to")
        if path.suffix != ".npy":
            raise PetalError(f"gallery files end in .npy (numpy would append it): {path}")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, self.entries, allow_pickle=False)
        meta = {**self.meta, "format": GALLERY_FORMAT, "identities": len(self), "embedding_size": self.dim}
        atomic_write_text(meta_path(path), json.dumps(meta, indent=2, sort_keys=True))
        self.path = path
        return path

    # --- editing
    def add(self, name: str, embeddings: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add a person from per-image embeddings [n, D]; an existing name is merged (count-weighted)."""
        name = str(name).strip()
        if not name:
            raise PetalError("an identity needs a non-empty name")
        if len(name) > NAME_LENGTH:
            raise PetalError(f"identity name longer than {NAME_LENGTH} characters: {name[:40]}...")
        if name == UNKNOWN:
            raise PetalError(f"{UNKNOWN!r} is reserved for faces that match nobody")
        embeddings = np.asarray(embeddings, np.float32).reshape(-1, self.dim) if len(embeddings) else np.zeros((0, self.dim))
        if embeddings.shape[1] != self.dim:
            raise PetalError(f"embeddings of size {embeddings.shape[1]} do not fit a {self.dim}-d gallery")
        if len(embeddings) == 0:
            raise PetalError(f"no usable face for {name}")
        w = np.ones(len(embeddings), np.float32) if weights is None else np.asarray(weights, np.float32)
        total = (_normalise(embeddings) * w[:, None]).sum(0)
        count = len(embeddings)
        existing = np.flatnonzero(self.entries["name"] == name)
        if len(existing):
            row = self.entries[existing[0]]
            total = total / max(float(w.sum()), 1e-12) * count + row["embedding"] * row["count"]
            count += int(row["count"])
            self.entries = np.delete(self.entries, existing)
        new = np.zeros(1, self.entries.dtype)
        new["name"], new["embedding"], new["count"] = name, _normalise(total), count
        self.entries = np.concatenate([self.entries, new])
        order = np.argsort(self.entries["name"], kind="stable")
        self.entries = self.entries[order]

    def remove(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        missing = [n for n in names if n not in set(self.names)]
        if missing:
            raise PetalError(f"not in the gallery: {', '.join(missing)}")
        self.entries = self.entries[~np.isin(self.entries["name"], names)]
        return names

    # --- matching
    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine of each query [M, D] to each entry -> [M, len(gallery)]."""
        queries = _normalise(np.asarray(embeddings, np.float32).reshape(-1, self.dim))
        return queries @ self.embeddings.T

    def identify(self, embedding: np.ndarray, threshold: float, top_k: int = 5) -> Match:
        if len(self) == 0:
            return Match(UNKNOWN, float("nan"), [])
        row = self.scores(embedding)[0]
        order = np.argsort(-row)[: max(1, top_k)]
        ranked = [(str(self.entries["name"][i]), float(row[i])) for i in order]
        best_name, best = ranked[0]
        return Match(best_name if best >= threshold else UNKNOWN, best, ranked)


# ----------------------------------------------------------------------------- building from images


class ImageFaceAligner:
    """Largest face of a photograph, aligned to 112x112 RGB; 112x112 inputs are taken as aligned."""

    def __init__(self, detector=None) -> None:
        from .detect import FaceDetector

        self.detector = detector or FaceDetector(score_threshold=0.5)

    def __call__(self, bgr: np.ndarray) -> np.ndarray | None:
        from .detect import largest

        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if bgr.shape[:2] == (FACE_SIZE, FACE_SIZE):
            return rgb
        # Gallery photos come in every size: bring the longer side near 320-640 px for YuNet.
        longest = max(bgr.shape[:2])
        self.detector.scale = 320.0 / longest if longest < 320 else min(1.0, 640.0 / longest)
        face = largest(self.detector.detect(bgr))
        return None if face is None else align_face(rgb, face.landmarks)


def read_image(path: str | Path) -> np.ndarray | None:
    data = np.fromfile(str(path), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise PetalError(f"{p} not found")
    return found


def identity_folders(root: str | Path) -> dict[str, list[Path]]:
    """root/<identity>/<images>; images directly under root are an error (they name nobody)."""
    root = Path(root)
    if not root.is_dir():
        raise PetalError(f"{root} is not a folder (expected {root}/<identity>/<images>)")
    folders = {d.name: image_files([d]) for d in sorted(root.iterdir()) if d.is_dir()}
    folders = {k: v for k, v in folders.items() if v}
    if not folders:
        raise PetalError(f"{root} holds no identity folders with images (expected {root}/<identity>/<images>)")
    return folders


@dataclass
class EmbedReport:
    used: int = 0
    unreadable: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)


def embed_images(models, paths: Sequence[Path], aligner: ImageFaceAligner | None = None,
                 report: EmbedReport | None = None) -> np.ndarray:
    """Embeddings [n, D] of the faces in `paths` (IQA -> alpha -> recognizer, as for video crops)."""
    aligner = aligner or ImageFaceAligner()
    report = report if report is not None else EmbedReport()
    faces = []
    for path in paths:
        image = read_image(path)
        if image is None:
            report.unreadable.append(str(path))
            continue
        face = aligner(image)
        if face is None:
            report.no_face.append(str(path))
            continue
        faces.append(face)
    if not faces:
        return np.zeros((0, models.embedding_size), np.float32)
    report.used += len(faces)
    return models.embed_gated(to_model_input(np.stack(faces)))


def build_gallery(models, root: str | Path, progress=None) -> tuple[Gallery, EmbedReport]:
    """A gallery with one entry per identity folder under `root`."""
    gallery = Gallery.empty(models.fingerprint)
    gallery.meta["built_from"] = str(root)
    report = EmbedReport()
    aligner = ImageFaceAligner()
    folders = identity_folders(root)
    for name, paths in folders.items():
        embeddings = embed_images(models, paths, aligner, report)
        if len(embeddings):
            gallery.add(name, embeddings)
        if progress:
            progress(name, len(embeddings))
    if len(gallery) == 0:
        raise PetalError(f"no face found in any image under {root} ({len(report.no_face)} without a face, "
                         f"{len(report.unreadable)} unreadable)")
    return gallery, report
