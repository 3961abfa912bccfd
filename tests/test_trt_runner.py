"""The TensorRT runner and engine loader under a fake `tensorrt` of each flavour (10.x and 11.x,
tests/trt_fakes.py), with fake CUDA bindings whose 'device' memory is host memory.

This checks only what the runner asks of TensorRT (profiles, shapes, addresses, execute_async_v3),
that it touches no name the version lacks, and what it asks of the memory bindings (allocation,
copies through real pointers via ctypes); nothing here claims the real library was exercised.
"""
from __future__ import annotations

import json
import shutil
import sys
import types
import warnings

import numpy as np
import pytest

import runtime_support as rs
import trt_fakes
from trt_fakes import IQA_SPEC, RECOGNIZER_SPEC, expected_embedding, list_in_manifest, write_spec_engine
from petal_runtime.backends import choose_backend
from petal_runtime.backends.trt.loader import EngineFromFile
from petal_runtime.backends.trt.memory import CudaPythonMemory, DeviceInfo, PycudaMemory, get_memory, probe_gpu
from petal_runtime.backends.trt.runner import TrtRunner
from petal_runtime.errors import PetalError

pytestmark = pytest.mark.parametrize("version", trt_fakes.BOTH, ids=trt_fakes.BOTH_IDS)


@pytest.fixture
def fake_gpu(monkeypatch, version):
    from petal_runtime.backends import trt as trt_backend

    trt, host = trt_fakes.install(monkeypatch, version)
    yield types.SimpleNamespace(host=host, trt=trt, version=version)
    trt_backend._gpu.cache_clear()


@pytest.mark.parametrize("batch", [1, 5, 32, 70])
def test_runner_profiles_shapes_addresses_and_chunks(fake_gpu, tmp_path, batch):
    path = write_spec_engine(tmp_path, "recognizer.engine", RECOGNIZER_SPEC, fake_gpu.version)
    memory = get_memory()
    assert isinstance(memory, CudaPythonMemory) and memory.device_info() == DeviceInfo("Fake GPU", "8.6")
    rng = np.random.default_rng(batch)
    image = rng.uniform(0, 255, (batch, 3, 112, 112)).astype(np.float32)
    alpha = rng.uniform(0, 1, (batch, 1)).astype(np.float32)
    trt_fakes.USED.clear()
    with TrtRunner(EngineFromFile(path), memory=memory) as runner:
        assert runner.max_batch == 32 and runner.min_batch == 1
        assert {t.name for t in runner.inputs()} == {"image", "alpha"}
        assert runner.outputs()[0].shape == (None, 128)
        out = runner.infer({"image": image, "alpha": alpha})
        context = fake_gpu.trt.contexts[-1]
    assert not trt_fakes.USED & trt_fakes.REMOVED_IN_11
    np.testing.assert_allclose(out["embedding"], expected_embedding(image, alpha), rtol=1e-5, atol=1e-6)
    chunks = [min(32, batch - s) for s in range(0, batch, 32)]
    shapes = [entry for entry in context._log if entry[0] == "shape" and entry[1] == "image"]
    # First the buffers are sized at the profile's maximum, then each chunk sets its own shape.
    assert [s[2][0] for s in shapes] == [32, *chunks]
    assert sum(1 for entry in context._log if entry[0] == "execute") == len(chunks)
    assert set(context._addresses) == {"image", "alpha", "embedding"}
    assert not fake_gpu.host.blocks.keys() & set(context._addresses.values()), "device buffers not freed"


def test_runner_pads_below_the_profile_minimum_and_rejects_outside_shapes(fake_gpu, tmp_path):
    spec = json.loads(json.dumps(RECOGNIZER_SPEC))
    spec["profiles"] = 2  # with several profiles the runner selects profile 0 on its stream
    for name in ("image", "alpha"):
        spec["tensors"][name]["profile"][0][0] = 4  # minimum batch 4
    path = write_spec_engine(tmp_path, "recognizer.engine", spec, fake_gpu.version)
    image = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    alpha = np.array([[0.2], [0.9]], np.float32)
    with TrtRunner(EngineFromFile(path), memory=get_memory()) as runner:
        out = runner.infer({"image": image, "alpha": alpha})
        assert out["embedding"].shape == (2, 128)
        np.testing.assert_allclose(out["embedding"], expected_embedding(image, alpha), rtol=1e-5, atol=1e-6)
        # The binding's fixed dimensions are checked before the profile (Runner.check_feed).
        wrong_size = r"input image has shape \[2, 3, 96, 96\], expected float32 \[N, 3, 112, 112\]"
        with pytest.raises(PetalError, match=wrong_size):
            runner.infer({"image": np.zeros((2, 3, 96, 96), np.float32), "alpha": alpha})
        empty = runner.infer({"image": image[:0], "alpha": alpha[:0]})
        assert empty["embedding"].shape == (0, 128)
        context = fake_gpu.trt.contexts[-1]
    assert context._log[0] == ("profile", 0, 7)  # 7: the fake cudart's stream handle
    # Two real faces went in as a batch of four (the profile's minimum), padded with the last one.
    assert ("shape", "image", (4, 3, 112, 112)) in context._log


def test_runner_with_pycuda_pushes_the_context(monkeypatch, tmp_path, version):
    host = trt_fakes.Host()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_fakes.make_tensorrt(version))
    pycuda = types.ModuleType("pycuda")
    driver = trt_fakes.fake_pycuda(host)
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    memory = get_memory()
    assert isinstance(memory, PycudaMemory)
    path = write_spec_engine(tmp_path, "iqa.engine", IQA_SPEC, version)
    image = np.random.default_rng(1).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    with TrtRunner(EngineFromFile(path), memory=memory) as runner:
        out = runner.infer({"image": image})
    np.testing.assert_allclose(out["quality"][:, 0], image.mean(axis=(1, 2, 3)) / 255, rtol=1e-5)
    assert driver.Context.stack == []


def test_engine_from_another_tensorrt_or_gpu_is_refused_in_one_line(fake_gpu, tmp_path):
    memory = get_memory()
    other = "10.16.1.11" if fake_gpu.version.startswith("11") else "11.4.0.106"
    rebuild = "petal-export default --fp16 --int8 --batch 1:8:32 --out models"
    old = write_spec_engine(tmp_path, "a.engine", RECOGNIZER_SPEC, other, rebuild=rebuild)
    with pytest.raises(PetalError) as info:
        TrtRunner(EngineFromFile(old), memory=memory).activate()
    message = str(info.value)
    assert "\n" not in message and message.endswith(f"rebuild it here with: {rebuild}")
    assert f"built with TensorRT {other}, this machine has {fake_gpu.version}" in message
    other_gpu = write_spec_engine(tmp_path, "b.engine", RECOGNIZER_SPEC, fake_gpu.version, cc="9.0")
    with pytest.raises(PetalError, match=r"compute capability 9.0.*rebuild it here with: petal-export CHECKPOINT"):
        TrtRunner(EngineFromFile(other_gpu), memory=memory).activate()
    broken = write_spec_engine(tmp_path, "c.engine", {"broken": True}, fake_gpu.version)
    with pytest.raises(PetalError, match="could not deserialise"):
        TrtRunner(EngineFromFile(broken), memory=memory).activate()


def test_cuda_python_without_driver_is_a_clean_probe(monkeypatch, version):
    trt_fakes.install_cudart(monkeypatch, trt_fakes.fake_cudart(trt_fakes.Host(), error="cudaErrorInsufficientDriver"))
    monkeypatch.setitem(sys.modules, "tensorrt", trt_fakes.make_tensorrt(version))
    device, why = probe_gpu()
    assert device is None and "driver version is insufficient" in why
    with pytest.raises(PetalError, match="cudaGetDeviceCount failed"):
        get_memory("cuda-python")
    with pytest.raises(PetalError, match="unknown device-memory binding"):
        get_memory("opencl")


def test_auto_picks_tensorrt_when_library_gpu_and_engines_exist(fake_gpu, tmp_path):
    """The whole Models path on the TensorRT backend (fake library and GPU, real header and memory code)."""
    from conftest import require_models

    from petal_runtime.models import Models

    require_models()
    models_dir = rs.exported_models()
    for name in ("recognizer.onnx", "iqa.onnx", "manifest.json"):
        shutil.copy(models_dir / name, tmp_path / name)
    spec, _ = choose_backend("auto", tmp_path)
    assert spec.name == "onnxruntime"  # no engines yet
    write_spec_engine(tmp_path, "recognizer.fp16.engine", RECOGNIZER_SPEC, fake_gpu.version)
    write_spec_engine(tmp_path, "iqa.fp16.engine", IQA_SPEC, fake_gpu.version)
    list_in_manifest(tmp_path, "recognizer.fp16.engine", "iqa.fp16.engine")
    spec, _ = choose_backend("auto", tmp_path)
    assert spec.name == "tensorrt"
    with Models(tmp_path) as models:
        assert models.backend.name == "tensorrt"
        assert models.description() == "tensorrt (Fake GPU, cuda-python)"
        faces = np.random.default_rng(2).uniform(0, 255, (40, 3, 112, 112)).astype(np.float32)
        q = models.quality(faces)
        e = models.embed(faces, models.alpha(q))
    assert q.shape == (40,) and e.shape == (40, 128)
    np.testing.assert_allclose(e, expected_embedding(faces, models.alpha(q)[:, None]), rtol=1e-5, atol=1e-6)


def test_probe_warnings_do_not_leak(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device, why = probe_gpu()
    assert device == DeviceInfo("Fake GPU", "8.6") and why == ""
