"""petal-export end to end on the real SFace base: a checkpoint whose adapters matter, one CLI run
with --fp16 --int8 (no TensorRT here: ONNX files, a note, exit 0), then the files are checked
independently of the exporter's own verification: names, shapes, metadata, checker, ORT against
PyTorch on real faces at batch 1 and 5, the graph's response to alpha, FP16 and INT8 cosines."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from export_support import cosines, make_checkpoint, make_iqa, ort_session, write_faces
from petal_export.cli import cli
from petal_export.formats import FORMATS
from petal_export.verify import MAX_QUALITY_ERROR, MIN_COSINE
from petal_runtime.contract import MANIFEST_FILE, METADATA_PREFIX, Manifest
from petal_runtime.files import sha256_file
from petal_runtime.model_store import SFACE

# What an INT8 export must meet on real faces: the verifier's own acceptance bounds (the exporter
# refuses a variant outside them), checked here independently of the verifier's code path.
INT8_MIN_COSINE = MIN_COSINE["int8"]
INT8_MAX_QUALITY_DIFF = MAX_QUALITY_ERROR["int8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, aligned_batch):
    from runtime_support import invoke

    root = tmp_path_factory.mktemp("export")
    iqa = make_iqa(root / "iqa.pth")
    ckpt = make_checkpoint(root / "petal.pt", iqa)
    faces = write_faces(root / "faces", aligned_batch[:5])
    calib = write_faces(root / "calib", aligned_batch)
    out = root / "out"
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, whatever is installed
    try:
        result = invoke(cli, [ckpt, "--out", out, "--fp16", "--int8", "--calib", calib, "--faces", faces,
                              "--iqa", iqa])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output
    return {"out": out, "ckpt": ckpt, "iqa": iqa, "faces": aligned_batch[:5], "output": result.output}


@pytest.fixture(scope="module")
def reference(exported):
    """The PyTorch model the exporter should have exported, built independently."""
    from petal_train.checkpoint import load_checkpoint
    from petal_train.iqa import QualityScorer, load_iqa
    from petal_train.model import build_recognizer

    ckpt = load_checkpoint(exported["ckpt"])
    built = build_recognizer("sface", rank=ckpt.lora.rank)
    ckpt.apply_to(built.recognizer.backbone, SFACE.sha256)
    scorer = QualityScorer(load_iqa(exported["iqa"])[0]).eval()
    return built.recognizer.eval(), scorer


def _embed(model, faces, alpha):
    with torch.no_grad():
        return model(torch.from_numpy(faces), torch.from_numpy(alpha)).numpy()


ALPHAS = {"0": np.zeros((5, 1), np.float32), "0.5": np.full((5, 1), 0.5, np.float32),
          "1": np.ones((5, 1), np.float32), "ramp": np.linspace(0, 1, 5, dtype=np.float32).reshape(5, 1)}


@pytest.fixture(scope="module")
def torch_embeddings(exported, reference):
    """PyTorch FP32 embeddings of the 5 faces per alpha setting (computed once: eager SFace is slow)."""
    model, _ = reference
    return {key: _embed(model, exported["faces"], alpha) for key, alpha in ALPHAS.items()}


def test_files_and_note(exported):
    out = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert names == {MANIFEST_FILE, "recognizer.onnx", "iqa.onnx", "recognizer.fp16.onnx", "iqa.fp16.onnx",
                     "recognizer.int8.onnx", "iqa.int8.onnx", "recognizer.qdq.onnx", "iqa.qdq.onnx"}
    assert "trt-fp16, trt-int8 not built" in exported["output"] and "TensorRT is not installed" in exported["output"]
    assert "recognizer onnxruntime:recognizer.onnx vs pytorch" in exported["output"]


def test_manifest(exported):
    out = exported["out"]
    manifest = Manifest.load(out)
    raw = json.loads((out / MANIFEST_FILE).read_text())
    assert raw["contract_version"] == manifest.contract_version
    assert manifest.backbone == "sface" and manifest.embedding_size == 128 and manifest.face_size == 112
    assert (manifest.norm_mean, manifest.norm_std) == (127.5, 128.0)
    assert manifest.iqa_threshold == pytest.approx(0.02) and manifest.alpha_clip is True
    assert manifest.base_sha256 == SFACE.sha256
    assert manifest.checkpoint_sha256 == sha256_file(exported["ckpt"])
    assert manifest.iqa_sha256 == sha256_file(exported["iqa"])
    assert manifest.opset == 17 and manifest.precision == "fp32"
    assert {"torch", "onnx", "onnxruntime", "numpy", "python", "petal"} <= set(manifest.library_versions)
    assert set(manifest.files) == {p.name for p in out.iterdir()} - {MANIFEST_FILE}
    for name, digest in manifest.files.items():
        assert sha256_file(out / name) == digest


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "onnx-int8", "onnx-int8-qdq"])
@pytest.mark.parametrize("graph", ["recognizer", "iqa"])
def test_graph_interface_and_metadata(exported, fmt, graph):
    model = onnx.load(str(exported["out"] / FORMATS[fmt].filename(graph)))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert model.opset_import[0].version >= 17
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    if graph == "recognizer":
        assert inputs == {"image": ["N", 3, 112, 112], "alpha": ["N", 1]}
        assert outputs == {"embedding": ["N", 128]}
    else:
        assert inputs == {"image": ["N", 3, "H", "W"]} and outputs == {"quality": ["N", 1]}
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in model.metadata_props}
    meta = Manifest.from_metadata(props)
    manifest = Manifest.load(exported["out"])
    assert meta.precision == FORMATS[fmt].precision
    expected = {**manifest.to_metadata(), METADATA_PREFIX + "precision": json.dumps(FORMATS[fmt].precision)}
    got = {k: json.loads(v) for k, v in props.items() if k.startswith(METADATA_PREFIX)}
    assert got == {k: json.loads(v) for k, v in expected.items()}


@pytest.mark.parametrize("n", [1, 5])
def test_recognizer_parity_on_real_faces(exported, torch_embeddings, n):
    session = ort_session(exported["out"] / "recognizer.onnx")
    faces = exported["faces"][:n]
    for key, alpha in ALPHAS.items():
        want = torch_embeddings[key][:n]  # samples are independent: batch-5 rows are batch-1 results
        got = session.run(None, {"image": faces, "alpha": alpha[:n]})[0]
        assert got.shape == (n, 128)
        assert np.abs(got - want).max() < 1e-4
        assert cosines(got, want).min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_graph_responds_to_alpha_per_sample(exported, torch_embeddings):
    session = ort_session(exported["out"] / "recognizer.onnx")
    faces = exported["faces"]
    e0 = session.run(None, {"image": faces, "alpha": ALPHAS["0"]})[0]
    e1 = session.run(None, {"image": faces, "alpha": ALPHAS["1"]})[0]
    assert cosines(e0, e1).max() < 0.99  # the adapters are not folded: alpha changes the embedding
    mixed = np.array([[0], [1], [0], [1], [0]], np.float32)
    em = session.run(None, {"image": faces, "alpha": mixed})[0]
    pick = np.where(mixed == 1, e1, e0)  # each sample follows its own alpha
    assert np.abs(em - pick).max() < 1e-5
    np.testing.assert_allclose(em, np.where(mixed == 1, torch_embeddings["1"], torch_embeddings["0"]), atol=1e-4)


def test_iqa_parity_dynamic_batch_and_size(exported, reference):
    _, scorer = reference
    session = ort_session(exported["out"] / "iqa.onnx")
    cropped = np.ascontiguousarray(exported["faces"][:, :, 10:90, 5:101])
    for faces in (exported["faces"][:1], exported["faces"], cropped):
        with torch.no_grad():
            want = scorer(torch.from_numpy(faces)).numpy()
        got = session.run(None, {"image": faces})[0]
        assert got.shape == (len(faces), 1)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp16_cosine(exported, reference, torch_embeddings):
    _, scorer = reference
    faces = exported["faces"]
    session = ort_session(exported["out"] / "recognizer.fp16.onnx")
    for key in ("0", "0.5", "1"):
        got = session.run(None, {"image": faces, "alpha": ALPHAS[key]})[0]
        assert got.dtype == np.float32
        assert cosines(got, torch_embeddings[key]).min() >= 0.999
    types = {i.data_type for i in onnx.load(str(exported["out"] / "recognizer.fp16.onnx")).graph.initializer
             if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert onnx.TensorProto.FLOAT16 in types
    q16 = ort_session(exported["out"] / "iqa.fp16.onnx").run(None, {"image": faces})[0]
    with torch.no_grad():
        np.testing.assert_allclose(q16, scorer(torch.from_numpy(faces)).numpy(), atol=5e-3)


def test_int8_cosine(exported, reference, torch_embeddings):
    _, scorer = reference
    faces = exported["faces"]
    graph = onnx.load(str(exported["out"] / "recognizer.int8.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20  # really quantised (QDQ)
    session = ort_session(exported["out"] / "recognizer.int8.onnx")
    worst = 1.0
    for key in ("0", "0.5", "1", "ramp"):
        got = session.run(None, {"image": faces, "alpha": ALPHAS[key]})[0]
        worst = min(worst, float(cosines(got, torch_embeddings[key]).min()))
    print(f"INT8 recognizer: worst cosine to FP32 on real faces {worst:.4f}")
    assert worst >= INT8_MIN_COSINE
    iqa_graph = onnx.load(str(exported["out"] / "iqa.int8.onnx")).graph
    assert not any(n.op_type == "QuantizeLinear" for n in iqa_graph.node), "INT8 sets carry the IQA in float"
    q8 = ort_session(exported["out"] / "iqa.int8.onnx").run(None, {"image": faces})[0]
    with torch.no_grad():
        assert np.abs(q8 - scorer(torch.from_numpy(faces)).numpy()).max() <= INT8_MAX_QUALITY_DIFF
    assert "recognizer onnxruntime:recognizer.int8.onnx vs pytorch" in exported["output"]


def test_tensorrt_qdq_graph_is_symmetric_and_close(exported, torch_embeddings):
    """The trt-int8 source: explicit quantization TensorRT accepts (INT8, zero points 0), verified on the CPU."""
    from petal_export.int8 import qdq_violations

    model = onnx.load(str(exported["out"] / "recognizer.qdq.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 20 and qdq_violations(model) == []
    assert qdq_violations(onnx.load(str(exported["out"] / "recognizer.int8.onnx")))  # the CPU one is asymmetric
    session = ort_session(exported["out"] / "recognizer.qdq.onnx")
    worst = min(float(cosines(session.run(None, {"image": exported["faces"], "alpha": ALPHAS[key]})[0],
                              torch_embeddings[key]).min()) for key in ("0", "0.5", "1", "ramp"))
    print(f"Q/DQ (TensorRT) recognizer on ONNX Runtime CPU: worst cosine to FP32 on real faces {worst:.4f}")
    assert worst >= INT8_MIN_COSINE
    assert "recognizer onnxruntime:recognizer.qdq.onnx vs pytorch" in exported["output"]
