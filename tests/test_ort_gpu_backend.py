"""The onnxruntime-gpu backend (ONNX Runtime's TensorRT and CUDA execution providers).

This machine's ONNX Runtime is the CPU build, so the GPU providers are made to look available and
then to fail the way onnxruntime-gpu does without a driver: the session quietly runs on the CPU. The
tests check the graph chosen per precision, the provider options (strongly typed TensorRT, profiles
per named input, caches), and that the fallback is reported; not that a GPU ran anything.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.backends import choose_backend, get_backend
from petal_runtime.backends.onnxrt import loader as ort_loader
from petal_runtime.backends.ort_gpu import loader as gpu_loader
from petal_runtime.errors import PetalError

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from conftest import require_models

    require_models()
    source = rs.exported_models()
    folder = tmp_path_factory.mktemp("models")
    for name in ("recognizer.onnx", "iqa.onnx", "manifest.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture
def gpu_build(monkeypatch):
    """ONNX Runtime that lists the GPU providers but cannot start them (onnxruntime-gpu without a GPU)."""
    import onnxruntime as ort

    real = ort.InferenceSession
    asked = []

    def session(path, options=None, providers=None):
        asked.append(providers)
        return real(path, options, providers=[p for p in providers if (p[0] if isinstance(p, tuple) else p) == CPU])

    monkeypatch.setattr(ort_loader, "available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


def test_cpu_only_onnxruntime_is_passed_over_with_the_reason(models_dir):
    spec = get_backend("ort-gpu")
    assert spec.name == "onnxruntime-gpu"
    assert "no GPU execution provider" in spec.unusable(models_dir, "recognizer")
    refused = "backend onnxruntime-gpu cannot run recognizer: .*pip install onnxruntime-gpu"
    with pytest.raises(PetalError, match=refused):
        choose_backend("onnxruntime-gpu", models_dir)
    assert choose_backend("auto", models_dir)[0].name == "onnxruntime"  # auto never picks it


def test_graph_per_precision(models_dir):
    assert gpu_loader.gpu_graph_path(models_dir, "recognizer").name == "recognizer.onnx"
    assert gpu_loader.gpu_graph_path(models_dir, "recognizer", "fp16").name == "recognizer.fp16.onnx"
    assert gpu_loader.gpu_graph_path(models_dir, "recognizer", "int8").name == "recognizer.qdq.onnx"  # not .int8.onnx
    assert gpu_loader.gpu_graph_path(models_dir, "iqa", "int8").name == "iqa.onnx"  # no variant here: FP32
    with pytest.raises(PetalError, match="precision must be"):
        gpu_loader.gpu_graph_path(models_dir, "recognizer", "int4")


def test_tensorrt_provider_options(models_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    options = gpu_loader.tensorrt_options(models_dir, "recognizer", (2, 8, 16))
    assert options["trt_fp16_enable"] is False and options["trt_int8_enable"] is False  # strongly typed
    assert options["trt_profile_min_shapes"] == "image:2x3x112x112,alpha:2x1"
    assert options["trt_profile_opt_shapes"] == "image:8x3x112x112,alpha:8x1"
    assert options["trt_profile_max_shapes"] == "image:16x3x112x112,alpha:16x1"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "home" / "ort-trt")
    iqa = gpu_loader.tensorrt_options(models_dir, "iqa")
    assert iqa["trt_profile_min_shapes"] == "image:1x3x56x56" and iqa["trt_profile_max_shapes"] == "image:32x3x224x224"
    with pytest.raises(PetalError, match="not OpenVINOExecutionProvider"):
        gpu_loader.gpu_providers(models_dir, "recognizer", ["OpenVINOExecutionProvider"])


def test_silent_cpu_fallback_is_reported(models_dir, gpu_build, monkeypatch, tmp_path):
    from petal_runtime.models import Models

    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    with pytest.warns(RuntimeWarning, match="TensorrtExecutionProvider, CUDAExecutionProvider could not start"):
        models = Models(models_dir, backend="onnxruntime-gpu")
    with models:
        assert models.backend.name == "onnxruntime-gpu"
        assert models.description().startswith("onnxruntime-gpu (CPU; ") and "runs on CPUExecutionProvider" in \
            models.description()
        faces = np.random.default_rng(0).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
        assert models.embed_gated(faces).shape == (3, 128)
    names = [[p[0] if isinstance(p, tuple) else p for p in providers] for providers in gpu_build]
    assert names == [[TRT, CUDA, CPU]] * 2
    trt_options = gpu_build[0][0][1]
    assert trt_options["trt_profile_max_shapes"].startswith("image:32x3x112x112")
    assert (tmp_path / "home" / "ort-trt").is_dir()


def test_cuda_only(models_dir, gpu_build, monkeypatch, tmp_path):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    runner = get_backend("onnxruntime-gpu").create(models_dir, "iqa", providers=[CUDA])
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider could not start"):
        runner.activate()
    try:
        assert gpu_build[-1] == [(CUDA, {"device_id": 0}), CPU]
    finally:
        runner.deactivate()
