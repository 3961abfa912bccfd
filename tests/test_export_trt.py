"""TensorRT engine building under a fake `tensorrt` of each flavour (tests/trt_fakes.py: 10.x and 11.x).

TensorRT cannot be installed on these machines and they have no GPU, so this checks the control
flow against fakes whose API surface follows the real bindings (tests/test_trt_api_surface.py checks
that against the real wheels): which typing mode and source graph each version and precision take,
that no weak-typing API is touched where it does not exist, the optimisation profile per named
input, the timing cache, the engine header, and the missing-library and version paths. The fake
parser reads the real ONNX files and the fake engines run them with ONNX Runtime, so the exporter's
engine step is verified on real numbers, but nothing here proves a real engine builds or runs.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch

import trt_fakes
from petal_export import trt as petal_trt
from petal_export.trt import (EngineRequest, build_engine, build_plan, iqa_profile, recognizer_profile,
                              timing_cache_path)
from petal_runtime.backends.trt.loader import read_engine_file, read_engine_header
from petal_runtime.backends.trt.memory import DeviceInfo, get_memory
from petal_runtime.errors import PetalError

ALL = list(trt_fakes.FLAVOURS.values())  # 10.11 (weak FP16), 10.16, 11.4
ALL_IDS = ["trt10.11", "trt10.16", "trt11.4"]


@pytest.fixture
def petal_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake(monkeypatch, request):
    """install(version) -> the fake module; clears the runtime's GPU probe cache afterwards."""
    from petal_runtime.backends import trt as trt_backend

    def install(version, **kw):
        return trt_fakes.install(monkeypatch, version, **kw)[0]

    yield install
    trt_backend._gpu.cache_clear()


# --- tiny real graphs: FP32, FP16 (the exporter's pass) and Q/DQ (the exporter's quantiser)

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


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{format name: {graph: path}} for the tiny recognizer and IQA, plus the modules and faces."""
    from petal_export.fp16 import convert_to_fp16
    from petal_export.int8 import calibration_feeds, quantize_int8_qdq

    work = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    recognizer, iqa = _TinyRecognizer().eval(), _TinyIqa().eval()
    image, alpha = torch.rand(2, 3, 32, 32) * 255, torch.rand(2, 1)
    fp32 = {
        "recognizer": _to_onnx(recognizer, (image, alpha), ["image", "alpha"], ["embedding"],
                               {"image": {0: "N"}, "alpha": {0: "N"}, "embedding": {0: "N"}}, work / "recognizer.onnx"),
        "iqa": _to_onnx(iqa, (image,), ["image"], ["quality"], {"image": {0: "N", 2: "H", 3: "W"}, "quality": {0: "N"}},
                        work / "iqa.onnx"),
    }
    faces = np.random.default_rng(0).uniform(0, 255, (16, 3, 32, 32)).astype(np.float32)
    sources = {"onnx": fp32, "onnx-fp16": {}, "onnx-int8-qdq": {}}
    for graph, path in fp32.items():
        model, _ = convert_to_fp16(onnx.load(str(path)))
        sources["onnx-fp16"][graph] = work / f"{graph}.fp16.onnx"
        onnx.save(model, sources["onnx-fp16"][graph])
        sources["onnx-int8-qdq"][graph] = work / f"{graph}.qdq.onnx"
        quantize_int8_qdq(path, sources["onnx-int8-qdq"][graph], calibration_feeds(faces, graph == "recognizer"))
    return {"sources": sources, "recognizer": recognizer, "iqa": iqa, "faces": faces}


def _request(path, precision="fp16", graph="recognizer", size=8, **kw) -> EngineRequest:
    kw.setdefault("profile", (recognizer_profile if graph == "recognizer" else iqa_profile)((1, 8, 32), size))
    return EngineRequest(graph, path, "ab" * 32, precision, **kw)


def _build(trt, request, tmp_path, name="x.engine"):
    trt_fakes.USED.clear()
    target = tmp_path / name
    info = build_engine(request, target, get_memory(), log=lambda _: None)
    network, config = trt.builds[-1]
    return info, target, network, config


# --- which path each TensorRT takes

@pytest.mark.parametrize("version, precision, typing, source", [
    ("10.0.1", "fp16", "weak", "onnx"), ("10.11.0.33", "fp16", "weak", "onnx"),
    ("10.12.0.36", "fp16", "strong", "onnx-fp16"), ("10.16.1.11", "fp16", "strong", "onnx-fp16"),
    ("11.4.0.106", "fp16", "strong", "onnx-fp16"), ("10.0.1", "int8", "strong", "onnx-int8-qdq"),
    ("11.4.0.106", "int8", "strong", "onnx-int8-qdq")])
def test_build_plan(version, precision, typing, source):
    plan = build_plan(precision, version)
    assert (plan.typing, plan.source_format) == (typing, source)


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0"])
def test_build_plan_refuses_versions_outside_10_and_11(version):
    with pytest.raises(PetalError, match=rf"TensorRT {version} is outside the supported range 10.x-11.x"):
        build_plan("fp16", version)


# --- builds under each flavour

@pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)
def test_fp16_engine_is_strongly_typed_from_the_fp16_graph(fake, petal_home, tmp_path, graphs, version):
    trt = fake(version)
    path = graphs["sources"]["onnx-fp16"]["recognizer"]
    info, target, network, config = _build(trt, _request(path, extra={"rebuild": "petal-export default --fp16"}),
                                           tmp_path, "recognizer.fp16.engine")
    assert network._strongly_typed and network._onnx == str(path)
    assert config._flags == set()  # no precision flags: the graph carries the types
    assert not trt_fakes.USED & (trt_fakes.REMOVED_IN_11 | set(trt_fakes.WEAK_BUILDER_FLAGS))
    assert all(layer._precision is None and not layer._output_types for layer in network._layers)
    assert any(layer.get_output(0).dtype == trt.float16 for layer in network._layers)  # the FP16 graph was parsed
    assert config._pools == {trt.MemoryPoolType.WORKSPACE: petal_trt.WORKSPACE_BYTES}
    assert len(config._profiles) == 1
    assert config._profiles[0]._shapes == {"image": ((1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8)),
                                           "alpha": ((1, 1), (8, 1), (32, 1))}
    header, plan = read_engine_file(target)
    assert (header.tensorrt_version, header.gpu, header.compute_capability) == (version, "Fake GPU", "8.6")
    assert header.extra["typing"] == "strong" and header.extra["onnx_file"] == "recognizer.fp16.onnx"
    assert header.extra["precision"] == "fp16" and header.extra["rebuild"] == "petal-export default --fp16"
    assert header.extra["profile"]["alpha"] == [[1, 1], [8, 1], [32, 1]] and info["fp32_layers"] == 0
    assert read_engine_header(target) == header and b'"strongly_typed": true' in plan


@pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)
def test_exporter_writes_engines_through_the_runtime_writer_and_the_loader_reads_them(
        fake, petal_home, tmp_path, graphs, monkeypatch, version):
    """One definition of the engine file format: the exporter hands the plan and its header to
    petal_runtime's write_engine_file, and the runtime's loader reads both back unchanged and
    deserialises the engine."""
    from petal_runtime.backends.trt import loader

    written, real = [], loader.write_engine_file

    def spy(path, engine, header):
        written.append((path, bytes(memoryview(engine)), header))
        return real(path, engine, header)

    monkeypatch.setattr(loader, "write_engine_file", spy)
    trt = fake(version)
    info, target, _, _ = _build(trt, _request(graphs["sources"]["onnx-fp16"]["recognizer"]), tmp_path,
                                "recognizer.fp16.engine")
    assert [path for path, _, _ in written] == [target], "the exporter wrote the engine file itself"
    _, plan, header = written[0]
    assert loader.read_engine_file(target) == (header, plan) and loader.read_engine_header(target) == header
    assert info == {"tensorrt_version": header.tensorrt_version, "gpu": header.gpu,
                    "compute_capability": header.compute_capability, **header.extra}
    source = loader.EngineFromFile(target)
    assert source(get_memory().device_info()) is not None and source.header == header


def test_fp16_before_10_12_is_weakly_typed_with_fp32_islands(fake, petal_home, tmp_path, graphs):
    trt = fake("10.11.0.33", layers=[("/conv/Conv", "Conv", ["FLOAT"]),
                                     ("/norm/LayerNorm", "LayerNormalization", ["FLOAT"]),
                                     ("/Div_1", "Div", ["FLOAT"]), ("/Shape", "Shape", ["INT64"])])
    info, target, network, config = _build(trt, _request(graphs["sources"]["onnx"]["recognizer"],
                                                         fp32_layers=frozenset({"/Div_1"})), tmp_path)
    assert not network._strongly_typed
    assert config._flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    pinned = {layer.name for layer in network._layers if layer._precision == trt.float32}
    assert pinned == {"/norm/LayerNorm", "/Div_1"} and info["fp32_layers"] == 2
    assert all(layer._output_types == {0: trt.float32} for layer in network._layers if layer.name in pinned)
    assert network._layers[3]._output_types == {}  # the shape layer keeps its int64 output
    assert read_engine_header(target).extra["typing"] == "weak"


@pytest.mark.parametrize("version", ALL, ids=ALL_IDS)
def test_int8_engine_is_strongly_typed_from_the_qdq_graph(fake, petal_home, tmp_path, graphs, version):
    trt = fake(version)
    path = graphs["sources"]["onnx-int8-qdq"]["recognizer"]
    _, target, network, config = _build(trt, _request(path, "int8"), tmp_path, "recognizer.int8.engine")
    assert network._strongly_typed and config._flags == set()
    assert not trt_fakes.USED & (trt_fakes.REMOVED_IN_11 | set(trt_fakes.WEAK_BUILDER_FLAGS))
    kinds = {layer.type for layer in network._layers}
    assert {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE} <= kinds  # explicit quantization, no calibrator
    header = read_engine_header(target)
    assert header.extra["precision"] == "int8" and header.extra["onnx_file"] == "recognizer.qdq.onnx"


@pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)
def test_timing_cache_saved_and_reused(fake, petal_home, tmp_path, graphs, version):
    trt = fake(version)
    cache = timing_cache_path(version, DeviceInfo("Fake GPU", "8.6"))
    assert cache.parent == petal_home / "trt" and cache.name == f"timing-fake-gpu-sm8.6-trt{version}.cache"
    path = graphs["sources"]["onnx-fp16"]["recognizer"]
    _build(trt, _request(path), tmp_path, "a.engine")
    assert trt.builds[-1][1]._timing_cache._loaded == b""  # first build: a fresh cache
    assert cache.read_bytes() == b"+timings"
    _build(trt, _request(path), tmp_path, "b.engine")
    assert trt.builds[-1][1]._timing_cache._loaded == b"+timings"  # the second starts from the saved one
    assert cache.read_bytes() == b"+timings+timings"


@pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)
def test_iqa_profile_has_one_input_and_spatial_range(fake, petal_home, tmp_path, graphs, version):
    trt = fake(version)
    request = EngineRequest("iqa", graphs["sources"]["onnx-fp16"]["iqa"], "ef" * 32, "fp16",
                            iqa_profile((2, 4, 16), 112))
    _, _, _, config = _build(trt, request, tmp_path)
    assert config._profiles[0]._shapes == {"image": ((2, 3, 56, 56), (4, 3, 112, 112), (16, 3, 224, 224))}


@pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)
def test_parser_errors_are_one_line(fake, petal_home, tmp_path, graphs, version):
    fake(version, parse_errors=("unsupported op Foo",))
    rejected = rf"TensorRT {version}'s ONNX parser rejected recognizer.fp16.onnx: unsupported op Foo"
    with pytest.raises(PetalError, match=rejected):
        build_engine(_request(graphs["sources"]["onnx-fp16"]["recognizer"]), tmp_path / "x.engine", get_memory(),
                     log=lambda _: None)
    assert not (tmp_path / "x.engine").exists()


def test_trt11_fake_has_no_weak_typing_api(fake):
    """What the old builder did fails on TensorRT 11, as it does with the real bindings."""
    trt = fake(trt_fakes.TRT11)
    config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    for touch in (lambda: trt.BuilderFlag.FP16, lambda: trt.BuilderFlag.INT8,
                  lambda: trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS, lambda: trt.IInt8EntropyCalibrator2,
                  lambda: config.set_calibration_profile, lambda: setattr(config, "int8_calibrator", object()),
                  lambda: trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH):
        with pytest.raises(AttributeError):
            touch()
    assert trt.DataType.INT8 is not None and int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0


def test_strongly_typed_network_refuses_precision_flags_on_trt10(fake, petal_home, tmp_path, graphs):
    """The fake enforces TensorRT's rule, so a builder mixing the two modes would fail here too."""
    trt = fake(trt_fakes.TRT10)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None
    assert "strongly typed" in trt._build_errors[0]


def test_engines_unavailable(fake, monkeypatch):
    import petal_runtime.backends.trt as runtime_trt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "TensorRT is not installed" in petal_trt.engines_unavailable()
    fake("12.0.0.1")
    assert "outside the supported range 10.x-11.x" in petal_trt.engines_unavailable()
    fake(trt_fakes.TRT11)
    monkeypatch.setattr(runtime_trt, "probe_gpu", lambda: (None, "no CUDA driver"))
    assert petal_trt.engines_unavailable() == "no usable CUDA GPU (no CUDA driver)"
    monkeypatch.setattr(runtime_trt, "probe_gpu", lambda: (DeviceInfo("NVIDIA Fake GPU", "8.9"), ""))
    assert petal_trt.engines_unavailable() is None


# --- the exporter's engine step, end to end on tiny graphs (fake TensorRT and GPU; engines run the ONNX)

@pytest.mark.parametrize("version", ALL, ids=ALL_IDS)
def test_exporter_engine_step(fake, petal_home, tmp_path, graphs, version):
    from petal_export.builders import build_engines
    from petal_export.export import ExportResult, _Stager
    from petal_export.formats import FORMATS
    from petal_export.verify import Comparator, TorchRunner, iqa_cases, recognizer_cases
    from petal_runtime.contract import Manifest
    from petal_runtime.files import sha256_file

    fake(version)
    faces = graphs["faces"][:8]
    comparators = {
        "recognizer": Comparator("recognizer", TorchRunner(graphs["recognizer"], ["image", "alpha"], "embedding"),
                                 recognizer_cases(faces), "embedding"),
        "iqa": Comparator("iqa", TorchRunner(graphs["iqa"], ["image"], "quality"), iqa_cases(faces), "quality"),
    }
    out = tmp_path / "out"
    out.mkdir()
    manifest = Manifest(backbone="tiny", embedding_size=6, norm_mean=0.0, norm_std=255.0, iqa_threshold=0.5,
                        face_size=32)
    result = ExportResult(manifest, out, rebuild_command="petal-export ckpt.pt --fp16 --int8 --out out")
    with contextlib.ExitStack() as stack:
        stager = _Stager(stack, out, lambda _: None)
        build_engines(result, stager, [FORMATS["trt-fp16"], FORMATS["trt-int8"]], graphs["sources"], comparators,
                      (1, 4, 8), lambda _: None)
        assert all(p.name.startswith(".") for p in out.iterdir())  # staged, not yet kept
    assert sorted(p.name for p in out.iterdir()) == ["iqa.fp16.engine", "iqa.int8.engine", "recognizer.fp16.engine",
                                                      "recognizer.int8.engine"]
    assert set(result.comparisons) == {"recognizer trt-fp16", "iqa trt-fp16", "recognizer trt-int8", "iqa trt-int8"}
    assert result.comparisons["recognizer trt-fp16"].min_cosine >= 0.999
    assert result.comparisons["recognizer trt-int8"].precision == "int8"
    assert manifest.library_versions["tensorrt"] == version
    fp16_source = "onnx" if version.startswith("10.11") else "onnx-fp16"
    for graph in ("recognizer", "iqa"):
        header = read_engine_header(out / f"{graph}.fp16.engine")
        assert header.extra["source_format"] == fp16_source
        assert header.extra["onnx_sha256"] == sha256_file(graphs["sources"][fp16_source][graph])
        int8 = read_engine_header(out / f"{graph}.int8.engine")
        assert int8.extra["source_format"] == "onnx-int8-qdq" and int8.extra["typing"] == "strong"
        assert int8.extra["rebuild"] == "petal-export ckpt.pt --fp16 --int8 --out out"
    assert read_engine_header(out / "iqa.int8.engine").extra["profile"]["image"][2] == [8, 3, 64, 64]
