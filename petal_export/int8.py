"""ONNX Runtime static INT8 quantisation (QDQ) calibrated on real aligned faces.

Calibration set: the real faces from the calibration folder plus one seeded degraded copy of each
(the runtime sees low-quality crops, so activation ranges must cover them), with alphas spread
evenly over [0, 1] so every mix of the twin adapters lies inside the observed ranges.

Quantised: Conv, Gemm and MatMul (weights per channel, activations per tensor, MinMax ranges).
The adapters' per-sample mix (Mul/Add with alpha), the normalisations and the final L2
normalisation stay in float; ONNX Runtime fuses the QDQ pairs into integer kernels on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from petal_runtime.contract import ALPHA_INPUT, IMAGE_INPUT
from petal_runtime.errors import PetalError

OP_TYPES = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCH = 8
DEFAULT_CALIBRATION_IMAGES = 32


def calibration_feeds(faces: np.ndarray, with_alpha: bool, batch: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
    """Batches of calibration inputs (faces already include any degraded copies)."""
    n = len(faces)
    alphas = np.linspace(0.0, 1.0, n, dtype=np.float32).reshape(n, 1)
    # Interleave so each batch holds a spread of alphas.
    alphas = alphas[np.argsort(np.arange(n) % max(1, n // batch), kind="stable")]
    feeds = []
    for start in range(0, n, batch):
        feed = {IMAGE_INPUT: np.ascontiguousarray(faces[start:start + batch], np.float32)}
        if with_alpha:
            feed[ALPHA_INPUT] = np.ascontiguousarray(alphas[start:start + batch])
        feeds.append(feed)
    return feeds


def _reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class FaceCalibrationReader(CalibrationDataReader):
        """Hands ONNX Runtime's calibrator one batch of real faces (and alphas) at a time."""

        def __init__(self) -> None:
            self._batches = iter(feeds)

        def get_next(self):
            return next(self._batches, None)

    return FaceCalibrationReader()


def quantize_int8(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Quantise the FP32 graph at `src` into `dst` (QDQ, static, calibrated on `feeds`).

    ONNX Runtime keeps its augmented calibration model in its own temporary folder.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise PetalError("no calibration images for INT8")
    quantize_static(str(src), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(OP_TYPES),
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


__all__ = ["CALIBRATION_BATCH", "DEFAULT_CALIBRATION_IMAGES", "OP_TYPES", "calibration_feeds", "quantize_int8"]
