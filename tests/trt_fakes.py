"""Fake `tensorrt` modules in a 10.x and an 11.x flavour, and fake CUDA device memory.

TensorRT cannot be installed on the development machines and they have no GPU, so the builder
(petal_export.trt) and the runner (petal_runtime.backends.trt) are tested against these fakes. What
keeps the fakes honest:

- Each flavour's API surface follows the real bindings of that version: the 11.x flavour has none
  of the weak-typing names TensorRT 11 removed (BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS/...,
  IBuilderConfig.int8_calibrator and set_calibration_profile, IInt8EntropyCalibrator2,
  ILayer.precision/set_output_type, NetworkDefinitionCreationFlag.EXPLICIT_BATCH); touching one
  raises AttributeError, as the real module does. Setting an attribute the binding does not have
  raises AttributeError too (pybind11 objects do), so `config.int8_calibrator = ...` cannot pass
  silently.
- Every public name the code under test reads or sets is recorded in `USED`;
  tests/test_trt_api_surface.py runs the builder and runner under each flavour and checks those
  names, and each flavour's whole surface (`surface()`), against the names exported by the real
  `tensorrt-cu12-bindings` wheel of that major version.
- Behaviour follows the documented rules: a strongly typed network (always in 11.x) refuses layer
  precision settings and precision builder flags (the build fails, as TensorRT's does); every
  dynamic input needs a profile shape. The parser reads the real ONNX file (layers, types), and an
  engine built from an ONNX file "executes" it with ONNX Runtime on the CPU through the runner's
  real device-memory code (host memory standing in for the GPU), so exporter tests compare real
  numbers.

Nothing here proves that a real engine builds or runs: that needs a GPU (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np

FLAVOURS = {"10.11": "10.11.0.33", "10.16": "10.16.1.11", "11.4": "11.4.0.106"}
TRT10, TRT11 = FLAVOURS["10.16"], FLAVOURS["11.4"]
BOTH = [TRT10, TRT11]  # every builder and runner test runs under both
BOTH_IDS = ["trt10", "trt11"]

# BuilderFlag members TensorRT 11 removed (the migration guide's list). INT8, BF16, FP8, INT4 and FP4
# live on as DataType members, so only their absence from BuilderFlag can be modelled.
WEAK_BUILDER_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                      "PREFER_PRECISION_CONSTRAINTS")
# Names TensorRT 11 removed altogether: present in the 10.x bindings' exported names, absent from 11.x's
# (checked by tests/test_trt_api_surface.py against the real wheels).
REMOVED_IN_11 = frozenset({
    "FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "int8_calibrator",
    "set_calibration_profile", "get_calibration_profile", "IInt8EntropyCalibrator2", "IInt8Calibrator",
    "IInt8MinMaxCalibrator", "set_output_type", "precision_is_set", "reset_precision", "EXPLICIT_BATCH",
    "platform_has_fast_fp16", "platform_has_fast_int8"})
# Names a flavour defines in Python (tensorrt_bindings/__init__.py), not in the compiled module.
PYTHON_LEVEL = frozenset({"__version__", "nptype"})

USED: set[str] = set()


def _record(name: str) -> None:
    if not name.startswith("_"):
        USED.add(name)


def _major(version: str) -> int:
    return int(version.split(".")[0])


class _ApiMeta(type):
    def __getattribute__(cls, name):
        _record(name)
        return type.__getattribute__(cls, name)


class _Api(metaclass=_ApiMeta):
    """A binding object: records public reads; refuses to set what the binding does not have."""

    _settable: frozenset[str] = frozenset()

    def __getattribute__(self, name):
        _record(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            _record(name)
            if name not in type(self)._settable:
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


class _Value(int):
    """An enum member: an int with a name (what `int(trt.X.Y)` and comparisons need)."""

    def __new__(cls, owner: str, name: str, value: int):
        self = int.__new__(cls, value)
        self._name = f"{owner}.{name}"
        return self

    def __repr__(self) -> str:
        return f"<{self._name}: {int(self)}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, _Value) and self._name == other._name

    def __hash__(self) -> int:
        return hash(self._name)


def _enum(owner: str, *names: str, start: int = 0) -> _Api:
    enum = type(owner, (_Api,), {})()
    for value, name in enumerate(names, start):
        object.__setattr__(enum, name, _Value(owner, name, value))
    return enum


class _Module(types.ModuleType):
    def __getattribute__(self, name):
        _record(name)
        return types.ModuleType.__getattribute__(self, name)


# ----------------------------------------------------------------------------- network and builder


_LAYER_TYPES = {"Conv": "CONVOLUTION", "Gemm": "MATRIX_MULTIPLY", "MatMul": "MATRIX_MULTIPLY",
                "LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Shape": "SHAPE",
                "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Cast": "CAST",
                "ReduceL2": "REDUCE", "ReduceMean": "REDUCE"}
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32", 3: "INT8", 9: "BOOL"}


def make_tensorrt(version: str = TRT10, parse_errors=(), layers=None) -> types.ModuleType:
    """A fake `tensorrt` module of `version` ("10.x.y.z" or "11.x.y.z").

    layers: [(name, onnx op type, [output dtype names])] for a network not read from an ONNX file.
    """
    v11 = _major(version) >= 11
    trt = _Module("tensorrt")
    trt.__version__ = version
    # The fake's own bookkeeping, for the tests; the fake never reads public names itself, so that
    # USED holds only what the code under test touched.
    builds, contexts = [], []
    trt.builds, trt.contexts, trt._contexts = builds, contexts, contexts

    weak_flags = () if v11 else WEAK_BUILDER_FLAGS
    trt.BuilderFlag = _enum("BuilderFlag", *weak_flags, "DEBUG", "GPU_FALLBACK", "REFIT", "TF32",
                            "SPARSE_WEIGHTS", "DIRECT_IO")
    trt.NetworkDefinitionCreationFlag = (
        _enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS",
              "PREFER_JIT_PYTHON_PLUGINS") if v11 else
        _enum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS",
              "PREFER_JIT_PYTHON_PLUGINS"))
    trt.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                               "DLA_GLOBAL_DRAM", "TACTIC_DRAM")
    trt.LayerType = _enum("LayerType", "CONVOLUTION", "MATRIX_MULTIPLY", "NORMALIZATION", "SOFTMAX", "ELEMENTWISE",
                          "SHAPE", "REDUCE", "QUANTIZE", "DEQUANTIZE", "CAST", "UNARY")
    trt.DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64")
    trt.TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("int8", "INT8"), ("int32", "INT32"),
                          ("int64", "INT64"), ("bfloat16", "BF16"), ("uint8", "UINT8")):
        setattr(trt, alias, getattr(trt.DataType, member))
    enums = {name: {k: v for k, v in vars(types.ModuleType.__getattribute__(trt, name)).items()
                    if isinstance(v, _Value)} for name in ("DataType", "LayerType", "TensorIOMode")}
    trt._enums = enums
    strongly_typed_bit = 1 << int(object.__getattribute__(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                   "BOOL": np.bool_, "UINT8": np.uint8}

    def nptype(dtype):
        return numpy_types[dtype._name.split(".")[1]]

    trt.nptype = nptype
    trt._nptype = nptype
    dtype_of = enums["DataType"].__getitem__
    layer_type = lambda op: enums["LayerType"][_LAYER_TYPES.get(op, "ELEMENTWISE")]  # noqa: E731

    class Logger(_Api):
        WARNING = 2

        def __init__(self, severity=2) -> None:
            self._severity = severity

    class ITensor(_Api):
        def __init__(self, name, dtype, shape=()) -> None:
            self._name, self._dtype, self._shape = name, dtype, tuple(shape)

        @property
        def name(self):
            return self._name

        @property
        def dtype(self):
            return self._dtype

        @property
        def shape(self):
            return self._shape

    layer_methods = {}
    if not v11:
        def _set_precision(self, value):
            self._set("precision", value)

        def set_output_type(self, index, dtype):
            self._set(f"output_type[{index}]", dtype)
            self._output_types[index] = dtype

        layer_methods = {"precision": property(lambda self: self._precision, _set_precision),
                         "set_output_type": set_output_type,
                         "precision_is_set": property(lambda self: self._precision is not None)}

    class ILayer(_Api):
        def __init__(self, network, name, kind, outputs) -> None:
            self._network, self._name, self._type = network, name, kind
            self._outputs = outputs
            self._precision = None
            self._output_types = {}

        name = property(lambda self: self._name)
        type = property(lambda self: self._type)
        num_outputs = property(lambda self: len(self._outputs))

        def get_output(self, index):
            return self._outputs[index]

        def _set(self, what, value):
            if self._network._strongly_typed:  # TensorRT: not allowed in a strongly typed network
                self._network._errors.append(f"{self._name}: setting {what} is not allowed in a strongly typed network")
            if what == "precision":
                self._precision = value

    for key, value in layer_methods.items():
        setattr(ILayer, key, value)
    if not v11:
        ILayer._settable = frozenset({"precision"})

    class INetworkDefinition(_Api):
        def __init__(self, strongly_typed: bool) -> None:
            self._strongly_typed = strongly_typed
            self._layers, self._inputs, self._outputs, self._errors = [], [], [], []
            self._onnx = None

        num_layers = property(lambda self: len(self._layers))
        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_layer(self, index):
            return self._layers[index]

        def get_input(self, index):
            return self._inputs[index]

        def get_output(self, index):
            return self._outputs[index]

    class OnnxParser(_Api):
        def __init__(self, network, logger) -> None:
            self._network = network

        def parse_from_file(self, path) -> bool:
            if parse_errors:
                return False
            network = self._network
            network._onnx = str(path)
            if layers is not None:
                for name, op, dtypes in layers:
                    network._layers.append(ILayer(network, name, layer_type(op),
                                                  [ITensor(f"{name}:0", dtype_of(d)) for d in dtypes]))
                network._inputs = [ITensor("image", dtype_of("FLOAT"), (-1, 3, 112, 112))]
                return True
            import onnx

            model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
            types_of = {}
            for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
                types_of[value.name] = _ONNX_TYPES.get(value.type.tensor_type.elem_type, "FLOAT")
            for init in model.graph.initializer:
                types_of[init.name] = _ONNX_TYPES.get(init.data_type, "FLOAT")

            def dims(value):
                return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)

            initializers = {i.name for i in model.graph.initializer}
            network._inputs = [ITensor(v.name, dtype_of(types_of[v.name]), dims(v))
                               for v in model.graph.input if v.name not in initializers]
            network._outputs = [ITensor(v.name, dtype_of(types_of[v.name]), dims(v)) for v in model.graph.output]
            for node in model.graph.node:
                outputs = [ITensor(o, dtype_of(types_of.get(o, "FLOAT"))) for o in node.output]
                network._layers.append(ILayer(network, node.name, layer_type(node.op_type), outputs))
            return True

        num_errors = property(lambda self: len(parse_errors))

        def get_error(self, index):
            return parse_errors[index]

    class IOptimizationProfile(_Api):
        def __init__(self) -> None:
            self._shapes = {}

        def set_shape(self, name, min, opt, max) -> None:  # noqa: A002 - the binding's keyword names
            self._shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache(_Api):
        def __init__(self, blob) -> None:
            self._loaded = bytes(blob)

        def serialize(self):
            return self._loaded + b"+timings"

    class IBuilderConfig(_Api):
        def __init__(self) -> None:
            self._flags, self._pools, self._profiles = set(), {}, []
            self._timing_cache = None
            self._calibrator = None

        def set_memory_pool_limit(self, pool, size) -> None:
            self._pools[pool] = size

        def set_flag(self, flag) -> None:
            self._flags.add(flag)

        def get_flag(self, flag) -> bool:
            return flag in self._flags

        def clear_flag(self, flag) -> None:
            self._flags.discard(flag)

        def add_optimization_profile(self, profile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, blob):
            return ITimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            assert ignore_mismatch is False
            self._timing_cache = cache
            return True

        def get_timing_cache(self):
            return self._timing_cache

    if not v11:
        IBuilderConfig.int8_calibrator = property(lambda self: self._calibrator,
                                                  lambda self, value: object.__setattr__(self, "_calibrator", value))
        IBuilderConfig.set_calibration_profile = lambda self, profile: True
        IBuilderConfig._settable = frozenset({"int8_calibrator"})

    class IHostMemory(bytes):  # the real one supports the buffer protocol, which is all the builder uses
        nbytes = property(len)

    class Builder(_Api):
        def __init__(self, logger) -> None:
            self._logger = logger

        def create_network(self, flags=0):
            strong = v11 or bool(flags & strongly_typed_bit)
            return INetworkDefinition(strong)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            builds.append((network, config))
            errors = list(network._errors)
            if network._strongly_typed:
                precision_flags = {f for f in config._flags if f._name.split(".")[1] in WEAK_BUILDER_FLAGS}
                if precision_flags:
                    errors.append(f"precision flags {sorted(map(repr, precision_flags))} with a strongly typed network")
            if len(config._profiles) != 1:
                errors.append(f"{len(config._profiles)} optimisation profiles")
            shapes = config._profiles[0]._shapes if config._profiles else {}
            for tensor in network._inputs:
                if -1 in tensor._shape and tensor._name not in shapes:
                    errors.append(f"no profile shape for dynamic input {tensor._name}")
            if errors:
                trt._build_errors = errors
                return None
            spec = {"onnx": network._onnx, "strongly_typed": network._strongly_typed,
                    "flags": sorted(f._name for f in config._flags), "tensors": {}}
            for tensor in network._inputs:
                spec["tensors"][tensor._name] = {"mode": "INPUT", "shape": list(tensor._shape),
                                                 "dtype": tensor._dtype._name.split(".")[1],
                                                 "profile": [list(s) for s in
                                                             shapes.get(tensor._name, (tensor._shape,) * 3)]}
            for tensor in network._outputs:
                spec["tensors"][tensor._name] = {"mode": "OUTPUT", "shape": list(tensor._shape),
                                                 "dtype": tensor._dtype._name.split(".")[1]}
            return IHostMemory(json.dumps(spec).encode())

    class Runtime(_Api):
        def __init__(self, logger) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, blob):
            spec = json.loads(bytes(blob).decode())
            return None if spec.get("broken") else ICudaEngine(trt, spec)

    trt.Logger, trt.ITensor, trt.ILayer, trt.INetworkDefinition = Logger, ITensor, ILayer, INetworkDefinition
    trt.OnnxParser, trt.IOptimizationProfile, trt.ITimingCache = OnnxParser, IOptimizationProfile, ITimingCache
    trt.IBuilderConfig, trt.IHostMemory, trt.Builder, trt.Runtime = IBuilderConfig, IHostMemory, Builder, Runtime
    trt.ICudaEngine, trt.IExecutionContext = ICudaEngine, IExecutionContext
    if not v11:
        class IInt8EntropyCalibrator2(_Api):
            pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


# ----------------------------------------------------------------------------- runtime


class ICudaEngine(_Api):
    """An engine described by JSON: tensors (mode, shape, dtype, profile) and either the ONNX file it was
    built from (run with ONNX Runtime on the CPU) or a synthetic function (`_fake_outputs`)."""

    def __init__(self, trt, spec: dict) -> None:
        self._trt, self._spec = trt, spec
        self._tensors = spec["tensors"]
        self._session = None

    num_io_tensors = property(lambda self: len(self._tensors))
    num_optimization_profiles = property(lambda self: self._spec.get("profiles", 1))

    def get_tensor_name(self, index):
        return list(self._tensors)[index]

    def get_tensor_mode(self, name):
        return self._trt._enums["TensorIOMode"][self._tensors[name]["mode"]]

    def get_tensor_dtype(self, name):
        return self._dtype(name)

    def _dtype(self, name):
        return self._trt._enums["DataType"][self._tensors[name].get("dtype", "FLOAT")]

    def get_tensor_shape(self, name):
        return tuple(self._tensors[name]["shape"])

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [tuple(s) for s in self._tensors[name]["profile"]]

    def create_execution_context(self):
        context = IExecutionContext(self)
        self._trt._contexts.append(context)
        return context

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._spec.get("onnx"):
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(self._spec["onnx"], providers=["CPUExecutionProvider"])
            names = [o.name for o in self._session.get_outputs()]
            return dict(zip(names, self._session.run(names, inputs)))
        return {name: _fake_outputs(name, inputs, None) for name, t in self._tensors.items() if t["mode"] == "OUTPUT"}


class IExecutionContext(_Api):
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self._shapes, self._addresses, self._log = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self._log.append(("profile", index, stream))
        return True

    def set_input_shape(self, name, shape):
        self._log.append(("shape", name, tuple(shape)))
        lo, _, hi = self._engine._tensors[name]["profile"]
        if len(shape) != len(lo) or any(not (a <= d <= b) for d, a, b in zip(shape, lo, hi)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self._shape_of(name)

    def _shape_of(self, name):
        tensor = self._engine._tensors[name]
        if tensor["mode"] == "INPUT":
            return self._shapes[name]
        batch = self._shapes[next(n for n, t in self._engine._tensors.items() if t["mode"] == "INPUT")][0]
        return (batch, *tensor["shape"][1:])

    def set_tensor_address(self, name, ptr):
        self._addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        self._log.append(("execute", stream_handle))
        tensors = self._engine._tensors
        dtype = lambda name: self._engine._trt._nptype(self._engine._dtype(name))  # noqa: E731
        inputs = {n: host_array(self._addresses[n], self._shapes[n], dtype(n)).copy()
                  for n, t in tensors.items() if t["mode"] == "INPUT"}
        outputs = self._engine._run(inputs)
        for name, tensor in tensors.items():
            if tensor["mode"] == "OUTPUT":
                out = host_array(self._addresses[name], self._shape_of(name), dtype(name))
                out[...] = outputs[name] if self._engine._spec.get("onnx") else _fake_outputs(name, inputs, out.shape)
        return True


def _fake_outputs(name, ins, shape):
    image = ins["image"]
    if name == "quality":
        return image.mean(axis=(1, 2, 3))[:, None] / 255.0
    # An "embedding": per-channel means mixed with alpha, tiled to D, then normalised.
    width = shape[1] if shape is not None else 128
    base = np.concatenate([image.mean(axis=(2, 3)), ins["alpha"]], axis=1)
    tiled = np.tile(base, (1, width // base.shape[1] + 1))[:, :width]
    return tiled / np.linalg.norm(tiled, axis=1, keepdims=True)


IMAGE_PROFILE = [[1, 3, 112, 112], [8, 3, 112, 112], [32, 3, 112, 112]]
RECOGNIZER_SPEC = {"tensors": {
    "image": {"mode": "INPUT", "shape": [-1, 3, 112, 112], "profile": IMAGE_PROFILE},
    "alpha": {"mode": "INPUT", "shape": [-1, 1], "profile": [[1, 1], [8, 1], [32, 1]]},
    "embedding": {"mode": "OUTPUT", "shape": [-1, 128]}}}
IQA_SPEC = {"tensors": {
    "image": {"mode": "INPUT", "shape": [-1, 3, 112, 112], "profile": IMAGE_PROFILE},
    "quality": {"mode": "OUTPUT", "shape": [-1, 1]}}}


def expected_embedding(image, alpha):
    return _fake_outputs("embedding", {"image": image, "alpha": alpha}, (len(image), 128))


def surface(trt) -> set[str]:
    """Every public name a fake flavour offers: module attributes, class members, enum members."""
    names = set()
    for name, value in vars(trt).items():
        if name.startswith("_") and name not in PYTHON_LEVEL:
            continue
        if name in ("builds", "contexts", "build_errors"):
            continue  # the fake's own bookkeeping
        names.add(name)
        if isinstance(value, type):
            names |= {k for cls in value.__mro__ if cls is not _Api and cls.__module__ != "builtins" for k in vars(cls)
                      if not k.startswith("_")}
        elif isinstance(value, _Api):
            names |= {k for k in vars(value) if not k.startswith("_")}
    for cls in (ICudaEngine, IExecutionContext):
        names |= {k for k in vars(cls) if not k.startswith("_")}
    return names


# ----------------------------------------------------------------------------- device memory


class Host:
    """'Device' memory that is really host memory: addresses are real, copies are ctypes.memmove."""

    def __init__(self):
        self.blocks: dict[int, ctypes.Array] = {}

    def malloc(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def free(self, ptr: int) -> None:
        del self.blocks[int(ptr)]


def host_array(ptr: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return np.ctypeslib.as_array(raw).view(dtype).reshape(shape)


def fake_cudart(host: Host, devices: int = 1, error: str | None = None, name: bytes = b"Fake GPU\x00", cc=(8, 6)):
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
        cudaGetDeviceProperties=lambda d: ok(types.SimpleNamespace(name=name, major=cc[0], minor=cc[1])),
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


def install_cudart(monkeypatch, module) -> None:
    package = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = module
    package.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", module)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)


def fake_pycuda(host: Host):
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


def install(monkeypatch, version: str = TRT10, **kw):
    """Put a fake `tensorrt` of `version` and fake cuda-python memory in sys.modules; returns
    (trt, host)."""
    host = Host()
    trt = make_tensorrt(version, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_cudart(monkeypatch, fake_cudart(host))
    from petal_runtime.backends import trt as trt_backend

    trt_backend._gpu.cache_clear()  # the fixture using this clears it again afterwards
    return trt, host


def write_spec_engine(folder: Path, name: str, spec: dict, version: str = TRT10, cc: str = "8.6", **extra) -> Path:
    """A PETAL engine file whose plan is a JSON spec the fake runtime deserialises."""
    from petal_runtime.backends.trt.loader import EngineHeader, write_engine_file
    from petal_runtime.backends.trt.memory import DeviceInfo

    header = EngineHeader.for_device(version, DeviceInfo("Fake GPU", cc), graph=name.split(".")[0], **extra)
    return write_engine_file(Path(folder) / name, json.dumps(spec).encode(), header)


def list_in_manifest(folder: Path, *names: str) -> None:
    """Record files' sha256 in folder/manifest.json, as petal-export does for every file it writes
    (the runtime refuses a model file its manifest does not list)."""
    from petal_runtime.files import sha256_file

    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.setdefault("files", {}).update({name: sha256_file(Path(folder) / name) for name in names})
    path.write_text(json.dumps(manifest))
