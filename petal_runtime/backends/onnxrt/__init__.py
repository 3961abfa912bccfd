"""ONNX Runtime backend: CPU everywhere, CUDA where onnxruntime-gpu is installed and works."""
from __future__ import annotations

import os
from pathlib import Path

from ..base import BackendSpec
from .loader import SessionFromOnnx, available_providers, default_providers
from .runner import OnnxrtRunner


def graph_path(models_dir: Path, graph: str, precision: str | None = None) -> Path:
    """recognizer.onnx (FP32), or recognizer.<precision>.onnx as petal-export names its variants.

    The IQA graph falls back to FP32 where the export has no variant of that precision for it.
    """
    if precision in (None, "", "fp32"):
        return Path(models_dir) / f"{graph}.onnx"
    variant = Path(models_dir) / f"{graph}.{precision}.onnx"
    if graph == "iqa" and not variant.is_file():
        return Path(models_dir) / f"{graph}.onnx"
    return variant


def _unusable(models_dir: Path, graph: str) -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    path = graph_path(models_dir, graph)
    return None if path.is_file() else f"{path} not found"


def create(models_dir: Path, graph: str, providers=None, threads: int | None = None, spinning: bool | None = False,
           precision: str | None = None, **_) -> OnnxrtRunner:
    """threads: intra-op threads (None: one for the small IQA graph, every core for the recognizer)."""
    if threads is None:
        threads = 1 if graph == "iqa" else (os.cpu_count() or 1)
    return OnnxrtRunner(SessionFromOnnx(graph_path(models_dir, graph, precision), providers, intra_op_threads=threads,
                                        spinning=spinning))


BACKEND = BackendSpec("onnxruntime", priority=10, unusable=_unusable, create=create,
                      summary="ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)", aliases=("onnxrt", "ort"))

__all__ = ["BACKEND", "OnnxrtRunner", "SessionFromOnnx", "available_providers", "default_providers"]
