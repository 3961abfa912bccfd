"""Device memory for the TensorRT runner, behind one small interface.

Two implementations, each behind an import guard:
- pycuda (`pycuda.driver`), as the product's design names it;
- cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6), NVIDIA's binding,
  which installs as a binary wheel where pycuda cannot compile.

`get_memory()` returns the first that imports and finds a GPU; `probe_gpu()` answers "is there a
usable GPU here" without raising (cuda-python without a driver reports that cleanly).

The interface: `device_info()`, `allocate(nbytes) -> DeviceBuffer`, `free(buffer)`,
`host_empty(shape, dtype)` (page-locked host memory for asynchronous copies), `stream() -> Stream`,
`copy_in(buffer, array, stream)`, `copy_out(array, buffer, stream)`, `close()`.
"""
from __future__ import annotations

import abc
import contextlib
import ctypes
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ...errors import PetalError

INSTALL_HINT = "install cuda-python (pip install cuda-python) or pycuda"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.6"
    index: int = 0


@dataclass
class DeviceBuffer:
    ptr: int  # device address, what IExecutionContext.set_tensor_address takes
    nbytes: int
    owner: Any = None  # the binding's own object, kept alive until free()


class Stream(abc.ABC):
    @property
    @abc.abstractmethod
    def handle(self) -> int:
        """The cudaStream_t as an int, what execute_async_v3 takes."""

    @abc.abstractmethod
    def synchronize(self) -> None: ...


class DeviceMemory(abc.ABC):
    name = "device memory"

    @abc.abstractmethod
    def device_info(self) -> DeviceInfo: ...

    @abc.abstractmethod
    def allocate(self, nbytes: int) -> DeviceBuffer: ...

    @abc.abstractmethod
    def free(self, buffer: DeviceBuffer) -> None: ...

    @abc.abstractmethod
    def host_empty(self, shape: tuple[int, ...], dtype) -> np.ndarray: ...

    @abc.abstractmethod
    def stream(self) -> Stream: ...

    @abc.abstractmethod
    def copy_in(self, buffer: DeviceBuffer, array: np.ndarray, stream: Stream) -> None: ...

    @abc.abstractmethod
    def copy_out(self, array: np.ndarray, buffer: DeviceBuffer, stream: Stream) -> None: ...

    def activate(self) -> contextlib.AbstractContextManager:
        """Make this device current in the calling thread for the block (a no-op where not needed)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def _check_size(buffer: DeviceBuffer, array: np.ndarray) -> None:
    if array.nbytes > buffer.nbytes:
        raise ValueError(f"{array.nbytes} bytes do not fit a device buffer of {buffer.nbytes}")


# ----------------------------------------------------------------------------- cuda-python


def import_cudart():
    """cuda-python's runtime module (new or old layout); ImportError if absent."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
    return cudart


class _CudartStream(Stream):
    def __init__(self, memory: "CudaPythonMemory") -> None:
        self._memory = memory
        self._stream = memory._call("cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        self._memory._call("cudaStreamSynchronize", self._stream)

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self._memory._cudart.cudaStreamDestroy(self._stream)


class CudaPythonMemory(DeviceMemory):
    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        try:
            self._cudart = import_cudart()
        except ImportError:
            raise PetalError(f"cuda-python is not installed; {INSTALL_HINT}") from None
        count = self._call("cudaGetDeviceCount")
        if count < 1 or device >= count:
            raise PetalError(f"no CUDA GPU {device} (cuda-python sees {count})")
        self._device = device
        self._call("cudaSetDevice", device)
        self._pinned: dict[int, int] = {}

    def _call(self, function: str, *args):
        result = getattr(self._cudart, function)(*args)
        error, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if error != self._cudart.cudaError_t.cudaSuccess:
            _, text = self._cudart.cudaGetErrorString(error)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise PetalError(f"CUDA {function} failed: {text}")
        return values[0] if len(values) == 1 else (values or None)

    def device_info(self) -> DeviceInfo:
        props = self._call("cudaGetDeviceProperties", self._device)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name.rstrip("\x00"), f"{props.major}.{props.minor}", self._device)

    def activate(self):
        self._call("cudaSetDevice", self._device)  # the runtime API makes the primary context current
        return contextlib.nullcontext()

    def allocate(self, nbytes: int) -> DeviceBuffer:
        ptr = self._call("cudaMalloc", max(1, int(nbytes)))
        return DeviceBuffer(int(ptr), int(nbytes), ptr)

    def free(self, buffer: DeviceBuffer) -> None:
        self._call("cudaFree", buffer.owner if buffer.owner is not None else buffer.ptr)

    def host_empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        ptr = int(self._call("cudaMallocHost", nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        array = np.frombuffer(raw, dtype=np.uint8, count=nbytes)[: int(np.prod(shape)) * dtype.itemsize]
        array = array.view(dtype).reshape(shape)
        self._pinned[ptr] = nbytes
        return array

    def stream(self) -> Stream:
        return _CudartStream(self)

    def copy_in(self, buffer: DeviceBuffer, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        _check_size(buffer, array)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", buffer.ptr, array.ctypes.data, array.nbytes, kind, stream.handle)

    def copy_out(self, array: np.ndarray, buffer: DeviceBuffer, stream: Stream) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("copy_out needs a C-contiguous host array")
        _check_size(buffer, array)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", array.ctypes.data, buffer.ptr, array.nbytes, kind, stream.handle)

    def close(self) -> None:
        for ptr in list(self._pinned):
            with contextlib.suppress(Exception):
                self._cudart.cudaFreeHost(ptr)
            self._pinned.pop(ptr, None)


# ----------------------------------------------------------------------------- pycuda


class _PycudaStream(Stream):
    def __init__(self, driver) -> None:
        self._stream = driver.Stream()

    @property
    def handle(self) -> int:
        return int(self._stream.handle)

    def synchronize(self) -> None:
        self._stream.synchronize()


class PycudaMemory(DeviceMemory):
    """pycuda with the device's primary context, pushed around every call (threads included)."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        try:
            import pycuda.driver as driver
        except ImportError:
            raise PetalError(f"pycuda is not installed; {INSTALL_HINT}") from None
        self._driver = driver
        try:
            driver.init()
            if driver.Device.count() <= device:
                raise PetalError(f"no CUDA GPU {device} (pycuda sees {driver.Device.count()})")
            self._device = driver.Device(device)
            self._context = self._device.retain_primary_context()
        except driver.Error as exc:
            raise PetalError(f"CUDA could not start through pycuda: {exc}") from None
        self._index = device

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._driver.Context.pop()

    def device_info(self) -> DeviceInfo:
        major, minor = self._device.compute_capability()
        return DeviceInfo(self._device.name(), f"{major}.{minor}", self._index)

    def allocate(self, nbytes: int) -> DeviceBuffer:
        with self.activate():
            allocation = self._driver.mem_alloc(max(1, int(nbytes)))
        return DeviceBuffer(int(allocation), int(nbytes), allocation)

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.owner is not None:
            with self.activate():
                buffer.owner.free()

    def host_empty(self, shape, dtype) -> np.ndarray:
        with self.activate():
            return self._driver.pagelocked_empty(tuple(shape), np.dtype(dtype))

    def stream(self) -> Stream:
        with self.activate():
            return _PycudaStream(self._driver)

    def copy_in(self, buffer: DeviceBuffer, array: np.ndarray, stream: Stream) -> None:
        array = np.ascontiguousarray(array)
        _check_size(buffer, array)
        self._driver.memcpy_htod_async(buffer.ptr, array, stream._stream)  # type: ignore[attr-defined]

    def copy_out(self, array: np.ndarray, buffer: DeviceBuffer, stream: Stream) -> None:
        _check_size(buffer, array)
        self._driver.memcpy_dtoh_async(array, buffer.ptr, stream._stream)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- choice

IMPLEMENTATIONS: dict[str, type[DeviceMemory]] = {"pycuda": PycudaMemory, "cuda-python": CudaPythonMemory}


def get_memory(prefer: str | None = None, device: int = 0) -> DeviceMemory:
    """The named implementation, or the first of pycuda, cuda-python that imports and sees a GPU."""
    if prefer is not None:
        if prefer not in IMPLEMENTATIONS:
            raise PetalError(f"unknown device-memory binding {prefer!r}; choose one of: {', '.join(IMPLEMENTATIONS)}")
        return IMPLEMENTATIONS[prefer](device)
    reasons = []
    for name, implementation in IMPLEMENTATIONS.items():
        try:
            return implementation(device)
        except PetalError as exc:
            reasons.append(f"{name}: {exc}")
        except Exception as exc:  # a broken binding must not stop the other one from being tried
            reasons.append(f"{name}: {type(exc).__name__}: {exc}")
    raise PetalError("no usable CUDA device memory (" + "; ".join(reasons) + ")")


def probe_gpu(device: int = 0) -> tuple[DeviceInfo | None, str]:
    """(device, "") when a binding finds a GPU, else (None, why not). Never raises."""
    try:
        memory = get_memory(device=device)
    except PetalError as exc:
        return None, str(exc)
    except Exception as exc:  # pragma: no cover - defensive
        return None, f"{type(exc).__name__}: {exc}"
    try:
        return memory.device_info(), ""
    except Exception as exc:
        return None, str(exc)
    finally:
        memory.close()
