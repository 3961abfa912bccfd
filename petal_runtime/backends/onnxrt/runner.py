"""Run an ONNX Runtime session on a dict of named arrays."""
from __future__ import annotations

import numpy as np

from ..base import Runner, TensorInfo
from .loader import SessionFromOnnx

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def _info(arg) -> TensorInfo:
    shape = None if arg.shape is None else tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorInfo(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), shape)


class OnnxrtRunner(Runner):
    def __init__(self, loader: SessionFromOnnx, name: str | None = None) -> None:
        super().__init__(name or f"onnxruntime:{loader.path.name}")
        self.loader = loader
        self.session = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []

    def activate_impl(self) -> None:
        self.session = self.loader()
        self._inputs = [_info(a) for a in self.session.get_inputs()]
        self._outputs = [_info(a) for a in self.session.get_outputs()]

    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map) if self.session is not None else {}

    def description(self) -> str:
        where = self.providers()[0].replace("ExecutionProvider", "") if self.session is not None else "?"
        return f"onnxruntime ({where})"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {t.name: np.ascontiguousarray(feed[t.name], dtype=t.dtype) for t in self._inputs}
        names = [t.name for t in self._outputs]
        return dict(zip(names, self.session.run(names, typed)))

    def deactivate_impl(self) -> None:
        self.session = None
