"""TensorRT 10 engines from the exported FP32 ONNX graphs (import-guarded: nothing here needs TensorRT
until an engine is built).

Per engine: the real ONNX parser builds the network; the builder config gets the FP16 flag (and
INT8 for trt-int8), OBEY_PRECISION_CONSTRAINTS with the FP32 islands (normalisation layers,
softmax, and the final L2 normalisation, as in petal_export.fp16) pinned to FP32, a workspace
limit, one optimisation profile with a (min, opt, max) shape for every named input (`image` and,
for the recognizer, `alpha`), and a timing cache that is read before and saved after each build
(kept per GPU and TensorRT version under ~/.cache/petal/trt). INT8 engines are calibrated by an
IInt8EntropyCalibrator2 on real aligned faces, through a calibration profile whose shapes equal the
calibration batch, with the calibration cache kept in the calibration folder.

The serialised engine is written behind the PETAL engine header (petal_runtime.backends.trt.loader:
TensorRT version, GPU name, compute capability, plus precision, graph, profile and the ONNX file's
sha256), so the runtime refuses an engine built elsewhere with a clear message. Device memory for
calibration and verification goes through the runtime's DeviceMemory (pycuda or cuda-python).

Nothing here has run on a GPU in this repository's CI: tests drive the control flow through a fake
`tensorrt` module.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from petal_runtime.contract import ALPHA_INPUT, IMAGE_INPUT
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_write_bytes

WORKSPACE_BYTES = 1 << 30
DEFAULT_BATCH = (1, 8, 32)
CALIBRATION_BATCH = 8

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def engines_unavailable() -> str | None:
    """None where engines can be built here; else why not (no TensorRT, or no usable CUDA GPU)."""
    from petal_runtime.backends.trt import probe_gpu

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt; its libraries come from NVIDIA's package index)"
    except OSError as exc:
        return f"TensorRT's libraries could not be loaded ({exc})"
    device, why = probe_gpu()
    return None if device is not None else f"no usable CUDA GPU ({why})"


def check_batch(batch: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(batch) != 3 or not all(isinstance(b, int) for b in batch):
        raise PetalError(f"batch must be three integers MIN:OPT:MAX, got {batch}")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise PetalError(f"batch {lo}:{opt}:{hi} must satisfy 1 <= MIN <= OPT <= MAX")
    return batch


def recognizer_profile(batch: tuple[int, int, int], input_size: int) -> ProfileShapes:
    lo, opt, hi = check_batch(batch)
    image = lambda n: (n, 3, input_size, input_size)  # noqa: E731
    return {IMAGE_INPUT: (image(lo), image(opt), image(hi)), ALPHA_INPUT: ((lo, 1), (opt, 1), (hi, 1))}


def iqa_profile(batch: tuple[int, int, int], input_size: int) -> ProfileShapes:
    """Any crop from half to twice the face size (the graph itself takes any size)."""
    lo, opt, hi = check_batch(batch)
    small, large = min(input_size, max(16, input_size // 2)), input_size * 2
    return {IMAGE_INPUT: ((lo, 3, small, small), (opt, 3, input_size, input_size), (hi, 3, large, large))}


def timing_cache_path(tensorrt_version: str, device) -> Path:
    from petal_runtime.model_store import cache_dir

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.name).strip("-").lower() or "gpu"
    return cache_dir().parent / "trt" / f"timing-{gpu}-sm{device.compute_capability}-trt{tensorrt_version}.cache"


def calibration_cache_path(folder: Path, graph: str, onnx_sha256: str) -> Path:
    """Keyed by the graph's sha256, so a changed model never reuses stale scales."""
    return Path(folder) / f"{graph}-{onnx_sha256[:12]}.trt-int8.cache"


@dataclass
class EngineRequest:
    graph: str  # "recognizer" or "iqa"
    onnx_path: Path
    onnx_sha256: str
    precision: str  # "fp16" or "int8"
    profile: ProfileShapes
    fp32_layers: frozenset[str] = frozenset()  # ONNX node names to keep in FP32
    calibration: list[dict[str, np.ndarray]] | None = None  # int8: batches of real faces
    calibration_cache: Path | None = None
    extra: dict | None = None  # more header fields


def _import():
    from petal_runtime.backends.trt import import_tensorrt

    return import_tensorrt()


def make_entropy_calibrator(trt, batches: list[dict[str, np.ndarray]], cache_path: Path | None, memory):
    """An IInt8EntropyCalibrator2 feeding `batches` (all of one batch size) through device buffers."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._size = len(next(iter(batches[0].values())))
            self._stream = memory.stream()
            self._buffers = {name: memory.allocate(array.nbytes) for name, array in batches[0].items()}
            self.cache_path = cache_path
            self.batches_fed = 0

        def get_batch_size(self) -> int:
            return self._size

        def get_batch(self, names, *_) -> list[int] | None:
            feed = next(self._batches, None)
            if feed is None:
                return None
            for name in names:
                memory.copy_in(self._buffers[name], np.ascontiguousarray(feed[name], np.float32), self._stream)
            self._stream.synchronize()
            self.batches_fed += 1
            return [int(self._buffers[name].ptr) for name in names]

        def read_calibration_cache(self):
            if self.cache_path is not None and self.cache_path.is_file():
                return self.cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache) -> None:
            if self.cache_path is not None:
                atomic_write_bytes(self.cache_path, bytes(memoryview(cache)))

        def release(self) -> None:
            for buffer in self._buffers.values():
                memory.free(buffer)
            self._buffers = {}

    return EntropyCalibrator()


def _pin_fp32(trt, network, names: frozenset[str]) -> int:
    """Pin normalisation/softmax layers and the given ONNX nodes' layers to FP32; returns how many."""
    kinds = {getattr(trt.LayerType, k) for k in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, k)}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        from_node = any(layer.name == n or layer.name.startswith(n + "_") or layer.name.startswith(n + " ")
                        for n in names)
        if layer.type not in kinds and not from_node:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(o.dtype not in floats for o in outputs):
            continue  # shape and index layers keep their types
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
    return pinned


def build_engine(request: EngineRequest, target: Path, memory, log: Callable[[str], None] = print) -> dict:
    """Build, serialise and write one engine (header + plan) to `target`; returns the header fields."""
    from petal_runtime.backends.trt.loader import EngineHeader

    trt = _import()
    device = memory.device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PetalError(f"TensorRT's ONNX parser rejected {request.graph}: {errors[0] if errors else 'no detail'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.set_flag(trt.BuilderFlag.FP16)
    if request.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    pinned = _pin_fp32(trt, network, request.fp32_layers)
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in request.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = timing_cache_path(trt.__version__, device)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, False)

    batches = []
    if request.precision == "int8":
        batches = [b for b in (request.calibration or []) if len(b[IMAGE_INPUT]) == CALIBRATION_BATCH]
        if not batches:
            raise PetalError(f"INT8 calibration needs at least {CALIBRATION_BATCH} calibration faces")
        # TensorRT calibrates at the calibration profile's opt shapes: make them the batch's shapes.
        calibration_profile = builder.create_optimization_profile()
        for name, array in batches[0].items():
            shape = tuple(array.shape)
            calibration_profile.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calibration_profile)

    with memory.activate():  # device buffers and the build need the GPU's context current
        calibrator = None
        if batches:
            calibrator = make_entropy_calibrator(trt, batches, request.calibration_cache, memory)
            config.int8_calibrator = calibrator
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.release()
    if serialized is None:
        raise PetalError(f"TensorRT could not build the {request.precision} {request.graph} engine (see its log above)")
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    extra = {"precision": request.precision, "graph": request.graph, "onnx_sha256": request.onnx_sha256,
             "profile": {name: [list(s) for s in shapes] for name, shapes in request.profile.items()},
             "fp32_layers": pinned, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             **(request.extra or {})}
    header = EngineHeader.for_device(trt.__version__, device, **extra)
    with open(target, "wb") as handle:
        handle.write(header.to_bytes())
        handle.write(memoryview(serialized))
    log(f"  {request.graph} {request.precision} engine: TensorRT {trt.__version__} on {device.name} "
        f"(sm {device.compute_capability}), {pinned} layers pinned to FP32, timing cache {cache_path}")
    return {"tensorrt_version": trt.__version__, "gpu": device.name,
            "compute_capability": device.compute_capability, **extra}


__all__ = ["CALIBRATION_BATCH", "DEFAULT_BATCH", "EngineRequest", "build_engine", "calibration_cache_path",
           "check_batch", "engines_unavailable", "iqa_profile", "make_entropy_calibrator", "recognizer_profile",
           "timing_cache_path"]
