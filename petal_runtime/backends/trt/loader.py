"""TensorRT engine files: the PETAL header, and lazy deserialisation (after Polygraphy's EngineFromBytes).

A serialised TensorRT engine only runs with the TensorRT version that built it, and (unless built
hardware-compatible) on GPUs of the same compute capability. petal-export therefore writes a small
header in front of every engine, and the runtime refuses a mismatched engine with a clear message
instead of TensorRT's crash or garbage. The format is defined here once: `write_engine_file` is
the one writer (petal-export imports it) and `unpack_engine` the one reader:

    8 bytes   magic b"PETALTRT"
    4 bytes   header length L, unsigned little-endian
    L bytes   header, UTF-8 JSON: format, tensorrt_version, gpu, compute_capability, plus extras
              (precision, graph, onnx_sha256, created, ...)
    rest      the engine exactly as `builder.build_serialized_network` returned it

Engine file names: `<graph>.engine`, or `<graph>.<precision>.engine` (e.g. recognizer.fp16.engine);
`find_engine` looks for them in that order of preference.
"""
from __future__ import annotations

import json
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import PetalError
from ...files import atomic_path, first_line

MAGIC = b"PETALTRT"
HEADER_FORMAT = 1
ENGINE_SUFFIX = ".engine"
PRECISION_PREFERENCE = ("", "fp16", "int8", "fp32")
_LENGTH = struct.Struct("<I")
MAX_HEADER = 1 << 20

TENSORRT_INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt (its libraries come from NVIDIA's "
                         "package index and need a CUDA GPU), or use --backend onnxruntime")


def import_tensorrt(hint: str = TENSORRT_INSTALL_HINT):
    """The `tensorrt` module, or a PetalError saying how to get it (`hint`: the caller's advice)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise PetalError(hint) from None
    except OSError as exc:  # the bindings import but a native library is missing
        raise PetalError(f"TensorRT's libraries could not be loaded ({exc}); {hint}") from None
    import tensorrt

    return tensorrt


@dataclass(frozen=True)
class EngineHeader:
    tensorrt_version: str
    gpu: str
    compute_capability: str  # "8.6"
    format: int = HEADER_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # precision, graph, onnx_sha256, created, ...

    def to_bytes(self) -> bytes:
        data = asdict(self)
        extra = data.pop("extra")
        body = json.dumps({**extra, **data}, sort_keys=True).encode()
        return MAGIC + _LENGTH.pack(len(body)) + body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineHeader":
        known = {"tensorrt_version", "gpu", "compute_capability", "format"}
        missing = known - {"format"} - data.keys()
        if missing:
            raise ValueError(f"header lacks {sorted(missing)}")
        return cls(str(data["tensorrt_version"]), str(data["gpu"]), str(data["compute_capability"]),
                   int(data.get("format", HEADER_FORMAT)), {k: v for k, v in data.items() if k not in known})

    @classmethod
    def for_device(cls, tensorrt_version: str, device, **extra) -> "EngineHeader":
        """Header for an engine built here; `device` is a memory.DeviceInfo."""
        return cls(str(tensorrt_version), device.name, device.compute_capability, HEADER_FORMAT, dict(extra))


def write_engine_file(path: str | Path, engine: bytes | bytearray | memoryview | Any, header: EngineHeader) -> Path:
    """Write header + engine atomically; returns the path. `engine` may be TensorRT's IHostMemory
    (it supports the buffer protocol), written without a copy."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(header.to_bytes())
            handle.write(memoryview(engine))
    return path


def unpack_engine(data: bytes, source: str = "engine") -> tuple[EngineHeader, bytes]:
    if not data.startswith(MAGIC):
        raise PetalError(f"{source} has no PETAL engine header (a bare TensorRT engine, or not an engine); "
                         "build engines with petal-export so their TensorRT version and GPU are recorded")
    if len(data) < len(MAGIC) + _LENGTH.size:
        raise PetalError(f"{source} is truncated (header incomplete)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if length > MAX_HEADER or start + length > len(data):
        raise PetalError(f"{source} is truncated or damaged (header length {length})")
    try:
        fields = json.loads(data[start:start + length].decode())
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, found {type(fields).__name__}")
        header = EngineHeader.from_dict(fields)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PetalError(f"{source} has a damaged engine header ({first_line(exc, 120)})") from None
    engine = data[start + length:]
    if not engine:
        raise PetalError(f"{source} holds a header but no engine (truncated)")
    return header, engine


def read_engine_file(path: str | Path) -> tuple[EngineHeader, bytes]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PetalError(f"engine file {path} not found") from None
    return unpack_engine(data, str(path))


def read_engine_header(path: str | Path) -> EngineHeader:
    """Only the header (cheap: reads the first bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MAGIC) + _LENGTH.size)
            if not head.startswith(MAGIC) or len(head) < len(MAGIC) + _LENGTH.size:
                return unpack_engine(head, str(path))[0]  # raises the right message
            (length,) = _LENGTH.unpack_from(head, len(MAGIC))
            body = handle.read(min(length, MAX_HEADER))
            return unpack_engine(head + body + b"\0", str(path))[0]
    except FileNotFoundError:
        raise PetalError(f"engine file {path} not found") from None


DEFAULT_REBUILD = "petal-export CHECKPOINT --fp16 --int8 --out DIR"


def rebuild_command(header: EngineHeader) -> str:
    """The petal-export command the exporter recorded in the header (older headers: the general form)."""
    return str(header.extra.get("rebuild") or DEFAULT_REBUILD)


def check_engine_header(header: EngineHeader, tensorrt_version: str, device, source: str = "engine") -> None:
    """Refuse an engine built by another TensorRT version or for another compute capability, in one
    line that names the command rebuilding it here.

    A different GPU name with the same compute capability is allowed with a warning: TensorRT
    runs such engines, possibly with less than ideal kernels.
    """
    if header.format > HEADER_FORMAT:
        raise PetalError(f"{source} uses engine header format {header.format}; this runtime reads {HEADER_FORMAT}")
    if header.tensorrt_version != str(tensorrt_version):
        raise PetalError(f"{source} was built with TensorRT {header.tensorrt_version}, this machine has "
                         f"{tensorrt_version}: rebuild it here with: {rebuild_command(header)}")
    if header.compute_capability != device.compute_capability:
        raise PetalError(f"{source} was built for {header.gpu} (compute capability {header.compute_capability}), "
                         f"this GPU is {device.name} ({device.compute_capability}): rebuild it here with: "
                         f"{rebuild_command(header)}")
    if header.gpu != device.name:
        warnings.warn(f"{source} was built on {header.gpu}, running on {device.name} (same compute capability)",
                      RuntimeWarning, stacklevel=2)


def engine_candidates(models_dir: str | Path, graph: str) -> list[Path]:
    folder = Path(models_dir)
    found = []
    for precision in PRECISION_PREFERENCE:
        name = f"{graph}{'.' + precision if precision else ''}{ENGINE_SUFFIX}"
        if (folder / name).is_file():
            found.append(folder / name)
    others = sorted(p for p in folder.glob(f"{graph}.*{ENGINE_SUFFIX}") if p not in found)
    return found + others


def find_engine(models_dir: str | Path, graph: str) -> Path | None:
    candidates = engine_candidates(models_dir, graph)
    return candidates[0] if candidates else None


class EngineFromFile:
    """Callable: read a PETAL engine file, check its header against this machine, deserialise it.

    `device` is the memory.DeviceInfo of the GPU it will run on (the runner passes it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header: EngineHeader | None = None
        self._logger = None
        self._runtime = None

    def __call__(self, device):
        trt = import_tensorrt()
        header, blob = read_engine_file(self.path)
        check_engine_header(header, trt.__version__, device, str(self.path))
        self.header = header
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise PetalError(f"TensorRT could not deserialise {self.path} (damaged, or built for other hardware)")
        return engine
