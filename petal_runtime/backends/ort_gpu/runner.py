"""The ONNX Runtime runner, saying which GPU provider the session really got."""
from __future__ import annotations

from ..onnxrt.runner import OnnxrtRunner
from .loader import SessionOnGpu


class OrtGpuRunner(OnnxrtRunner):
    def __init__(self, loader: SessionOnGpu, name: str | None = None) -> None:
        super().__init__(loader, name or f"onnxruntime-gpu:{loader.path.name}")

    def description(self) -> str:
        if self.session is None:
            return "onnxruntime-gpu (?)"
        where = self.providers()[0].replace("ExecutionProvider", "")
        if self.loader.fallback:
            return f"onnxruntime-gpu ({where}; {self.loader.fallback})"
        return f"onnxruntime-gpu ({where})"
