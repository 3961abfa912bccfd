"""petal-export: PETAL checkpoints -> the runtime's verified ONNX graphs, FP16/INT8 variants, TensorRT engines.

    from petal_export import export_models
    manifest = export_models("default", "exported/", fp16=True)

The contract the files follow is petal_runtime.contract; the formats are petal_export.formats.
Attributes are imported lazily so `petal_export.formats` stays light (no torch, no onnx).
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "export_models": "export", "run_export": "export", "ExportResult": "export", "DEFAULT_CHECKPOINT_NAME": "export",
    "FORMATS": "formats", "ExportFormat": "formats", "selected_formats": "formats", "validate_options": "formats",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
