"""ONNX Runtime on an NVIDIA GPU: TensorRT execution provider first, then CUDA, then the CPU.

A second GPU path that needs neither TensorRT's Python bindings nor engine files: onnxruntime-gpu
builds and caches the TensorRT engines itself from the exporter's own graphs, chosen by precision
(fp32: `<graph>.onnx`; fp16: `<graph>.fp16.onnx`, built strongly typed; int8: `<graph>.qdq.onnx`,
explicit quantization). Choose it with `--backend onnxruntime-gpu`; `auto` never picks it.

onnxruntime-gpu lists its GPU providers even where they cannot start (no driver, no cuDNN, no
TensorRT libraries) and then quietly runs on the CPU; the session loader compares the providers the
session got with the ones asked for, warns, and `description()` says where the model really runs.
"""
from __future__ import annotations

from pathlib import Path

from ..base import BackendSpec
from .loader import (CUDA_EP, GPU_PROVIDERS, TENSORRT_EP, gpu_graph_path, gpu_providers, missing_gpu_providers)
from .runner import OrtGpuRunner


def _unusable(models_dir: Path, graph: str) -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    reason = missing_gpu_providers()
    if reason:
        return reason
    path = gpu_graph_path(models_dir, graph)
    return None if path.is_file() else f"{path} not found"


def create(models_dir: Path, graph: str, precision: str | None = None, providers=None, batch=None,
           threads: int | None = None, **_) -> OrtGpuRunner:
    """providers: names among TensorrtExecutionProvider / CUDAExecutionProvider / CPUExecutionProvider
    (default: every GPU provider this ONNX Runtime has, then the CPU), each with PETAL's options."""
    from .loader import SessionOnGpu

    path = gpu_graph_path(models_dir, graph, precision)
    return OrtGpuRunner(SessionOnGpu(path, gpu_providers(models_dir, graph, providers, batch),
                                     intra_op_threads=threads))


BACKEND = BackendSpec("onnxruntime-gpu", priority=5, unusable=_unusable, create=create,
                      summary="ONNX Runtime's TensorRT and CUDA execution providers (onnxruntime-gpu)",
                      aliases=("ort-gpu",))

__all__ = ["BACKEND", "CUDA_EP", "GPU_PROVIDERS", "OrtGpuRunner", "TENSORRT_EP", "gpu_graph_path", "gpu_providers"]
