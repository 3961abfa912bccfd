"""TensorRT backend: PETAL engine files (see loader.py) run through the TensorRT 10 or 11 Python API.

Nothing here imports tensorrt, pycuda or cuda-python at import time; the first use does, and a
missing library is a PetalError that says what to install.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ..base import BackendSpec
from .loader import (EngineFromFile, EngineHeader, check_engine_header, find_engine, import_tensorrt,
                     read_engine_file, read_engine_header, write_engine_file)
from .memory import DeviceInfo, get_memory, probe_gpu
from .runner import TrtRunner


def tensorrt_missing(hint: str | None = None) -> str | None:
    """None where `tensorrt` imports; else why not, with `hint` (default: the runtime's) on what to do."""
    try:
        import_tensorrt(*([hint] if hint else []))
    except Exception as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=1)
def _gpu() -> tuple[DeviceInfo | None, str]:
    return probe_gpu()


def _unusable(models_dir: Path, graph: str) -> str | None:
    if find_engine(models_dir, graph) is None:
        return f"no {graph} TensorRT engine in {models_dir} (petal-export --fp16 on a GPU machine builds them)"
    reason = tensorrt_missing()
    if reason:
        return reason
    device, why = _gpu()
    return None if device is not None else f"no usable GPU ({why})"


def create(models_dir: Path, graph: str, memory=None, engine: str | Path | None = None, precision: str | None = None,
           **_) -> TrtRunner:
    """The engine file given, else `<graph>.<precision>.engine`, else the preferred one found."""
    path = Path(engine) if engine else None
    if path is None and precision:
        named = Path(models_dir) / f"{graph}.{precision}.engine"
        path = named if named.is_file() else None
        if path is None and graph == "recognizer":
            from ...errors import PetalError

            raise PetalError(f"no {named.name} in {models_dir}")
    path = path or find_engine(models_dir, graph)
    if path is None:
        from ...errors import PetalError

        raise PetalError(f"no {graph} TensorRT engine in {models_dir}")
    return TrtRunner(EngineFromFile(path), memory=memory)


BACKEND = BackendSpec("tensorrt", priority=20, unusable=_unusable, create=create,
                      summary="TensorRT engines on an NVIDIA GPU (pycuda or cuda-python for memory)",
                      aliases=("trt",))

__all__ = ["BACKEND", "EngineFromFile", "EngineHeader", "TrtRunner", "check_engine_header", "find_engine",
           "get_memory", "probe_gpu", "read_engine_file", "read_engine_header", "write_engine_file"]
