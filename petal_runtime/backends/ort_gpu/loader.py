"""Sessions on ONNX Runtime's GPU providers, with PETAL's provider options.

TensorRT execution provider: engines built by ONNX Runtime from the graph it is given, strongly typed
(neither trt_fp16_enable nor trt_int8_enable: the FP16 graph and the Q/DQ graph carry their types,
which is also the only mode TensorRT 11 has), one explicit optimisation profile per named input from
the manifest's face size and the batch range (as petal-export's engines), and the engine and timing
caches under ~/.cache/petal/ort-trt so that only the first session on a machine pays the build.
CUDA execution provider: device 0, ONNX Runtime's defaults otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...errors import PetalError
from ...profiles import profile_shapes
from ..onnxrt import loader as _onnxrt
from ..onnxrt.loader import CPU, CUDA, TENSORRT_EP, SessionFromOnnx

CUDA_EP = CUDA
GPU_PROVIDERS = (TENSORRT_EP, CUDA_EP)
WORKSPACE_BYTES = 1 << 30
GRAPH_SUFFIX = {None: ".onnx", "": ".onnx", "fp32": ".onnx", "fp16": ".fp16.onnx", "int8": ".qdq.onnx"}


def gpu_graph_path(models_dir: str | Path, graph: str, precision: str | None = None) -> Path:
    """The graph for `precision`: FP32, the FP16 graph, or the Q/DQ graph TensorRT quantizes
    explicitly (`<graph>.qdq.onnx`, not the CPU's `<graph>.int8.onnx`). The IQA graph falls back
    to FP32 where the export has no variant of that precision for it."""
    if precision not in GRAPH_SUFFIX:
        raise PetalError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    path = Path(models_dir) / f"{graph}{GRAPH_SUFFIX[precision]}"
    if graph == "iqa" and not path.is_file():
        return Path(models_dir) / f"{graph}.onnx"
    return path


def missing_gpu_providers() -> str | None:
    available = _onnxrt.available_providers()
    if any(p in available for p in GPU_PROVIDERS):
        return None
    return (f"ONNX Runtime here has no GPU execution provider (it has {', '.join(available)}): "
            "pip install onnxruntime-gpu, plus TensorRT's libraries for its TensorRT provider")


def cache_folder() -> Path:
    from ...model_store import cache_dir

    return cache_dir().parent / "ort-trt"


def _face_size(models_dir: str | Path) -> int:
    from ...contract import Manifest

    try:
        return int(Manifest.load(models_dir).face_size)
    except PetalError:
        return 112


def _shape_option(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in triple[which])}" for name, triple in shapes.items())


def tensorrt_options(models_dir: str | Path, graph: str, batch=None) -> dict:
    shapes = profile_shapes(graph, _face_size(models_dir), batch)
    folder = str(cache_folder())
    return {"device_id": 0, "trt_max_workspace_size": WORKSPACE_BYTES, "trt_fp16_enable": False,
            "trt_int8_enable": False, "trt_engine_cache_enable": True, "trt_engine_cache_path": folder,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": folder,
            "trt_profile_min_shapes": _shape_option(shapes, 0), "trt_profile_opt_shapes": _shape_option(shapes, 1),
            "trt_profile_max_shapes": _shape_option(shapes, 2)}


def gpu_providers(models_dir: str | Path, graph: str, names: Sequence[str] | None = None, batch=None) -> list:
    """(name, options) pairs for the session: the named providers, or every GPU provider this ONNX
    Runtime has; the CPU always last (the fallback the loader reports)."""
    chosen = list(names) if names else [p for p in GPU_PROVIDERS if p in _onnxrt.available_providers()]
    unknown = [p for p in chosen if p not in (*GPU_PROVIDERS, CPU)]
    if unknown:
        raise PetalError(f"onnxruntime-gpu runs on {', '.join(GPU_PROVIDERS)} (and {CPU}), not {', '.join(unknown)}")
    entries = []
    for name in chosen:
        if name == TENSORRT_EP:
            entries.append((name, tensorrt_options(models_dir, graph, batch)))
        elif name == CUDA_EP:
            entries.append((name, {"device_id": 0}))
    return [*entries, CPU]


class SessionOnGpu(SessionFromOnnx):
    """SessionFromOnnx with provider options; creates the TensorRT provider's cache folder first."""

    def __call__(self):
        if any(isinstance(p, tuple) and p[0] == TENSORRT_EP for p in self.providers or ()):
            cache_folder().mkdir(parents=True, exist_ok=True)
        return super().__call__()


__all__ = ["CUDA_EP", "GPU_PROVIDERS", "SessionOnGpu", "TENSORRT_EP", "cache_folder", "gpu_graph_path",
           "gpu_providers", "missing_gpu_providers", "profile_shapes", "tensorrt_options"]
