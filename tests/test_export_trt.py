"""TensorRT engine building, through a fake `tensorrt` module injected into sys.modules.

TensorRT cannot be installed on these machines and they have no GPU, so this checks the control
flow only: which flags, which optimisation profile shapes per named input, which layers are pinned
to FP32, that the timing cache is read and saved, that the INT8 entropy calibrator is fed real
batches and keeps its cache in the calibration folder, what the engine header records, and what
happens when TensorRT or the GPU is missing. Nothing here proves an engine builds or runs.
"""
from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings

import numpy as np
import onnx
import pytest
import torch

from petal_export import trt as petal_trt
from petal_export.trt import EngineRequest, build_engine, iqa_profile, recognizer_profile, timing_cache_path
from petal_runtime.backends.trt.loader import read_engine_file, read_engine_header
from petal_runtime.backends.trt.memory import DeviceBuffer, DeviceInfo
from petal_runtime.errors import PetalError

PLAN = b"FAKE-SERIALISED-ENGINE"


class _Enum:
    def __init__(self, *names: str) -> None:
        for name in names:
            setattr(self, name, f"{type(self).__name__}.{name}")


class FakeTensor:
    def __init__(self, dtype) -> None:
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name: str, kind, dtypes) -> None:
        self.name, self.type = name, kind
        self._outputs = [FakeTensor(d) for d in dtypes]
        self.precision = None
        self.output_types: dict[int, object] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, i: int) -> FakeTensor:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype) -> None:
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, layers) -> None:
        self.layers = layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTimingCache:
    def __init__(self, blob: bytes) -> None:
        self.loaded = bytes(blob)

    def serialize(self) -> bytes:
        return self.loaded + b"+timings"


class FakeConfig:
    def __init__(self) -> None:
        self.flags: set = set()
        self.pools: dict = {}
        self.profiles: list[FakeProfile] = []
        self.calibration_profile: FakeProfile | None = None
        self.int8_calibrator = None
        self.timing_cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile) -> bool:
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, blob) -> FakeTimingCache:
        return FakeTimingCache(blob)

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        assert ignore_mismatch is False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        return self.timing_cache


def fake_tensorrt(layers=None, parse_errors=()) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.BuilderFlag = _Enum("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.LayerType = _Enum("CONVOLUTION", "NORMALIZATION", "SOFTMAX", "ELEMENTWISE", "SHAPE", "REDUCE")
    trt.built = []  # (network, config, parser) per build

    class Logger:
        WARNING = 2

        def __init__(self, severity) -> None:
            self.severity = severity

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.network, self.parsed = network, None

        def parse_from_file(self, path) -> bool:
            self.parsed = path
            return not parse_errors

        @property
        def num_errors(self) -> int:
            return len(parse_errors)

        def get_error(self, i):
            return parse_errors[i]

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            assert flags == 0  # TensorRT 10: explicit batch is implied, the flag is deprecated
            default = [FakeLayer("/conv/Conv", trt.LayerType.CONVOLUTION, [trt.float32]),
                       FakeLayer("/norm/LayerNormalization", trt.LayerType.NORMALIZATION, [trt.float32]),
                       FakeLayer("/Div_1", trt.LayerType.ELEMENTWISE, [trt.float32]),
                       FakeLayer("/Shape", trt.LayerType.SHAPE, [trt.int64])]
            return FakeNetwork(layers if layers is not None else default)

        def create_builder_config(self) -> FakeConfig:
            return FakeConfig()

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network, config):
            trt.built.append((network, config))
            calibrator = config.int8_calibrator
            if calibrator is not None:
                assert isinstance(calibrator, IInt8EntropyCalibrator2) and calibrator.base_initialised
                if calibrator.read_calibration_cache() is None:
                    names = list(config.calibration_profile.shapes)
                    while (pointers := calibrator.get_batch(names)) is not None:
                        assert len(pointers) == len(names) and all(isinstance(p, int) for p in pointers)
                    calibrator.write_calibration_cache(b"CALIBRATION-TABLE")
            return PLAN

    trt.Logger, trt.IInt8EntropyCalibrator2, trt.OnnxParser, trt.Builder = (Logger, IInt8EntropyCalibrator2,
                                                                            OnnxParser, Builder)
    return trt


class FakeStream:
    handle = 0

    def synchronize(self) -> None:
        pass


class FakeMemory:
    """The runtime's DeviceMemory interface, without a GPU: records what is copied where."""

    name = "fake"

    def __init__(self) -> None:
        self.copies: list[tuple[int, tuple]] = []
        self.allocated: list[DeviceBuffer] = []
        self.freed = 0
        self.closed = False

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("NVIDIA Fake GPU", "8.9")

    def allocate(self, nbytes: int) -> DeviceBuffer:
        buffer = DeviceBuffer(0x1000 * (len(self.allocated) + 1), nbytes)
        self.allocated.append(buffer)
        return buffer

    def free(self, buffer) -> None:
        self.freed += 1

    def stream(self) -> FakeStream:
        return FakeStream()

    def copy_in(self, buffer, array, stream) -> None:
        assert array.nbytes <= buffer.nbytes
        self.copies.append((buffer.ptr, array.shape))

    def activate(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def petal_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "recognizer.onnx"
    path.write_bytes(b"onnx bytes (the fake parser does not read them)")
    return path


def _request(onnx_file, precision="fp16", **kw) -> EngineRequest:
    kw.setdefault("profile", recognizer_profile((1, 8, 32), 112))
    return EngineRequest("recognizer", onnx_file, "ab" * 32, precision, fp32_layers=frozenset({"/Div_1"}), **kw)


def test_fp16_engine(monkeypatch, petal_home, onnx_file, tmp_path):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    target = tmp_path / "recognizer.fp16.engine"
    info = build_engine(_request(onnx_file, extra={"checkpoint_sha256": "cd" * 32}), target, FakeMemory(), log=lambda _: None)
    network, config = trt.built[-1]
    assert config.flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    assert config.pools == {trt.MemoryPoolType.WORKSPACE: petal_trt.WORKSPACE_BYTES}
    assert config.int8_calibrator is None
    # One profile, one (min, opt, max) per named input.
    assert len(config.profiles) == 1
    assert config.profiles[0].shapes == {"image": ((1, 3, 112, 112), (8, 3, 112, 112), (32, 3, 112, 112)),
                                         "alpha": ((1, 1), (8, 1), (32, 1))}
    # FP32 islands: the normalisation layer by type, the final normalisation by ONNX node name.
    pinned = {layer.name for layer in network.layers if layer.precision == trt.float32}
    assert pinned == {"/norm/LayerNormalization", "/Div_1"}
    assert all(layer.output_types == {0: trt.float32} for layer in network.layers if layer.name in pinned)
    assert network.layers[3].output_types == {}  # the shape layer keeps its int64 output
    # The file: PETAL header + TensorRT's bytes.
    header, plan = read_engine_file(target)
    assert plan == PLAN
    assert (header.tensorrt_version, header.gpu, header.compute_capability) == ("10.3.0", "NVIDIA Fake GPU", "8.9")
    assert header.extra["precision"] == "fp16" and header.extra["graph"] == "recognizer"
    assert header.extra["profile"]["alpha"] == [[1, 1], [8, 1], [32, 1]]
    assert header.extra["onnx_sha256"] == "ab" * 32 and header.extra["checkpoint_sha256"] == "cd" * 32
    assert read_engine_header(target) == header and info["fp32_layers"] == 2


def test_timing_cache_saved_and_reused(monkeypatch, petal_home, onnx_file, tmp_path):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = timing_cache_path("10.3.0", DeviceInfo("NVIDIA Fake GPU", "8.9"))
    assert cache.parent == petal_home / "trt" and cache.name == "timing-nvidia-fake-gpu-sm8.9-trt10.3.0.cache"
    build_engine(_request(onnx_file), tmp_path / "a.engine", FakeMemory(), log=lambda _: None)
    assert trt.built[-1][1].timing_cache.loaded == b""  # first build: a fresh cache
    assert cache.read_bytes() == b"+timings"
    build_engine(_request(onnx_file), tmp_path / "b.engine", FakeMemory(), log=lambda _: None)
    assert trt.built[-1][1].timing_cache.loaded == b"+timings"  # second build starts from the saved one
    assert cache.read_bytes() == b"+timings+timings"


def _calibration(n_batches: int, batch: int = 8, partial: int = 3):
    from petal_export.int8 import calibration_feeds

    faces = np.random.default_rng(0).uniform(0, 255, (n_batches * batch + partial, 3, 112, 112)).astype(np.float32)
    return calibration_feeds(faces, with_alpha=True, batch=batch)


def test_int8_engine_entropy_calibrator(monkeypatch, petal_home, onnx_file, tmp_path):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "calibration" / "recognizer-abababababab.trt-int8.cache"
    memory = FakeMemory()
    request = _request(onnx_file, "int8", calibration=_calibration(2), calibration_cache=cache)
    build_engine(request, tmp_path / "recognizer.int8.engine", memory, log=lambda _: None)
    _, config = trt.built[-1]
    assert config.flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.INT8, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    # TensorRT calibrates at the calibration profile's opt shape: exactly the calibration batch.
    assert config.calibration_profile.shapes == {"image": ((8, 3, 112, 112),) * 3, "alpha": ((8, 1),) * 3}
    assert config.profiles[0].shapes["image"][2] == (32, 3, 112, 112)
    assert type(config.int8_calibrator).__mro__[1] is trt.IInt8EntropyCalibrator2
    assert config.int8_calibrator.batches_fed == 2  # the partial batch of 3 is not fed
    assert [shape for _, shape in memory.copies] == [(8, 3, 112, 112), (8, 1)] * 2
    assert memory.freed == len(memory.allocated) == 2
    assert cache.read_bytes() == b"CALIBRATION-TABLE"
    assert read_engine_header(tmp_path / "recognizer.int8.engine").extra["precision"] == "int8"
    # A second build reads the cache and feeds nothing.
    memory2 = FakeMemory()
    build_engine(request, tmp_path / "again.engine", memory2, log=lambda _: None)
    assert trt.built[-1][1].int8_calibrator.batches_fed == 0 and memory2.copies == []


def test_iqa_profile_has_one_input_and_spatial_range(monkeypatch, petal_home, onnx_file, tmp_path):
    trt = fake_tensorrt(layers=[])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    request = EngineRequest("iqa", onnx_file, "ef" * 32, "fp16", iqa_profile((2, 4, 16), 112))
    build_engine(request, tmp_path / "iqa.fp16.engine", FakeMemory(), log=lambda _: None)
    _, config = trt.built[-1]
    assert config.profiles[0].shapes == {"image": ((2, 3, 56, 56), (4, 3, 112, 112), (16, 3, 224, 224))}
    assert trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS not in config.flags  # nothing to pin


def test_int8_without_calibration_faces(monkeypatch, petal_home, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    with pytest.raises(PetalError, match="calibration"):
        build_engine(_request(onnx_file, "int8", calibration=_calibration(0, partial=5)), tmp_path / "x.engine",
                     FakeMemory(), log=lambda _: None)


def test_parser_errors_are_one_line(monkeypatch, petal_home, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_errors=("unsupported op Foo",)))
    with pytest.raises(PetalError, match="ONNX parser rejected recognizer: unsupported op Foo"):
        build_engine(_request(onnx_file), tmp_path / "x.engine", FakeMemory(), log=lambda _: None)
    assert not (tmp_path / "x.engine").exists()


def test_engines_unavailable(monkeypatch):
    import petal_runtime.backends.trt as runtime_trt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "TensorRT is not installed" in petal_trt.engines_unavailable()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(runtime_trt, "probe_gpu", lambda: (None, "no CUDA driver"))
    assert petal_trt.engines_unavailable() == "no usable CUDA GPU (no CUDA driver)"
    monkeypatch.setattr(runtime_trt, "probe_gpu", lambda: (DeviceInfo("NVIDIA Fake GPU", "8.9"), ""))
    assert petal_trt.engines_unavailable() is None


# --- the exporter's engine step, end to end on tiny graphs (fake TensorRT, fake GPU, fake execution)

class _TinyRecognizer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, image, alpha):
        h = self.conv(image / 255.0).mean((2, 3))
        return torch.nn.functional.normalize(self.fc(h) * (1 + alpha), dim=1)


class _TinyIqa(torch.nn.Module):
    def forward(self, image):
        return image.mean((1, 2, 3)).reshape(-1, 1) / 255.0


def _to_onnx(module, args, names, outputs, axes, path):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17, input_names=names,
                          output_names=outputs, dynamic_axes=axes)
    onnx.save(onnx.load_from_string(buffer.getvalue()), path)
    return path


def test_exporter_engine_step(monkeypatch, petal_home, tmp_path):
    import petal_runtime.backends.onnxrt as onnxrt
    import petal_runtime.backends.trt as runtime_trt
    from petal_export.export import ExportResult, _build_engines, _Stager
    from petal_export.formats import FORMATS
    from petal_export.verify import Comparator, TorchRunner, iqa_cases, recognizer_cases
    from petal_runtime.contract import Manifest

    torch.manual_seed(0)
    recognizer, iqa = _TinyRecognizer().eval(), _TinyIqa().eval()
    image, alpha = torch.rand(2, 3, 8, 8) * 255, torch.rand(2, 1)
    work = tmp_path / "work"
    work.mkdir()
    paths = {
        "recognizer": _to_onnx(recognizer, (image, alpha), ["image", "alpha"], ["embedding"],
                               {"image": {0: "N"}, "alpha": {0: "N"}, "embedding": {0: "N"}}, work / "r.onnx"),
        "iqa": _to_onnx(iqa, (image,), ["image"], ["quality"], {"image": {0: "N", 2: "H", 3: "W"}, "quality": {0: "N"}},
                        work / "q.onnx"),
    }
    faces = np.random.default_rng(0).uniform(0, 255, (8, 3, 8, 8)).astype(np.float32)
    comparators = {
        "recognizer": Comparator("recognizer", TorchRunner(recognizer, ["image", "alpha"], "embedding"),
                                 recognizer_cases(faces), "embedding"),
        "iqa": Comparator("iqa", TorchRunner(iqa, ["image"], "quality"), iqa_cases(faces), "quality"),
    }
    trt = fake_tensorrt()
    memory = FakeMemory()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(runtime_trt, "get_memory", lambda: memory)
    graphs_by_sha = {}

    class EngineAsOnnx(onnxrt.OnnxrtRunner):
        """Stands in for TrtRunner: checks the engine file, then 'runs' the ONNX graph it was built from."""

        def __init__(self, loader, memory=None, name=None):
            header, plan = read_engine_file(loader.path)
            assert plan == PLAN and memory is not None
            super().__init__(onnxrt.SessionFromOnnx(graphs_by_sha[header.extra["onnx_sha256"]]), name=name)

    from petal_runtime.files import sha256_file

    for path in paths.values():
        graphs_by_sha[sha256_file(path)] = path
    monkeypatch.setattr(runtime_trt, "TrtRunner", EngineAsOnnx)
    out = tmp_path / "out"
    out.mkdir()
    manifest = Manifest(backbone="tiny", embedding_size=6, norm_mean=0.0, norm_std=255.0, iqa_threshold=0.5,
                        face_size=8)
    result = ExportResult(manifest, out)
    from petal_export.int8 import calibration_feeds

    calib = {"recognizer": calibration_feeds(faces, True), "iqa": calibration_feeds(faces, False)}
    with contextlib.ExitStack() as stack:
        stager = _Stager(stack, out, lambda _: None)
        _build_engines(result, stager, [FORMATS["trt-fp16"], FORMATS["trt-int8"]], paths, comparators, calib,
                       tmp_path / "calibration", (1, 4, 8), lambda _: None)
        assert not any(out.iterdir()) or all(p.name.startswith(".") for p in out.iterdir())  # staged, not yet kept
    assert sorted(p.name for p in out.iterdir()) == ["iqa.fp16.engine", "iqa.int8.engine", "recognizer.fp16.engine",
                                                      "recognizer.int8.engine"]
    assert set(result.comparisons) == {"recognizer trt-fp16", "iqa trt-fp16", "recognizer trt-int8", "iqa trt-int8"}
    assert result.comparisons["recognizer trt-int8"].precision == "int8"
    assert manifest.library_versions["tensorrt"] == "10.3.0" and memory.closed
    header = read_engine_header(out / "iqa.int8.engine")
    assert header.extra["profile"]["image"][2] == [8, 3, 16, 16]
    assert sorted(p.name for p in (tmp_path / "calibration").iterdir()) == [
        f"iqa-{sha256_file(paths['iqa'])[:12]}.trt-int8.cache",
        f"recognizer-{sha256_file(paths['recognizer'])[:12]}.trt-int8.cache"]
