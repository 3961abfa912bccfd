"""Static INT8 quantisation (QDQ) calibrated on real aligned faces, in two flavours.

- `quantize_int8` (format onnx-int8, `<graph>.int8.onnx`): for ONNX Runtime on the CPU: asymmetric
  per-tensor activations, per-channel symmetric weights.
- `quantize_int8_qdq` (format onnx-int8-qdq, `<graph>.qdq.onnx`): the explicit-quantization graph
  TensorRT builds its INT8 engines from (strongly typed, TensorRT 10 and 11): symmetric activations
  (zero point 0, what TensorRT's Q/DQ layers require), per-channel symmetric weights kept in float
  behind their own Q/DQ pair, float biases, and a dedicated Q/DQ pair per consumer so that TensorRT
  can fuse each into its convolution. ONNX Runtime runs it on the CPU too, which is how it is
  verified on a machine without a GPU.

Calibration set: the real faces from the calibration folder plus one seeded degraded copy of each
(the runtime sees low-quality crops, so activation ranges must cover them), with alphas spread
evenly over [0, 1] so every mix of the twin adapters lies inside the observed ranges.

Quantised: Conv, Gemm and MatMul (weights per channel, activations per tensor, MinMax ranges),
except the first convolution on the image, which stays in float: with its BatchNorm folded into it
(SFace's conv_1 carries no adapter) INT8 there alone took the recognizer's cosine to its FP32 graph
from 0.99 to 0.86 on real faces, for under 2 % of the multiply-adds. The adapters' per-sample mix
(Mul/Add with alpha), the normalisations and the final L2 normalisation stay in float; ONNX Runtime
fuses the QDQ pairs into integer kernels on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from petal_runtime.contract import ALPHA_INPUT, IMAGE_INPUT
from petal_runtime.errors import PetalError

OP_TYPES = ("Conv", "Gemm", "MatMul")
CALIBRATION_BATCH = 8
DEFAULT_CALIBRATION_IMAGES = 32


def calibration_feeds(faces: np.ndarray, with_alpha: bool,
                      batch: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
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


# ONNX Runtime CPU: asymmetric activations use the whole INT8 range (measured better on the CPU).
CPU_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}
# TensorRT explicit quantization: symmetric scales only (zero point 0), weights per output channel and
# kept in float behind a Q/DQ pair (accepted by every TensorRT 10.x and 11.x parser), biases in float
# (TensorRT folds them into the fused INT8 kernel), one Q/DQ pair per consumer (fusion needs DQ -> op).
TENSORRT_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                    "QuantizeBias": False, "DedicatedQDQPair": True}


def first_convolutions(model) -> list[str]:
    """Names of the Conv nodes that read the image input before any other Conv does."""
    reached, first = {IMAGE_INPUT}, []
    for node in model.graph.node:  # ONNX keeps nodes in topological order
        if not reached.intersection(node.input):
            continue
        if node.op_type == "Conv":
            first.append(node.name)
        else:
            reached.update(node.output)
    return first


def _quantize(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]], options: dict) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise PetalError("no calibration images for INT8")
    quantize_static(str(src), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(OP_TYPES),
                    nodes_to_exclude=first_convolutions(onnx.load(str(src), load_external_data=False)),
                    calibration_providers=["CPUExecutionProvider"], extra_options=dict(options))


def quantize_int8(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Quantise the FP32 graph at `src` into `dst` for ONNX Runtime's CPU (QDQ, calibrated on `feeds`).

    ONNX Runtime keeps its augmented calibration model in its own temporary folder.
    """
    _quantize(src, dst, feeds, CPU_OPTIONS)


def quantize_int8_qdq(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Quantise the FP32 graph at `src` into `dst` as TensorRT's explicit-quantization input (see above)."""
    _quantize(src, dst, feeds, TENSORRT_OPTIONS)


def qdq_violations(model) -> list[str]:
    """What in an ONNX graph TensorRT's explicit quantization would refuse: a QuantizeLinear or
    DequantizeLinear whose zero point is not all zeros or whose quantized type is not INT8."""
    from onnx import TensorProto, numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            problems.append(f"{node.name}: zero point is not a constant")
        elif zero_point.data_type != TensorProto.INT8:
            problems.append(f"{node.name}: quantized type {TensorProto.DataType.Name(zero_point.data_type)}, not INT8")
        elif np.any(numpy_helper.to_array(zero_point) != 0):
            problems.append(f"{node.name}: zero point is not 0 (asymmetric)")
    return problems


__all__ = ["CALIBRATION_BATCH", "CPU_OPTIONS", "DEFAULT_CALIBRATION_IMAGES", "OP_TYPES", "TENSORRT_OPTIONS",
           "calibration_feeds", "first_convolutions", "qdq_violations", "quantize_int8", "quantize_int8_qdq"]
