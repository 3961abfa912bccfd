"""Annotated video: boxes, names, scores and quality drawn on frames, encoded to H.264 through PyAV.

The writer encodes to a temporary name and renames on close, also after an error or Ctrl-C, so the
frames written so far are always a playable file and a half-written one never carries the name.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .errors import PetalError
from .gallery import UNKNOWN

_PALETTE = [(86, 180, 233), (230, 159, 0), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
            (204, 121, 167), (120, 200, 120), (255, 120, 120), (160, 160, 255)]


def for_display(name: str) -> str:
    """Composed Unicode (NFC): decomposed names (macOS file names) misalign fixed-width tables and
    draw their accents as separate glyphs."""
    return unicodedata.normalize("NFC", name)


def track_color(track_id: int) -> tuple[int, int, int]:
    r, g, b = _PALETTE[track_id % len(_PALETTE)]
    return b, g, r  # BGR


def draw_faces(image: np.ndarray, faces: Sequence, frame_index: int | None = None) -> np.ndarray:
    """A copy of the BGR frame with each face's box, track, identity, score and quality."""
    out = image.copy()
    height, width = out.shape[:2]
    font_scale = max(0.35, min(0.6, height / 1200))
    thickness = 1 if height < 900 else 2
    for face in faces:
        x, y, w, h = (int(round(v)) for v in face.box)
        known = face.identity != UNKNOWN
        color = track_color(face.track_id) if known else (160, 160, 160)
        cv2.rectangle(out, (x, y), (x + w, y + h), color, thickness, cv2.LINE_AA)
        score = "" if face.score != face.score else f" {face.score:.2f}"  # NaN: not recognised yet
        label = f"#{face.track_id} {for_display(face.identity)}{score} q{face.quality:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y - 4 if y - th - base - 4 >= 0 else min(height - base - 1, y + h + th + 4)
        tx = max(0, min(x, width - tw - 2))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + base), (0, 0, 0), -1)
        cv2.putText(out, label, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, color, 1, cv2.LINE_AA)
        if face.recognized:  # a dot where the recognizer ran on this crop
            cv2.circle(out, (x + w - 3, y + 3), 2, (0, 255, 255), -1, cv2.LINE_AA)
    if frame_index is not None:
        cv2.putText(out, f"frame {frame_index}", (6, height - 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return out


class VideoWriter:
    """H.264 (libx264, yuv420p) MP4 writer; frames are BGR uint8 of one size (padded to even)."""

    def __init__(self, path: str | Path, fps: float | None, crf: int = 23) -> None:
        import av

        self.path = Path(path)
        if self.path.suffix.lower() not in (".mp4", ".mov", ".mkv"):
            raise PetalError(f"annotated video must end in .mp4, .mov or .mkv: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PetalError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp{self.path.suffix}")
        self._av = av
        self.fps = fps if fps and fps > 0 else 25.0
        self.crf = crf
        self.container = None
        self.stream = None
        self.frames = 0
        self.size: tuple[int, int] | None = None

    def _open(self, width: int, height: int) -> None:
        av = self._av
        fmt = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}[self.path.suffix.lower()]
        try:
            self.container = av.open(str(self.tmp), "w", format=fmt)
        except (av.error.FFmpegError, OSError) as exc:
            raise PetalError(f"cannot write {self.path}: {exc}") from None
        from fractions import Fraction

        rate = Fraction(self.fps).limit_denominator(1001)
        if "libx264" in av.codecs_available:
            self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": str(self.crf),
                                                                                 "preset": "veryfast"})
        else:  # pragma: no cover - PyAV wheels ship libx264
            self.stream = self.container.add_stream("mpeg4", rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.size = (width, height)

    def write(self, image: np.ndarray) -> None:
        height, width = image.shape[:2]
        even = (width + width % 2, height + height % 2)
        if self.container is None:
            self._open(*even)
        if even != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        elif (width, height) != even:
            image = cv2.copyMakeBorder(image, 0, even[1] - height, 0, even[0] - width, cv2.BORDER_REPLICATE)
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> Path | None:
        """Flush and move the file into place; None when no frame was ever written."""
        if self.container is None:
            return None
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
