"""The FP16 cast pass on a tiny transformer-like graph: LayerNorm, softmax and the final L2
normalisation stay FP32, everything else is FP16, inputs and outputs stay FP32."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from export_support import cosines, ort_session
from petal_export.fp16 import convert_to_fp16, final_normalisation_nodes, fp32_island_nodes


class TinyBlock(nn.Module):
    """Linear -> LayerNorm -> self-attention (softmax) -> alpha-scaled head -> L2 normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(32, 8)

    def forward(self, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(image))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)
        out = self.head((attn @ v).mean(1)) * (1.0 + alpha)
        return F.normalize(out, dim=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyBlock().eval()
    with torch.no_grad():
        model.embed.weight.mul_(40.0)  # activations in the hundreds: FP16 LayerNorm would overflow on x^2
    x, a = torch.randn(2, 4, 16), torch.rand(2, 1)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, a), buffer, dynamo=False, opset_version=17, input_names=["image", "alpha"],
                          output_names=["embedding"],
                          dynamic_axes={"image": {0: "N"}, "alpha": {0: "N"}, "embedding": {0: "N"}})
    fp32 = onnx.load_from_string(buffer.getvalue())
    fp16, report = convert_to_fp16(fp32)
    folder = tmp_path_factory.mktemp("fp16")
    onnx.save(fp32, folder / "fp32.onnx")
    onnx.save(fp16, folder / "fp16.onnx")
    return model, fp32, fp16, report, folder


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def test_islands_found(tiny):
    _, fp32, _, report, _ = tiny
    ops = {n.name: n.op_type for n in fp32.graph.node}
    islands = fp32_island_nodes(fp32)
    assert {ops[n] for n in islands} >= {"LayerNormalization", "Softmax", "ReduceL2", "Div"}
    tail = {ops[n] for n in final_normalisation_nodes(fp32)}
    assert "ReduceL2" in tail and "LayerNormalization" not in tail and "MatMul" not in tail
    assert report.fp16_nodes > 0 and len(report.fp32_nodes) == len(islands)


def test_layernorm_softmax_and_normalisation_stay_fp32(tiny):
    _, _, fp16, _, _ = tiny
    onnx.checker.check_model(fp16, full_check=True)
    types = _types(fp16)
    kept = [n for n in fp16.graph.node if n.op_type in ("LayerNormalization", "Softmax", "ReduceL2")]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Softmax", "ReduceL2"}
    for node in kept:
        for name in list(node.input) + list(node.output):
            if name and types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                assert types[name] == onnx.TensorProto.FLOAT, f"{node.op_type} {name} is not FP32"
    matmuls = [n for n in fp16.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)
    # The contract's interface is untouched: FP32 in, FP32 out.
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in fp16.graph.input)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in fp16.graph.output)
    # Weights are FP16 except the LayerNorm's own scale and bias.
    ln = next(n for n in fp16.graph.node if n.op_type == "LayerNormalization")
    inits = {i.name: i.data_type for i in fp16.graph.initializer}
    assert all(inits[name] == onnx.TensorProto.FLOAT for name in ln.input[1:] if name in inits)
    assert sum(t == onnx.TensorProto.FLOAT16 for t in inits.values()) >= 4


def test_fp16_graph_matches(tiny):
    model, _, _, _, folder = tiny
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 16)).astype(np.float32)
    a = rng.random((6, 1)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(a)).numpy()
    got32 = ort_session(folder / "fp32.onnx").run(None, {"image": x, "alpha": a})[0]
    got16 = ort_session(folder / "fp16.onnx").run(None, {"image": x, "alpha": a})[0]
    assert got16.dtype == np.float32
    assert cosines(got32, want).min() > 0.99999
    assert cosines(got16, want).min() >= 0.999


def test_everything_fp16_when_asked(tiny):
    _, fp32, _, _, _ = tiny
    all16, report = convert_to_fp16(fp32, keep_fp32=set())
    assert report.fp32_nodes == []
    types = _types(all16)
    ln = next(n for n in all16.graph.node if n.op_type == "LayerNormalization")
    assert types[ln.input[0]] == onnx.TensorProto.FLOAT16


def test_input_model_not_modified(tiny):
    _, fp32, _, _, _ = tiny
    before = fp32.SerializeToString()
    convert_to_fp16(fp32)
    assert fp32.SerializeToString() == before
