"""ONNX Runtime sessions, created lazily from a file (after Polygraphy's SessionFromOnnx)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

from ...errors import PetalError
from ...files import first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, then the CPU; the CPU alone otherwise."""
    return [CUDA, CPU] if CUDA in available_providers() else [CPU]


class SessionFromOnnx:
    """Callable that builds an `onnxruntime.InferenceSession` for `path`.

    providers: a list of names or (name, provider options) pairs, or None for `default_providers()`.
    onnxruntime-gpu silently falls back to the
    CPU when CUDA cannot start (missing cuDNN, no driver); after creating the session the loader
    compares `session.get_providers()` with what was asked and records the fallback in `fallback`
    (and warns), so callers can report where the model really runs.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 spinning: bool | None = None) -> None:
        self.path = Path(path)
        # ONNX Runtime's worker threads spin while idle by default; beside other busy stages on a
        # small CPU that burns the cores they need, so pipelines turn it off.
        self.spinning = spinning
        self.providers = list(providers) if providers else None
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.fallback: str | None = None

    def __call__(self):
        import onnxruntime as ort

        if not self.path.is_file():
            raise PetalError(f"model file {self.path} not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.intra_op_threads:
            options.intra_op_num_threads = int(self.intra_op_threads)
        if self.inter_op_threads:
            options.inter_op_num_threads = int(self.inter_op_threads)
        if self.spinning is not None:
            flag = "1" if self.spinning else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", flag)
            options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        requested = self.providers or default_providers()
        names = [p[0] if isinstance(p, tuple) else p for p in requested]
        unknown = [p for p in names if p not in available_providers()]
        if unknown:
            raise PetalError(f"ONNX Runtime here has no {', '.join(unknown)} "
                             f"(it has {', '.join(available_providers())})")
        try:
            session = ort.InferenceSession(str(self.path), options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise PetalError(f"{self.path} is not a usable ONNX model: {first_line(exc, 200)}") from None
        active = session.get_providers()
        lost = [p for p in names if p != CPU and p not in active]
        if lost:
            self.fallback = f"{', '.join(lost)} could not start; {self.path.name} runs on {', '.join(active)}"
            warnings.warn(self.fallback, RuntimeWarning, stacklevel=2)
        return session
