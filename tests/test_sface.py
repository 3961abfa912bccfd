"""SFace as a native PyTorch module reproduces the OpenCV-zoo ONNX file on real aligned faces."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from petal_runtime.model_store import SFACE, model_path
from petal_train.backbones.sface import SFace, load_onnx_weights
from petal_train.model import build_recognizer
from petal_train.registry import create_model, get_spec, list_models


@pytest.fixture(scope="module")
def onnx_sface(lfw_faces):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path(SFACE)), options, providers=["CPUExecutionProvider"])


def test_native_sface_matches_onnx_runtime_on_real_faces(onnx_sface, aligned_batch):
    reference = np.concatenate([onnx_sface.run(None, {"data": face[None]})[0] for face in aligned_batch])
    model = create_model("sface")
    with torch.no_grad():
        ours = model((torch.from_numpy(aligned_batch) - 127.5) / 128.0).numpy()
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert np.abs(ours - reference).max() <= 1e-4
    assert cosine.min() >= 0.99999


def test_fresh_petal_recognizer_equals_the_base_model(aligned_batch):
    """With up = 0 the adapted recognizer is exactly SFace, whatever alpha is."""
    built = build_recognizer("sface", mode="petal")
    base = create_model("sface")
    image = torch.from_numpy(aligned_batch)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(base((image - 127.5) / 128.0), dim=1)
        for value in (0.0, 0.5, 1.0):
            got = built.recognizer.eval()(image, torch.full((len(image), 1), value))
            assert torch.allclose(got, expected, atol=1e-5)


def test_same_identity_is_closer_than_different_identities(lfw_faces):
    model = create_model("sface")
    with torch.no_grad():
        emb = torch.nn.functional.normalize(
            model((torch.from_numpy(lfw_faces.images).permute(0, 3, 1, 2).float() - 127.5) / 128.0), dim=1)
    sim = (emb @ emb.T).numpy()
    same = lfw_faces.labels[:, None] == lfw_faces.labels[None, :]
    off_diagonal = ~np.eye(len(sim), dtype=bool)
    assert sim[same & off_diagonal].mean() > sim[~same].mean() + 0.3


def test_sface_adapters_sit_on_pointwise_convs_from_the_56px_stage_and_pre_fc1():
    report = build_recognizer("sface", mode="petal", rank=8).report
    assert report.adapted_layers == tuple(f"blocks.conv_{i}.conv" for i in range(4, 15)) + ("pre_fc1",)
    assert 5.0 < report.percent < 12.0


def test_registry_lists_sface_and_rejects_unknown_names():
    from petal_runtime.errors import PetalError

    assert "sface" in list_models()
    assert get_spec("sface").embedding_size == 128
    with pytest.raises(PetalError, match="unknown backbone 'resnet9000'"):
        create_model("resnet9000")


def test_a_corrupt_onnx_file_is_a_clear_error(tmp_path):
    from petal_runtime.errors import PetalError

    bad = tmp_path / "sface.onnx"
    bad.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(PetalError, match="not a readable ONNX model"):
        load_onnx_weights(SFace(), bad)
