"""Backends: the ONNX Runtime runner on exported graphs, backend choice, the TensorRT engine header,
and the TensorRT runner's control flow against a fake `tensorrt` module and fake CUDA bindings.

TensorRT and a GPU cannot run on this machine, so the fakes check only what the runner asks of
TensorRT (profiles, shapes, addresses, execute_async_v3) and of the memory bindings (allocation,
copies through real pointers via ctypes); nothing here claims the real library was exercised.
"""
from __future__ import annotations

import ctypes
import json
import sys
import types
import warnings

import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.backends import choose_backend, get_backend
from petal_runtime.backends.onnxrt import OnnxrtRunner, SessionFromOnnx
from petal_runtime.backends.onnxrt import loader as ort_loader
from petal_runtime.backends.trt import loader as trt_loader
from petal_runtime.backends.trt import memory as trt_memory
from petal_runtime.backends.trt.loader import (EngineFromFile, EngineHeader, check_engine_header, read_engine_file,
                                               read_engine_header, write_engine_file)
from petal_runtime.backends.trt.memory import CudaPythonMemory, DeviceInfo, PycudaMemory, get_memory, probe_gpu
from petal_runtime.backends.trt.runner import TrtRunner
from petal_runtime.errors import PetalError


@pytest.fixture(scope="module")
def models_dir():
    from conftest import require_models

    require_models()
    return rs.exported_models()


# ----------------------------------------------------------------------------- ONNX Runtime


def test_onnxrt_runner_named_inputs_and_outputs(models_dir):
    with OnnxrtRunner(SessionFromOnnx(models_dir / "recognizer.onnx")) as runner:
        assert {t.name for t in runner.inputs()} == {"image", "alpha"}
        assert [t.name for t in runner.outputs()] == ["embedding"]
        assert runner.metadata()["petal.contract_version"] == '"1"'
        faces = np.random.default_rng(0).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
        out = runner.infer({"image": faces, "alpha": np.full((3, 1), 0.5, np.float32)})
        assert out["embedding"].shape == (3, 128)
        np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-4)
        with pytest.raises(ValueError, match="takes inputs"):
            runner.infer({"image": faces})
    assert not runner.is_active
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer({"image": faces, "alpha": np.zeros((3, 1), np.float32)})


def test_onnxrt_missing_or_bad_file_is_a_user_error(tmp_path):
    with pytest.raises(PetalError, match="not found"):
        SessionFromOnnx(tmp_path / "nope.onnx")()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(PetalError, match="not a usable ONNX model"):
        SessionFromOnnx(bad)()


def test_onnxrt_cuda_fallback_is_detected(models_dir, monkeypatch):
    """onnxruntime-gpu silently runs on the CPU when CUDA cannot start; the loader must notice."""
    import onnxruntime as ort

    real = ort.InferenceSession
    monkeypatch.setattr(ort_loader, "available_providers", lambda: [ort_loader.CUDA, ort_loader.CPU])

    def session_without_cuda(path, options=None, providers=None):
        return real(path, options, providers=[p for p in providers if p != ort_loader.CUDA])

    monkeypatch.setattr(ort, "InferenceSession", session_without_cuda)
    loader = SessionFromOnnx(models_dir / "iqa.onnx")
    assert ort_loader.default_providers() == [ort_loader.CUDA, ort_loader.CPU]
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider could not start"):
        session = loader()
    assert session.get_providers() == [ort_loader.CPU]
    assert "runs on CPUExecutionProvider" in loader.fallback


def test_onnxrt_unavailable_provider_is_refused(models_dir):
    with pytest.raises(PetalError, match="has no NoSuchExecutionProvider"):
        SessionFromOnnx(models_dir / "iqa.onnx", providers=["NoSuchExecutionProvider"])()


# ----------------------------------------------------------------------------- backend choice


def test_auto_falls_back_to_onnxruntime_without_engines(models_dir):
    spec, notes = choose_backend("auto", models_dir)
    assert spec.name == "onnxruntime"
    assert any(n.startswith("tensorrt:") for n in notes)


def test_named_tensorrt_without_engine_or_library_says_why(models_dir):
    with pytest.raises(PetalError, match="backend tensorrt cannot run recognizer"):
        choose_backend("tensorrt", models_dir)
    with pytest.raises(PetalError, match="unknown backend"):
        get_backend("openvino")
    assert get_backend("ort").name == "onnxruntime" and get_backend("trt").name == "tensorrt"


def test_missing_tensorrt_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(PetalError, match="TensorRT is not installed"):
        trt_loader.import_tensorrt()


def test_no_cuda_binding_is_a_clear_error(monkeypatch):
    for name in ("pycuda", "pycuda.driver", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(PetalError, match="pycuda: pycuda is not installed.*cuda-python: cuda-python is not installed"):
        get_memory()
    device, why = probe_gpu()
    assert device is None and "not installed" in why


# ----------------------------------------------------------------------------- engine header


def _device(cc="8.6", name="NVIDIA RTX A4000"):
    return DeviceInfo(name, cc)


def test_engine_header_roundtrip_and_refusals(tmp_path):
    header = EngineHeader.for_device("10.3.0", _device(), precision="fp16", graph="recognizer")
    path = write_engine_file(tmp_path / "recognizer.fp16.engine", b"ENGINE-BYTES", header)
    got, blob = read_engine_file(path)
    assert blob == b"ENGINE-BYTES" and got == header and got.extra["precision"] == "fp16"
    assert read_engine_header(path) == header
    check_engine_header(got, "10.3.0", _device())
    with pytest.raises(PetalError, match="built with TensorRT 10.3.0, this machine has 10.5.0"):
        check_engine_header(got, "10.5.0", _device())
    with pytest.raises(PetalError, match=r"compute capability 8.6\), this GPU is NVIDIA H100 \(9.0\)"):
        check_engine_header(got, "10.3.0", _device("9.0", "NVIDIA H100"))
    with pytest.warns(RuntimeWarning, match="running on NVIDIA RTX A5000"):
        check_engine_header(got, "10.3.0", _device("8.6", "NVIDIA RTX A5000"))


def test_bare_truncated_and_damaged_engines_are_refused(tmp_path):
    bare = tmp_path / "bare.engine"
    bare.write_bytes(b"\x00\x01ftrt-engine")
    with pytest.raises(PetalError, match="no PETAL engine header"):
        read_engine_file(bare)
    full = (tmp_path / "x.engine")
    write_engine_file(full, b"E" * 100, EngineHeader("10.3.0", "g", "8.6"))
    data = full.read_bytes()
    (tmp_path / "cut.engine").write_bytes(data[:20])
    with pytest.raises(PetalError, match="truncated"):
        read_engine_file(tmp_path / "cut.engine")
    (tmp_path / "nobody.engine").write_bytes(data[: len(data) - 100])
    with pytest.raises(PetalError, match="no engine"):
        read_engine_file(tmp_path / "nobody.engine")
    with pytest.raises(PetalError, match="not found"):
        read_engine_file(tmp_path / "missing.engine")


# ----------------------------------------------------------------------------- fakes


class _Host:
    """'Device' memory that is really host memory: addresses are real, copies are ctypes.memmove."""

    def __init__(self):
        self.blocks: dict[int, ctypes.Array] = {}

    def malloc(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def free(self, ptr: int) -> None:
        del self.blocks[int(ptr)]

    def array(self, ptr: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        return np.ctypeslib.as_array((ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)).view(dtype).reshape(shape)


def fake_cudart(host: _Host, devices: int = 1, error: str | None = None):
    """Enough of cuda-python's runtime module for CudaPythonMemory, backed by host memory."""
    errors = types.SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35, cudaErrorNoDevice=100)
    kinds = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    calls = []

    class Stream(int):
        pass

    def ok(*values):
        return (errors.cudaSuccess, *values)

    module = types.SimpleNamespace(
        cudaError_t=errors, cudaMemcpyKind=kinds, calls=calls,
        cudaGetErrorString=lambda e: (0, b"CUDA driver version is insufficient for CUDA runtime version"),
        cudaGetDeviceCount=lambda: (getattr(errors, error), 0) if error else ok(devices),
        cudaSetDevice=lambda d: (errors.cudaSuccess,),
        cudaGetDeviceProperties=lambda d: ok(types.SimpleNamespace(name=b"Fake GPU\x00", major=8, minor=6)),
        cudaMalloc=lambda n: ok(host.malloc(n)),
        cudaFree=lambda p: (host.free(p), errors.cudaSuccess)[1:],
        cudaMallocHost=lambda n: ok(host.malloc(n)),
        cudaFreeHost=lambda p: (errors.cudaSuccess,),
        cudaStreamCreate=lambda: ok(Stream(7)),
        cudaStreamSynchronize=lambda s: (errors.cudaSuccess,),
        cudaStreamDestroy=lambda s: (errors.cudaSuccess,),
    )

    def memcpy(dst, src, count, kind, stream):
        calls.append(("memcpy", kind, count, int(stream)))
        ctypes.memmove(int(dst), int(src), count)
        return (errors.cudaSuccess,)

    module.cudaMemcpyAsync = memcpy
    return module


def install_cudart(monkeypatch, module):
    package = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = module
    package.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", module)


def fake_pycuda(host: _Host):
    driver = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class Allocation(int):
        def free(self):
            host.free(int(self))

    class Context:
        stack = []

        def push(self):
            Context.stack.append(self)

        @staticmethod
        def pop():
            Context.stack.pop()

    class Device:
        def __init__(self, index):
            self.index = index

        @staticmethod
        def count():
            return 1

        def name(self):
            return "Fake GPU"

        def compute_capability(self):
            return (8, 6)

        def retain_primary_context(self):
            return Context()

    class Stream:
        handle = 11

        def synchronize(self):
            pass

    driver.Error, driver.Device, driver.Context, driver.Stream = Error, Device, Context, Stream
    driver.init = lambda: None
    driver.mem_alloc = lambda n: Allocation(host.malloc(n))
    driver.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)

    def htod(dst, src, stream):
        assert Context.stack, "copy outside the pushed context"
        ctypes.memmove(int(dst), src.ctypes.data, src.nbytes)

    def dtoh(dst, src, stream):
        assert Context.stack, "copy outside the pushed context"
        ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes)

    driver.memcpy_htod_async, driver.memcpy_dtoh_async = htod, dtoh
    return driver


class FakeTensorRT(types.ModuleType):
    """What TrtRunner and EngineFromFile use of TensorRT 10, with engines described by JSON blobs.

    An engine maps each output to a function of the inputs computed from real memory addresses,
    so the test sees exactly what the runner copied in and out.
    """

    __version__ = "10.3.0"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class DataType:
        FLOAT, HALF = "FLOAT", "HALF"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    def __init__(self, host: _Host):
        super().__init__("tensorrt")
        self.host = host
        self.contexts = []
        fake = self

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, blob):
                spec = json.loads(bytes(blob).decode())
                return None if spec.get("broken") else FakeEngine(fake, spec)

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return {"FLOAT": np.float32, "HALF": np.float16}[dtype]


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, spec: dict):
        self.trt, self.spec = trt, spec
        self.tensors = spec["tensors"]  # name -> {mode, shape, dtype, profile?}
        self.num_io_tensors = len(self.tensors)
        self.num_optimization_profiles = spec.get("profiles", 1)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name]["mode"]

    def get_tensor_dtype(self, name):
        return self.tensors[name].get("dtype", "FLOAT")

    def get_tensor_shape(self, name):
        return tuple(self.tensors[name]["shape"])

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [tuple(s) for s in self.tensors[name]["profile"]]

    def create_execution_context(self):
        context = FakeContext(self)
        self.trt.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.shapes, self.addresses, self.log = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.log.append(("profile", index, stream))
        return True

    def set_input_shape(self, name, shape):
        self.log.append(("shape", name, tuple(shape)))
        lo, _, hi = self.engine.tensors[name]["profile"]
        if any(not (a <= d <= b) for d, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        tensor = self.engine.tensors[name]
        if tensor["mode"] == "INPUT":
            return self.shapes[name]
        batch = self.shapes[next(n for n, t in self.engine.tensors.items() if t["mode"] == "INPUT")][0]
        return (batch, *tensor["shape"][1:])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        self.log.append(("execute", stream))
        host = self.engine.trt.host
        ins = {n: host.array(self.addresses[n], self.shapes[n], np.float32)
               for n, t in self.engine.tensors.items() if t["mode"] == "INPUT"}
        for name, tensor in self.engine.tensors.items():
            if tensor["mode"] == "OUTPUT":
                out = host.array(self.addresses[name], self.get_tensor_shape(name), np.float32)
                out[...] = _fake_outputs(name, ins, out.shape)
        return True


def _fake_outputs(name, ins, shape):
    image = ins["image"]
    if name == "quality":
        return image.mean(axis=(1, 2, 3))[:, None] / 255.0
    # An "embedding": per-channel means mixed with alpha, tiled to D, then normalised.
    base = np.concatenate([image.mean(axis=(2, 3)), ins["alpha"]], axis=1)
    tiled = np.tile(base, (1, shape[1] // base.shape[1] + 1))[:, : shape[1]]
    return tiled / np.linalg.norm(tiled, axis=1, keepdims=True)


RECOGNIZER_SPEC = {"tensors": {
    "image": {"mode": "INPUT", "shape": [-1, 3, 112, 112], "profile": [[1, 3, 112, 112], [8, 3, 112, 112], [32, 3, 112, 112]]},
    "alpha": {"mode": "INPUT", "shape": [-1, 1], "profile": [[1, 1], [8, 1], [32, 1]]},
    "embedding": {"mode": "OUTPUT", "shape": [-1, 128]}}}
IQA_SPEC = {"tensors": {
    "image": {"mode": "INPUT", "shape": [-1, 3, 112, 112], "profile": [[1, 3, 112, 112], [8, 3, 112, 112], [32, 3, 112, 112]]},
    "quality": {"mode": "OUTPUT", "shape": [-1, 1]}}}


@pytest.fixture
def fake_gpu(monkeypatch):
    host = _Host()
    trt = FakeTensorRT(host)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_cudart(monkeypatch, fake_cudart(host))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    from petal_runtime.backends import trt as trt_backend

    trt_backend._gpu.cache_clear()
    yield types.SimpleNamespace(host=host, trt=trt)
    trt_backend._gpu.cache_clear()


def _engine(tmp_path, name, spec, version="10.3.0", cc="8.6"):
    header = EngineHeader.for_device(version, DeviceInfo("Fake GPU", cc), graph=name.split(".")[0])
    return write_engine_file(tmp_path / name, json.dumps(spec).encode(), header)


def _expected_embedding(image, alpha):
    return _fake_outputs("embedding", {"image": image, "alpha": alpha}, (len(image), 128))


@pytest.mark.parametrize("batch", [1, 5, 32, 70])
def test_trt_runner_profiles_shapes_addresses_and_chunks(fake_gpu, tmp_path, batch):
    path = _engine(tmp_path, "recognizer.engine", RECOGNIZER_SPEC)
    memory = get_memory()
    assert isinstance(memory, CudaPythonMemory) and memory.device_info() == DeviceInfo("Fake GPU", "8.6")
    rng = np.random.default_rng(batch)
    image = rng.uniform(0, 255, (batch, 3, 112, 112)).astype(np.float32)
    alpha = rng.uniform(0, 1, (batch, 1)).astype(np.float32)
    with TrtRunner(EngineFromFile(path), memory=memory) as runner:
        assert runner.max_batch == 32 and runner.min_batch == 1
        assert {t.name for t in runner.inputs()} == {"image", "alpha"}
        assert runner.outputs()[0].shape == (None, 128)
        out = runner.infer({"image": image, "alpha": alpha})
        context = fake_gpu.trt.contexts[-1]
    np.testing.assert_allclose(out["embedding"], _expected_embedding(image, alpha), rtol=1e-5, atol=1e-6)
    chunks = [min(32, batch - s) for s in range(0, batch, 32)]
    shapes = [entry for entry in context.log if entry[0] == "shape" and entry[1] == "image"]
    # First the buffers are sized at the profile's maximum, then each chunk sets its own shape.
    assert [s[2][0] for s in shapes] == [32, *chunks]
    assert sum(1 for entry in context.log if entry[0] == "execute") == len(chunks)
    assert set(context.addresses) == {"image", "alpha", "embedding"}
    assert not fake_gpu.host.blocks.keys() & set(context.addresses.values()), "device buffers not freed"


def test_trt_runner_pads_below_the_profile_minimum_and_rejects_outside_shapes(fake_gpu, tmp_path):
    spec = json.loads(json.dumps(RECOGNIZER_SPEC))
    spec["profiles"] = 2  # with several profiles the runner selects profile 0 on its stream
    for name in ("image", "alpha"):
        spec["tensors"][name]["profile"][0][0] = 4  # minimum batch 4
    path = _engine(tmp_path, "recognizer.engine", spec)
    image = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    alpha = np.array([[0.2], [0.9]], np.float32)
    with TrtRunner(EngineFromFile(path), memory=get_memory()) as runner:
        out = runner.infer({"image": image, "alpha": alpha})
        assert out["embedding"].shape == (2, 128)
        np.testing.assert_allclose(out["embedding"], _expected_embedding(image, alpha), rtol=1e-5, atol=1e-6)
        with pytest.raises(PetalError, match="outside the engine's profile"):
            runner.infer({"image": np.zeros((2, 3, 96, 96), np.float32), "alpha": alpha})
        empty = runner.infer({"image": image[:0], "alpha": alpha[:0]})
        assert empty["embedding"].shape == (0, 128)
        context = fake_gpu.trt.contexts[-1]
    assert context.log[0] == ("profile", 0, 7)  # 7: the fake cudart's stream handle
    # Two real faces went in as a batch of four (the profile's minimum), padded with the last one.
    assert ("shape", "image", (4, 3, 112, 112)) in context.log


def test_trt_runner_with_pycuda_pushes_the_context(monkeypatch, tmp_path):
    host = _Host()
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(host))
    pycuda = types.ModuleType("pycuda")
    driver = fake_pycuda(host)
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    memory = get_memory()
    assert isinstance(memory, PycudaMemory)
    path = _engine(tmp_path, "iqa.engine", IQA_SPEC)
    image = np.random.default_rng(1).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    with TrtRunner(EngineFromFile(path), memory=memory) as runner:
        out = runner.infer({"image": image})
    np.testing.assert_allclose(out["quality"][:, 0], image.mean(axis=(1, 2, 3)) / 255, rtol=1e-5)
    assert driver.Context.stack == []


def test_trt_engine_mismatch_and_broken_engine(fake_gpu, tmp_path):
    memory = get_memory()
    old = _engine(tmp_path, "a.engine", RECOGNIZER_SPEC, version="8.6.1")
    with pytest.raises(PetalError, match="built with TensorRT 8.6.1, this machine has 10.3.0"):
        TrtRunner(EngineFromFile(old), memory=memory).activate()
    other_gpu = _engine(tmp_path, "b.engine", RECOGNIZER_SPEC, cc="9.0")
    with pytest.raises(PetalError, match="compute capability 9.0"):
        TrtRunner(EngineFromFile(other_gpu), memory=memory).activate()
    broken = _engine(tmp_path, "c.engine", {"broken": True})
    with pytest.raises(PetalError, match="could not deserialise"):
        TrtRunner(EngineFromFile(broken), memory=memory).activate()


def test_cuda_python_without_driver_is_a_clean_probe(monkeypatch):
    install_cudart(monkeypatch, fake_cudart(_Host(), error="cudaErrorInsufficientDriver"))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    device, why = probe_gpu()
    assert device is None and "driver version is insufficient" in why
    with pytest.raises(PetalError, match="cudaGetDeviceCount failed"):
        get_memory("cuda-python")
    with pytest.raises(PetalError, match="unknown device-memory binding"):
        get_memory("opencl")


def test_auto_picks_tensorrt_when_library_gpu_and_engines_exist(fake_gpu, models_dir, tmp_path):
    """The whole Models path on the TensorRT backend (fake library and GPU, real header and memory code)."""
    import shutil

    from petal_runtime.models import Models

    for name in ("recognizer.onnx", "iqa.onnx", "manifest.json"):
        shutil.copy(models_dir / name, tmp_path / name)
    spec, _ = choose_backend("auto", tmp_path)
    assert spec.name == "onnxruntime"  # no engines yet
    _engine(tmp_path, "recognizer.fp16.engine", RECOGNIZER_SPEC)
    _engine(tmp_path, "iqa.fp16.engine", IQA_SPEC)
    spec, _ = choose_backend("auto", tmp_path)
    assert spec.name == "tensorrt"
    with Models(tmp_path) as models:
        assert models.backend.name == "tensorrt"
        assert models.description() == "tensorrt (Fake GPU, cuda-python)"
        faces = np.random.default_rng(2).uniform(0, 255, (40, 3, 112, 112)).astype(np.float32)
        q = models.quality(faces)
        e = models.embed(faces, models.alpha(q))
    assert q.shape == (40,) and e.shape == (40, 128)
    np.testing.assert_allclose(e, _expected_embedding(faces, models.alpha(q)[:, None]), rtol=1e-5, atol=1e-6)


def test_probe_warnings_do_not_leak(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device, why = probe_gpu()
    assert device == DeviceInfo("Fake GPU", "8.6") and why == ""
