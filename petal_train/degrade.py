"""Seeded low-quality degradation: the one implementation used for training augmentation, for
building benchmark probes, for the IQA network's targets and for synthetic test videos.

A face is degraded the way a surveillance camera sees it, in physical order:

    optics at full size   turbulence (smooth random warps), Gaussian blur, defocus (disk), motion
                          blur along a random direction
    sensor at face size   downsample (nearest/linear/area/cubic/lanczos), low light and gamma,
                          sensor noise (shot + read), grayscale, interlacing
    encoder               JPEG or low-bitrate H.264 (real libx264 through PyAV)
    back to 112 px        with the interpolation an aligner uses (linear, cubic or area)

Each family is a function (image, severity in [0, 1], rng) -> image in `FAMILIES`; `sample_degradation`
composes a random subset per face with severities from none to heavy, and `DegradeConfig.exclude`
leaves families out (the benchmark's leave-one-family-out rows). numpy + OpenCV (+ PyAV for the
video family) only, no torch, so runtime tests can use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

DOWN_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                       "cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}
UP_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}

Family = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
OPTICAL: dict[str, Family] = {}  # applied at full size, before the downsample
SENSOR: dict[str, Family] = {}  # applied at the face size, after it
ENCODER: dict[str, Family] = {}  # the last step at the face size


def _family(stage: dict[str, Family]):
    def register(fn: Family) -> Family:
        stage[fn.__name__.lstrip("_")] = fn
        return fn

    return register


@dataclass(frozen=True)
class DegradeConfig:
    min_face: int = 8
    max_face: int = 48
    p_family: float = 0.3  # each family's chance to join a face's degradation
    p_gray: float = 0.1
    exclude: tuple[str, ...] = ()  # families never drawn (leave-one-family-out training)
    # Chance that a face is only resized (no family): a third party's clean downsample. With nine
    # families at p_family 0.3 the composition alone leaves only 4 % of faces that plain.
    p_plain: float = 0.0


@dataclass(frozen=True)
class Degradation:
    """What was done to one image; `severity` in [0, 1] is what the IQA network learns (1 - q)."""

    face_px: int
    families: dict[str, float] = field(default_factory=dict)  # family -> severity in (0, 1]
    down: str = "area"
    up: str = "linear"
    gray: bool = False

    def severity(self, config: DegradeConfig = DegradeConfig()) -> float:
        size = (config.max_face - min(max(self.face_px, config.min_face), config.max_face)) / (
            config.max_face - config.min_face)
        others = 1.0 - np.prod([1.0 - s for s in self.families.values()]) if self.families else 0.0
        return float(np.clip(0.65 * size + 0.35 * others + 0.02 * self.gray, 0.0, 1.0))


# ---------------------------------------------------------------- optical families (112 px)


@_family(OPTICAL)
def _turbulence(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric turbulence: a smooth random displacement field (tilt) plus slight blur."""
    h, w = image.shape[:2]
    amplitude = 0.8 + 3.2 * s
    fields = []
    for _ in range(2):
        noise = rng.standard_normal((h, w)).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(5, 10)))
        fields.append(smooth / (np.abs(smooth).max() + 1e-6) * amplitude)
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    warped = cv2.remap(image, grid_x + fields[0], grid_y + fields[1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    return cv2.GaussianBlur(warped, (0, 0), 0.3 + 1.2 * s)


@_family(OPTICAL)
def _blur(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (a soft lens or a scaler's filter): sigma up to 2.5 px at 112 px."""
    return cv2.GaussianBlur(image, (0, 0), max(0.05, 2.5 * s))


@_family(OPTICAL)
def _defocus(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    radius = 1.0 + 4.0 * s
    size = 2 * int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[:size, :size] - size // 2
    kernel = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    kernel = cv2.GaussianBlur(kernel, (0, 0), 0.5)
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


@_family(OPTICAL)
def _motion(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    length = int(round(3 + 12 * s))
    return cv2.filter2D(image, -1, _motion_kernel(length, float(rng.uniform(0, 180))),
                        borderType=cv2.BORDER_REFLECT)


# ---------------------------------------------------------------- sensor families (face size)


@_family(SENSOR)
def _lowlight(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Dark exposure with a gamma, noise and 8-bit quantisation, then the camera's gain back up."""
    gain = 1.0 - 0.85 * s
    gamma = float(rng.uniform(1.0, 1.0 + 1.2 * s)) if rng.random() < 0.5 else float(rng.uniform(1 / (1 + s), 1.0))
    dark = np.power(image.astype(np.float32) / 255.0, gamma) * gain * 255.0
    dark += rng.normal(0.0, 1.0 + 3.0 * s, dark.shape)
    dark = np.clip(np.round(dark), 0, 255)
    restore = float(rng.uniform(1.0, 1.0 / gain))
    return np.clip(dark * restore, 0, 255).astype(np.uint8)


@_family(SENSOR)
def _noise(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson-Gaussian sensor noise (shot noise grows with the signal), sometimes per channel."""
    x = image.astype(np.float32)
    shot = 0.6 * s * np.sqrt(np.maximum(x, 0.0))
    read = 1.0 + 12.0 * s
    shape = x.shape if rng.random() < 0.5 else x.shape[:2] + (1,) * (x.ndim - 2)
    noisy = x + rng.standard_normal(x.shape).astype(np.float32) * shot + rng.normal(0, read, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@_family(SENSOR)
def _interlace(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Two fields taken at different moments: odd rows shifted sideways (combing)."""
    out = image.copy()
    shift = max(1, int(round((0.5 + 4.0 * s) * image.shape[1] / 48)))
    out[1::2] = np.roll(image, int(rng.choice([-shift, shift])), axis=1)[1::2]
    return out


# ---------------------------------------------------------------- encoder families (face size)


@_family(ENCODER)
def _jpeg(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    quality = int(round(90 - 80 * s))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(image.shape) if ok else image


@_family(ENCODER)
def _video(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Low-bitrate H.264: the face coded by libx264 at a high quantiser (4:2:0 chroma included)."""
    import av

    h, w = image.shape[:2]
    pad_h, pad_w = -h % 16, -w % 16  # whole macroblocks; the padding is cut off again
    padded = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = padded.shape[1], padded.shape[0], "yuv420p"
    codec.options = {"qp": str(int(round(26 + 22 * s))), "preset": "ultrafast", "tune": "zerolatency"}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
    packets = list(codec.encode(frame)) + list(codec.encode(None))
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for p in packets for f in decoder.decode(p)] + list(decoder.decode(None))
    if not decoded:
        return image
    return np.ascontiguousarray(decoded[-1].to_ndarray(format="rgb24")[:h, :w])


FAMILIES: dict[str, Family] = {**OPTICAL, **SENSOR, **ENCODER}


# ---------------------------------------------------------------- composition


def sample_degradation(rng: np.random.Generator, config: DegradeConfig = DegradeConfig(),
                       face_px: int | None = None) -> Degradation:
    """A random composition: a face size, each allowed family with probability p_family."""
    face = int(face_px if face_px is not None else rng.integers(config.min_face, config.max_face + 1))
    families = {}
    for name in FAMILIES:
        if rng.random() < config.p_family and name not in config.exclude:
            families[name] = float(rng.uniform(0.05, 1.0))
    # Drawn only when asked for, so the default composition (the benchmark's probes) keeps its stream.
    if config.p_plain > 0 and rng.random() < config.p_plain:
        families = {}
    if "jpeg" in families and "video" in families:  # one encoder per face
        del families["jpeg" if rng.random() < 0.5 else "video"]
    down = str(rng.choice(list(DOWN_INTERPOLATIONS)))
    up = str(rng.choice(list(UP_INTERPOLATIONS), p=[0.6, 0.3, 0.1]))
    gray = bool(rng.random() < config.p_gray) and "grayscale" not in config.exclude
    return Degradation(face, families, down, up, gray)


def apply_degradation(image: np.ndarray, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    """Degrade a uint8 face crop (RGB; H x W x C) and return it at its original size."""
    height, width = image.shape[:2]
    out = np.ascontiguousarray(image)
    for name, fn in OPTICAL.items():
        if name in d.families:
            out = fn(out, d.families[name], rng)
    scale = d.face_px / max(height, width)
    if scale < 1:
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        out = cv2.resize(out, small, interpolation=DOWN_INTERPOLATIONS[d.down])
    if d.gray and out.ndim == 3:
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    for stage in (SENSOR, ENCODER):
        for name, fn in stage.items():
            if name in d.families:
                out = fn(np.ascontiguousarray(out), d.families[name], rng)
    if out.shape[:2] != (height, width):
        out = cv2.resize(out, (width, height), interpolation=UP_INTERPOLATIONS[d.up])
    return np.ascontiguousarray(out)


def degrade(image: np.ndarray, rng: np.random.Generator, config: DegradeConfig = DegradeConfig(),
            face_px: int | None = None) -> tuple[np.ndarray, Degradation]:
    """Sample a degradation and apply it; `face_px` pins the target face size."""
    d = sample_degradation(rng, config, face_px)
    return apply_degradation(image, d, rng), d


def family_probe(image: np.ndarray, family: str, face_px: int, rng: np.random.Generator) -> np.ndarray:
    """A benchmark probe of one family at one face size.

    `downsample-<interp>`: a clean downsample with that interpolation, brought back with cubic (as a
    third party's low-resolution set is made); `grayscale`: the same with area, in grey; any family of
    FAMILIES: that family alone at a severity in [0.4, 0.9], downsampled with area, back with linear.
    """
    if family.startswith("downsample-"):
        d = Degradation(face_px, {}, family.split("-", 1)[1], "cubic")
    elif family == "grayscale":
        d = Degradation(face_px, {}, "area", "cubic", gray=True)
    elif family in FAMILIES:
        d = Degradation(face_px, {family: float(rng.uniform(0.4, 0.9))}, "area", "linear")
    else:
        raise ValueError(f"unknown degradation family {family!r}")
    return apply_degradation(image, d, rng)


def downscale_probe(image: np.ndarray, face_px: int, rng: np.random.Generator) -> np.ndarray:
    """A benchmark probe: downscale-and-back to `face_px` with mild noise and JPEG, seeded."""
    d = Degradation(face_px, {"noise": float(rng.uniform(0.0, 0.2)), "jpeg": float(rng.uniform(0.0, 0.4))})
    return apply_degradation(image, d, rng)


def _motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    return kernel / max(kernel.sum(), 1e-6)
