"""The contract between exporter and runtime, defined once.

`petal_export` imports everything here; `petal_runtime` trusts any graph whose metadata carries
the same CONTRACT_VERSION. Both graphs take raw RGB pixels (float32, 0..255, NCHW); normalisation
sits inside the graph so a device saves one pass over the image, and the recognizer's output is
already L2-normalised.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

CONTRACT_VERSION = "1"

# Graph interface.
IMAGE_INPUT = "image"  # float32 [N, 3, H, W], RGB, 0..255
ALPHA_INPUT = "alpha"  # float32 [N, 1], per-sample adapter mix
EMBEDDING_OUTPUT = "embedding"  # float32 [N, D], L2-normalised
QUALITY_OUTPUT = "quality"  # float32 [N, 1]
IMAGE_LAYOUT = "NCHW"
COLOR_ORDER = "RGB"
PIXEL_RANGE = (0.0, 255.0)
FACE_SIZE = 112

RECOGNIZER_FILE = "recognizer.onnx"
IQA_FILE = "iqa.onnx"
MANIFEST_FILE = "manifest.json"
METADATA_PREFIX = "petal."

# The quality network sees pixels scaled to [-1, 1], as in PETALface.
IQA_MEAN = 127.5
IQA_STD = 127.5

# Alpha is clipped to [0, 1] by default so the two adapters always mix convexly; the paper's
# formula alone can leave that range when q is far from t.
ALPHA_CLIP_DEFAULT = True

T = TypeVar("T")


def alpha_from_quality(quality: T, threshold: float, clip: bool = ALPHA_CLIP_DEFAULT) -> T:
    """PETALface's gate: alpha = 0.5 + (q - t); numpy arrays, torch tensors and floats alike."""
    alpha = 0.5 + (quality - threshold)  # type: ignore[operator]
    if not clip:
        return alpha
    if isinstance(alpha, (float, int)):
        return float(min(1.0, max(0.0, alpha)))  # type: ignore[return-value]
    return alpha.clip(0.0, 1.0)  # numpy and torch both spell it .clip


def to_model_input(faces_rgb_hwc: np.ndarray) -> np.ndarray:
    """uint8 RGB faces [N, H, W, 3] -> the graphs' `image` input, float32 [N, 3, H, W] in 0..255."""
    faces = np.asarray(faces_rgb_hwc)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"expected RGB faces [N, H, W, 3], got shape {faces.shape}")
    return np.ascontiguousarray(faces.transpose(0, 3, 1, 2), dtype=np.float32)


@dataclass
class Manifest:
    """What an export promises the runtime. Stored as manifest.json and in each graph's metadata."""

    backbone: str
    embedding_size: int
    norm_mean: float
    norm_std: float
    iqa_threshold: float
    alpha_clip: bool = ALPHA_CLIP_DEFAULT
    face_size: int = FACE_SIZE
    base_sha256: str = ""
    checkpoint_sha256: str = ""
    iqa_sha256: str = ""
    opset: int = 17
    precision: str = "fp32"
    contract_version: str = CONTRACT_VERSION
    image_input: str = IMAGE_INPUT
    alpha_input: str = ALPHA_INPUT
    embedding_output: str = EMBEDDING_OUTPUT
    quality_output: str = QUALITY_OUTPUT
    image_layout: str = IMAGE_LAYOUT
    color_order: str = COLOR_ORDER
    pixel_range: list[float] = field(default_factory=lambda: list(PIXEL_RANGE))
    iqa_mean: float = IQA_MEAN
    iqa_std: float = IQA_STD
    library_versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def alpha(self, quality: T) -> T:
        return alpha_from_quality(quality, self.iqa_threshold, self.alpha_clip)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_metadata(self) -> dict[str, str]:
        """Flat string map for ONNX metadata_props (every value JSON-encoded)."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(self).items() if k != "files"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> "Manifest":
        """A manifest from decoded JSON; wrong shapes and types are one PetalError naming `source`."""
        from .errors import PetalError
        from .schema import from_json, kind_of

        if not isinstance(data, dict):
            raise PetalError(f"{source} is not a valid manifest: expected a JSON object, found {kind_of(data)}")
        version = str(data.get("contract_version", ""))
        if version != CONTRACT_VERSION:
            raise PetalError(
                f"models use contract version {version or '?'}, this runtime speaks {CONTRACT_VERSION}; "
                "re-export them with this version of petal-export"
            )
        manifest = from_json(cls, data, source)
        for name in ("embedding_size", "face_size"):
            if getattr(manifest, name) < 1:
                raise PetalError(f"{source}: {name} should be a positive integer, found {getattr(manifest, name)}")
        if manifest.norm_std == 0 or manifest.iqa_std == 0 or len(manifest.pixel_range) != 2:
            raise PetalError(f"{source} is not a valid manifest (a zero std or a pixel range of "
                             f"{len(manifest.pixel_range)} numbers)")
        return manifest

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model metadata") -> "Manifest":
        from .errors import PetalError

        try:
            data = {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(METADATA_PREFIX)}
        except (ValueError, TypeError) as exc:
            raise PetalError(f"{source} holds damaged petal.* metadata ({exc})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        from .files import read_json

        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        missing = f"no {MANIFEST_FILE} at {path}: point --models at a petal-export output folder"
        return cls.from_dict(read_json(path, missing, f"{path} is not a valid manifest ({{error}})"), str(path))
