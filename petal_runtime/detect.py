"""YuNet face detection through cv2.FaceDetectorYN, with small-face handling."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import PetalError
from .model_store import YUNET, model_path

# YuNet finds faces down to roughly 10-12 px; smaller frames are upscaled so such faces get there.
YUNET_MIN_FACE = 12


@dataclass(frozen=True)
class Detection:
    box: np.ndarray  # x, y, w, h in frame pixels
    landmarks: np.ndarray  # [5, 2]: eyes, nose, mouth corners, image-left first
    score: float

    @property
    def size(self) -> float:
        return float(max(self.box[2], self.box[3]))


class FaceDetector:
    """Detect faces in BGR frames. `scale` < 1 detects on a downscaled frame (faster on large
    frames with large faces); `scale` > 1 upscales so faces below YuNet's minimum are found."""

    def __init__(self, model: str | Path | None = None, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, top_k: int = 50, scale: float = 1.0) -> None:
        path = Path(model) if model else model_path(YUNET)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:  # OpenCV would only say it cannot parse the file
            raise PetalError(f"cannot read the YuNet model {path} ({exc.strerror or exc})") from None
        try:
            self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, top_k)
        except cv2.error:
            raise PetalError(f"{path} is not a usable YuNet model") from None
        self.scale = float(scale)
        self._input_size: tuple[int, int] | None = None

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        if frame_bgr.ndim == 2:
            frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
        image = frame_bgr
        if self.scale != 1.0:
            interp = cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR
            image = cv2.resize(frame_bgr, None, fx=self.scale, fy=self.scale, interpolation=interp)
        height, width = image.shape[:2]
        if self._input_size != (width, height):
            self._net.setInputSize((width, height))
            self._input_size = (width, height)
        _, faces = self._net.detect(image)
        if faces is None:
            return []
        out = []
        for row in faces:
            values = row[:14] / self.scale
            out.append(Detection(values[:4].copy(), values[4:14].reshape(5, 2).copy(), float(row[14])))
        return out


def largest(detections: list[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.box[2] * d.box[3], default=None)
