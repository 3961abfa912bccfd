"""Backends: the ONNX Runtime runner on exported graphs, backend choice, and the TensorRT engine header.

The TensorRT runner's control flow under fake 10.x and 11.x `tensorrt` modules and fake CUDA
bindings is in test_trt_runner.py; the onnxruntime-gpu backend in test_ort_gpu_backend.py.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from petal_runtime.backends import choose_backend, get_backend
from petal_runtime.backends.onnxrt import OnnxrtRunner, SessionFromOnnx
from petal_runtime.backends.onnxrt import loader as ort_loader
from petal_runtime.backends.trt import loader as trt_loader
from petal_runtime.backends.trt.loader import (EngineHeader, check_engine_header, read_engine_file, read_engine_header,
                                               write_engine_file)
from petal_runtime.backends.trt.memory import DeviceInfo, get_memory, probe_gpu
from petal_runtime.errors import PetalError


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


@pytest.mark.parametrize("case, feed, message", [
    ("wrong size", {"image": np.zeros((2, 3, 64, 64), np.float32), "alpha": np.zeros((2, 1), np.float32)},
     r"image has shape \[2, 3, 64, 64\], expected float32 \[N, 3, 112, 112\]"),
    ("wrong rank", {"image": np.zeros((3, 112, 112), np.float32), "alpha": np.zeros((1, 1), np.float32)},
     "image has shape"),
    ("strings", {"image": np.full((1, 3, 112, 112), "x"), "alpha": np.zeros((1, 1), np.float32)},
     "image is <U1, expected float32"),
    ("complex", {"image": np.zeros((1, 3, 112, 112), np.complex64), "alpha": np.zeros((1, 1), np.float32)},
     "image is complex64"),
    ("a list", {"image": [[0.0]], "alpha": np.zeros((1, 1), np.float32)}, "must be a numpy array, got list"),
    ("batches differ", {"image": np.zeros((2, 3, 112, 112), np.float32), "alpha": np.zeros((3, 1), np.float32)},
     "disagree on the batch size"),
])
def test_onnxrt_runner_checks_dtype_and_shape_not_only_names(models_dir, case, feed, message):
    """The caller's mistakes are one-line PetalErrors (FeedError) naming what was expected, not onnxruntime's."""
    from petal_runtime.errors import FeedError, InternalError

    with OnnxrtRunner(SessionFromOnnx(models_dir / "recognizer.onnx")) as runner:
        with pytest.raises(FeedError, match=message) as caught:
            runner.infer(feed)
        assert isinstance(caught.value, PetalError) and "\n" not in str(caught.value)
        ok = {"image": np.zeros((1, 3, 112, 112), np.float64), "alpha": np.zeros((1, 1), np.float16)}
        assert runner.infer(ok)["embedding"].shape == (1, 128)  # same-kind casts still run
    with pytest.raises(InternalError, match="not active"):  # a bug in whoever drives the runner
        runner.infer(ok)
    assert not issubclass(InternalError, PetalError)


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
