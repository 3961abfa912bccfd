"""PyTorch -> ONNX for the two graphs of the contract, with metadata, checker and shape inference.

recognizer: image float32 [N, 3, S, S] RGB 0..255 and alpha float32 [N, 1] -> embedding [N, D]
            (normalisation and the final L2 normalisation inside; twin adapters mixed per sample)
iqa:        image float32 [N, 3, H, W] RGB 0..255 -> quality [N, 1] (any batch, any spatial size)

The TorchScript exporter (dynamo=False) at opset 17 is used: it records `alpha` as a real input
because PetalRecognizer binds the very tensor passed in to the adapters' shared gate.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

from petal_runtime.contract import ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, QUALITY_OUTPUT
from petal_runtime.errors import PetalError
from petal_runtime.files import first_line

OPSET = 17
BATCH_DIM = "N"


def _torch_to_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def _dummy_image(size: int) -> torch.Tensor:
    """A fixed tracing input (no RNG: the same checkpoint always gives the same bytes)."""
    ramp = torch.linspace(0.0, 255.0, 2 * 3 * size * size)
    return ramp.reshape(2, 3, size, size)


def _set_dims(value: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def export_recognizer_graph(recognizer: torch.nn.Module, input_size: int, embedding_size: int) -> onnx.ModelProto:
    image = _dummy_image(input_size)
    alpha = torch.tensor([[0.25], [0.75]])
    model = _torch_to_onnx(recognizer, (image, alpha), [IMAGE_INPUT, ALPHA_INPUT], [EMBEDDING_OUTPUT],
                           {IMAGE_INPUT: {0: BATCH_DIM}, ALPHA_INPUT: {0: BATCH_DIM}, EMBEDDING_OUTPUT: {0: BATCH_DIM}})
    # The exporter cannot see through F.normalize's shape; the contract says [N, D].
    _set_dims(model.graph.output[0], [BATCH_DIM, embedding_size])
    return model


def export_iqa_graph(scorer: torch.nn.Module, input_size: int) -> onnx.ModelProto:
    image = _dummy_image(input_size)
    model = _torch_to_onnx(scorer, (image,), [IMAGE_INPUT], [QUALITY_OUTPUT],
                           {IMAGE_INPUT: {0: BATCH_DIM, 2: "H", 3: "W"}, QUALITY_OUTPUT: {0: BATCH_DIM}})
    _set_dims(model.graph.output[0], [BATCH_DIM, 1])
    return model


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the PETAL keys in metadata_props (other keys are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for key, value in keep + sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def check_graph(model: onnx.ModelProto, graph: str, embedding_size: int | None = None,
                input_size: int | None = None) -> None:
    """onnx.checker (full: strict shape inference) and the contract's names, types and shapes.

    Raises PetalError naming what is off. `graph` is "recognizer" or "iqa".
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PetalError(f"exported {graph} graph fails the ONNX checker: {first_line(exc, 200)}") from None
    if model.opset_import[0].version < OPSET:
        raise PetalError(f"exported {graph} graph has opset {model.opset_import[0].version}, need >= {OPSET}")
    inputs = {i.name: i for i in inferred.graph.input}
    outputs = {o.name: o for o in inferred.graph.output}
    if graph == "recognizer":
        expected_in = {IMAGE_INPUT: [BATCH_DIM, 3, input_size, input_size], ALPHA_INPUT: [BATCH_DIM, 1]}
        expected_out = {EMBEDDING_OUTPUT: [BATCH_DIM, embedding_size]}
    else:
        expected_in = {IMAGE_INPUT: [BATCH_DIM, 3, "H", "W"]}
        expected_out = {QUALITY_OUTPUT: [BATCH_DIM, 1]}
    for kind, have, want in (("inputs", inputs, expected_in), ("outputs", outputs, expected_out)):
        if set(have) != set(want):
            raise PetalError(f"exported {graph} graph has {kind} {sorted(have)}, the contract wants {sorted(want)}")
        for name, dims in want.items():
            value = have[name]
            if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise PetalError(f"{graph} {name} is not float32 in the exported graph")
            if _dims(value) != dims:
                raise PetalError(f"{graph} {name} has shape {_dims(value)} in the exported graph, expected {dims}")


def alpha_reaches_output(model: onnx.ModelProto) -> bool:
    """True if a path of nodes leads from the `alpha` input to the `embedding` output."""
    reached = {ALPHA_INPUT}
    for node in model.graph.node:  # nodes are topologically ordered in a valid graph
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return EMBEDDING_OUTPUT in reached


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    if model.ByteSize() >= 2 ** 31 - 1:
        raise PetalError("the graph is over 2 GB, which a single ONNX file cannot hold")
    onnx.save_model(model, str(path))


__all__ = ["OPSET", "alpha_reaches_output", "check_graph", "export_iqa_graph", "export_recognizer_graph",
           "save_model", "set_metadata"]
