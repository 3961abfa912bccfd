"""ONNX Runtime backend: CPU everywhere, CUDA where onnxruntime-gpu is installed and works."""
from __future__ import annotations

from pathlib import Path

from ..base import BackendSpec
from .loader import SessionFromOnnx, available_providers, default_providers
from .runner import OnnxrtRunner


def graph_path(models_dir: Path, graph: str) -> Path:
    return Path(models_dir) / f"{graph}.onnx"


def _unusable(models_dir: Path, graph: str) -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    path = graph_path(models_dir, graph)
    return None if path.is_file() else f"{path} not found"


def create(models_dir: Path, graph: str, providers=None, threads: int | None = None, **_) -> OnnxrtRunner:
    return OnnxrtRunner(SessionFromOnnx(graph_path(models_dir, graph), providers, intra_op_threads=threads))


BACKEND = BackendSpec("onnxruntime", priority=10, unusable=_unusable, create=create,
                      summary="ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)", aliases=("onnxrt", "ort"))

__all__ = ["BACKEND", "OnnxrtRunner", "SessionFromOnnx", "available_providers", "default_providers"]
