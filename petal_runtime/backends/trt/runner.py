"""Run a TensorRT 10 or 11 engine on a dict of named arrays (name-based tensor API, execute_async_v3).

On activation: deserialise the engine (the loader checks its header against this GPU), create an
execution context, select optimisation profile 0, read each input's (min, opt, max) shape from the
profile, and allocate one device buffer per I/O tensor for the profile's largest batch. Each
`infer` call splits the batch into chunks of at most that size, sets every input's shape
(`set_input_shape`), copies the inputs in through page-locked staging buffers, binds all addresses
(`set_tensor_address`), runs `execute_async_v3` on the stream, copies the outputs out and waits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import PetalError
from ..base import Runner, TensorInfo
from .loader import EngineFromFile, import_tensorrt
from .memory import DeviceBuffer, DeviceMemory, get_memory


@dataclass
class _Binding:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # engine shape, -1 for dynamic
    is_input: bool
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # inputs: min, opt, max
    buffer: DeviceBuffer | None = None
    staging: np.ndarray | None = None  # page-locked host memory of the buffer's size


def _np_dtype(trt, dtype) -> np.dtype:
    return np.dtype(trt.nptype(dtype))


class TrtRunner(Runner):
    def __init__(self, loader: EngineFromFile, memory: DeviceMemory | None = None, profile: int = 0,
                 name: str | None = None) -> None:
        super().__init__(name or f"tensorrt:{loader.path.name}")
        self.loader = loader
        self.profile_index = profile
        self._memory_given = memory
        self.memory: DeviceMemory | None = None
        self.engine = None
        self.context = None
        self.stream = None
        self.max_batch = 0
        self.min_batch = 1
        self._bindings: list[_Binding] = []

    # --- activation
    def activate_impl(self) -> None:
        trt = import_tensorrt()
        self.memory = self._memory_given or get_memory()
        try:
            with self.memory.activate():
                self._activate(trt)
        except BaseException:
            self._release()
            raise

    def _activate(self, trt) -> None:
        device = self.memory.device_info()
        self.engine = self.loader(device)
        profiles = self.engine.num_optimization_profiles
        if not 0 <= self.profile_index < max(1, profiles):
            raise PetalError(f"{self.loader.path} has {profiles} optimisation profiles, asked for {self.profile_index}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PetalError(f"TensorRT could not create an execution context for {self.loader.path} (GPU memory?)")
        self.stream = self.memory.stream()
        if profiles > 1:
            self.context.set_optimization_profile_async(self.profile_index, self.stream.handle)
        bindings = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            binding = _Binding(name, _np_dtype(trt, self.engine.get_tensor_dtype(name)),
                               tuple(self.engine.get_tensor_shape(name)), is_input)
            if is_input:
                shapes = self.engine.get_tensor_profile_shape(name, self.profile_index)
                binding.profile = tuple(tuple(int(d) for d in s) for s in shapes)  # type: ignore[assignment]
            bindings.append(binding)
        inputs = [b for b in bindings if b.is_input]
        if not inputs:
            raise PetalError(f"{self.loader.path} has no inputs")
        self.max_batch = min(b.profile[2][0] for b in inputs)
        self.min_batch = max(b.profile[0][0] for b in inputs)
        # Size every buffer for the largest profile shape; outputs take the shapes TensorRT infers.
        for b in inputs:
            if not self.context.set_input_shape(b.name, b.profile[2]):
                raise PetalError(f"TensorRT refused shape {b.profile[2]} for input {b.name}")
        for b in bindings:
            shape = b.profile[2] if b.is_input else tuple(int(d) for d in self.context.get_tensor_shape(b.name))
            if any(d < 0 for d in shape):
                raise PetalError(f"{self.loader.path}: output {b.name} has a data-dependent shape {shape}")
            nbytes = int(np.prod(shape)) * b.dtype.itemsize
            b.buffer = self.memory.allocate(nbytes)
            b.staging = self.memory.host_empty((int(np.prod(shape)),), b.dtype)
            self.context.set_tensor_address(b.name, b.buffer.ptr)
        self._bindings = bindings

    # --- description
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(b.name, b.dtype, tuple(None if d < 0 else d for d in b.shape))
                for b in self._bindings if b.is_input]

    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(b.name, b.dtype, tuple(None if d < 0 else d for d in b.shape))
                for b in self._bindings if not b.is_input]

    def metadata(self) -> dict[str, str]:
        header = self.loader.header
        return {f"petal.engine.{k}": str(v) for k, v in ({**header.extra, "gpu": header.gpu,
                "tensorrt_version": header.tensorrt_version}.items() if header else {})}

    def description(self) -> str:
        gpu = self.loader.header.gpu if self.loader.header else "?"
        return f"tensorrt ({gpu}, {self.memory.name if self.memory else '?'})"

    # --- inference
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [b for b in self._bindings if b.is_input]
        total = len(feed[inputs[0].name])  # check_feed: every input has this batch
        if total == 0:
            return {b.name: np.zeros((0, *(max(d, 0) for d in b.shape[1:])), b.dtype)
                    for b in self._bindings if not b.is_input}
        chunks: dict[str, list[np.ndarray]] = {b.name: [] for b in self._bindings if not b.is_input}
        with self.memory.activate():
            for start in range(0, total, self.max_batch):
                part = {b.name: feed[b.name][start:start + self.max_batch] for b in inputs}
                for name, array in self._run_chunk(part).items():
                    chunks[name].append(array)
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in chunks.items()}

    def _run_chunk(self, part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [b for b in self._bindings if b.is_input]
        n = len(next(iter(part.values())))
        pad = max(0, self.min_batch - n)  # a profile whose minimum batch exceeds this chunk
        for b in inputs:
            array = np.ascontiguousarray(part[b.name], dtype=b.dtype)
            if pad:
                array = np.concatenate([array, np.repeat(array[-1:], pad, axis=0)])
            lo, _, hi = b.profile[0], b.profile[1], b.profile[2]
            if array.ndim != len(hi) or any(not (low <= d <= high) for d, low, high in zip(array.shape, lo, hi)):
                raise PetalError(f"input {b.name} of shape {array.shape} is outside the engine's profile "
                                 f"{tuple(lo)}..{tuple(hi)}")
            if not self.context.set_input_shape(b.name, array.shape):
                raise PetalError(f"TensorRT refused shape {array.shape} for input {b.name}")
            staged = b.staging[: array.size].reshape(array.shape)
            np.copyto(staged, array)
            self.memory.copy_in(b.buffer, staged, self.stream)
        results = {}
        for b in self._bindings:
            self.context.set_tensor_address(b.name, b.buffer.ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise PetalError(f"TensorRT failed to run {self.loader.path}")
        for b in self._bindings:
            if b.is_input:
                continue
            shape = tuple(int(d) for d in self.context.get_tensor_shape(b.name))
            host = b.staging[: int(np.prod(shape))].reshape(shape)
            self.memory.copy_out(host, b.buffer, self.stream)
            results[b.name] = host
        self.stream.synchronize()
        return {name: array[: n].copy() for name, array in results.items()}

    # --- release
    def deactivate_impl(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.memory is not None:
            for b in self._bindings:
                if b.buffer is not None:
                    try:
                        self.memory.free(b.buffer)
                    except Exception:  # pragma: no cover - freeing during teardown must not mask errors
                        pass
                    b.buffer = None
            if self._memory_given is None:
                self.memory.close()
        self._bindings = []
        self.context = None
        self.engine = None
        self.stream = None
        self.memory = None if self._memory_given is None else self.memory
