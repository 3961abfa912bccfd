"""Seeded low-resolution degradation: the one implementation used for training augmentation,
for building benchmark probes, for the IQA network's targets and for synthetic test videos.

Downscale-and-back to a target face size is the main degradation; blur, sensor noise and JPEG
follow as in surveillance footage. numpy + OpenCV only (no torch), so runtime tests can use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC)


@dataclass(frozen=True)
class DegradeConfig:
    min_face: int = 8
    max_face: int = 48
    p_gaussian_blur: float = 0.4
    max_blur_sigma: float = 1.5
    p_motion_blur: float = 0.25
    max_motion_len: int = 7
    p_noise: float = 0.5
    max_noise_sigma: float = 12.0
    p_jpeg: float = 0.6
    min_jpeg_quality: int = 20


@dataclass(frozen=True)
class Degradation:
    """What was done to one image; `severity` in [0, 1] is what the IQA network learns (1 - q)."""

    face_px: int
    blur_sigma: float = 0.0
    motion_len: int = 0
    noise_sigma: float = 0.0
    jpeg_quality: int = 100

    def severity(self, config: DegradeConfig = DegradeConfig()) -> float:
        size = (config.max_face - min(max(self.face_px, config.min_face), config.max_face)) / (
            config.max_face - config.min_face)
        blur = min(1.0, self.blur_sigma / config.max_blur_sigma + self.motion_len / (2 * config.max_motion_len))
        noise = self.noise_sigma / config.max_noise_sigma
        jpeg = (100 - self.jpeg_quality) / (100 - config.min_jpeg_quality)
        return float(np.clip(0.65 * size + 0.15 * blur + 0.1 * noise + 0.1 * jpeg, 0.0, 1.0))


def sample_degradation(rng: np.random.Generator, config: DegradeConfig = DegradeConfig(),
                       face_px: int | None = None) -> Degradation:
    face = int(face_px if face_px is not None else rng.integers(config.min_face, config.max_face + 1))
    blur = float(rng.uniform(0.3, config.max_blur_sigma)) if rng.random() < config.p_gaussian_blur else 0.0
    motion = int(rng.integers(3, config.max_motion_len + 1)) if rng.random() < config.p_motion_blur else 0
    noise = float(rng.uniform(1.0, config.max_noise_sigma)) if rng.random() < config.p_noise else 0.0
    jpeg = int(rng.integers(config.min_jpeg_quality, 95)) if rng.random() < config.p_jpeg else 100
    return Degradation(face, blur, motion, noise, jpeg)


def apply_degradation(image: np.ndarray, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    """Degrade a uint8 face crop (any channel order; H x W x C) and return it at its original size."""
    height, width = image.shape[:2]
    out = image
    if d.blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), d.blur_sigma)
    if d.motion_len > 0:
        out = cv2.filter2D(out, -1, _motion_kernel(d.motion_len, float(rng.uniform(0, 180))))
    scale = d.face_px / max(height, width)
    if scale < 1:
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = cv2.resize(out, small, interpolation=INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))])
    if d.noise_sigma > 0:
        out = np.clip(out.astype(np.float32) + rng.normal(0, d.noise_sigma, out.shape), 0, 255).astype(np.uint8)
    if d.jpeg_quality < 100:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, d.jpeg_quality])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(out.shape) if ok else out
    if out.shape[:2] != (height, width):
        out = cv2.resize(out, (width, height), interpolation=INTERPOLATIONS[1 + rng.integers(3)])
    return np.ascontiguousarray(out)


def degrade(image: np.ndarray, rng: np.random.Generator, config: DegradeConfig = DegradeConfig(),
            face_px: int | None = None) -> tuple[np.ndarray, Degradation]:
    """Sample a degradation and apply it; `face_px` pins the target face size."""
    d = sample_degradation(rng, config, face_px)
    return apply_degradation(image, d, rng), d


def downscale_probe(image: np.ndarray, face_px: int, rng: np.random.Generator) -> np.ndarray:
    """A benchmark probe: downscale-and-back to `face_px` with mild noise and JPEG, seeded."""
    d = Degradation(face_px, noise_sigma=float(rng.uniform(1, 4)), jpeg_quality=int(rng.integers(60, 90)))
    return apply_degradation(image, d, rng)


def _motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    return kernel / max(kernel.sum(), 1e-6)
