"""Image files and face photographs: which suffixes are images, reading them, and aligning their
largest face. One copy for the runtime, the exporter and training, so a gallery photo and a training
photo are read and aligned the same way."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .align import align_face
from .contract import FACE_SIZE

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff"})


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes | np.ndarray) -> np.ndarray | None:
    """Encoded image bytes -> BGR uint8 [H, W, 3]; None if they do not decode."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    return cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None


def read_image(path: str | Path) -> np.ndarray | None:
    """An image file as BGR uint8; None if it cannot be decoded (any path: np.fromfile, not cv2.imread)."""
    return decode_image(np.fromfile(str(path), dtype=np.uint8))


def _to_rgb(bgr: np.ndarray | None) -> np.ndarray | None:
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_rgb(path: str | Path) -> np.ndarray | None:
    """An image file as RGB uint8; None if it cannot be decoded."""
    return _to_rgb(read_image(path))


def decode_rgb(data: bytes) -> np.ndarray | None:
    """Encoded image bytes as RGB uint8; None if they do not decode."""
    return _to_rgb(decode_image(data))


def detection_scale(longest: int) -> float:
    """Photographs come in every size: bring the longer side into YuNet's 320-640 px."""
    return 320.0 / longest if longest < 320 else min(1.0, 640.0 / longest)


class FaceAligner:
    """Largest face of a photograph, aligned to 112x112 RGB; 112x112 inputs are taken as aligned.

    Call it with a BGR image (as read_image gives), or use from_rgb for an RGB one: the crop is the same."""

    def __init__(self, detector=None) -> None:
        from .detect import FaceDetector

        self.detector = detector or FaceDetector(score_threshold=0.5)

    def __call__(self, bgr: np.ndarray) -> np.ndarray | None:
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        return self._align(bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def from_rgb(self, rgb: np.ndarray) -> np.ndarray | None:
        if rgb.ndim == 2:
            rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
        return self._align(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), rgb)

    def _align(self, bgr: np.ndarray, rgb: np.ndarray) -> np.ndarray | None:
        from .detect import largest

        if bgr.shape[:2] == (FACE_SIZE, FACE_SIZE):
            return rgb
        self.detector.scale = detection_scale(max(bgr.shape[:2]))
        face = largest(self.detector.detect(bgr))
        return None if face is None else align_face(rgb, face.landmarks)
