"""INT8 choices that keep `petal-export default --int8` honest (issue 11, defect 8).

The retrained IQA quantised to INT8 moved quality scores by up to 0.07 on real faces at 56 px, past the
verifier's 0.05, so INT8 sets carry the IQA in float (petal_export.builders.FLOAT_IN_INT8; checked on a
real export in tests/test_export_onnx.py::test_int8_cosine); the recognizer's first convolution stays
in float too (below)."""
from __future__ import annotations


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
