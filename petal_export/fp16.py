"""FP32 -> FP16 ONNX graph conversion that keeps the numerically fragile parts in FP32.

onnxconverter-common (the usual tool) is not a dependency here, so this is a small, explicit cast
pass over the graph:

- Every node runs in FP16 except the *FP32 islands*: LayerNormalization, Softmax and LogSoftmax
  (FP16 LayerNorm overflow is a known TensorRT accuracy bug for transformer backbones), and the final
  L2 normalisation of the embedding (the chain of Div/Clip/Expand/ReduceL2/Cast nodes that ends at a
  graph output and contains a norm reduction).
- Float initializers and Constant tensors become FP16 where an FP16 node reads them; an FP32 island
  keeps its own FP32 copy (LayerNorm scale and bias stay FP32).
- A Cast is inserted wherever a tensor crosses between the regions (one per tensor and direction).
- Graph inputs and outputs stay FP32, so the runtime contract (petal_runtime.contract) is unchanged:
  the image and alpha are cast to FP16 inside the graph, and an FP16 output is cast back.
- Inputs that ONNX requires to be float32 (Resize's roi and scales) are never cast.

The result passes onnx.checker with full shape inference; `convert_to_fp16` returns it with a
report of what was kept in FP32 so tests can check the islands.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# Ops computed in FP32 wherever they appear.
KEEP_FP32_OPS = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})
# Ops that may make up an output's final normalisation (walked back from each graph output).
_TAIL_OPS = frozenset({"Div", "Mul", "Clip", "Max", "Expand", "ReduceL2", "ReduceSumSquare", "ReduceSum",
                       "Sqrt", "Reciprocal", "Pow", "LpNormalization", "Cast", "Shape", "Identity"})
# A tail counts as a normalisation only if it reduces to a norm.
_NORM_OPS = frozenset({"ReduceL2", "ReduceSumSquare", "LpNormalization", "Sqrt"})
# Ops whose inputs may be of any type: never cast their inputs.
_ANY_TYPE_INPUT_OPS = frozenset({"Shape", "Size", "Cast"})
# (op, input index) pairs that ONNX types as float32 regardless of the data type.
_FLOAT32_ONLY_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


@dataclass
class Fp16Report:
    fp16_nodes: int = 0
    fp32_nodes: list[str] = field(default_factory=list)  # names of nodes kept in FP32 (islands)
    casts_added: int = 0
    clipped_weights: int = 0  # float values outside the FP16 range, clipped to +-65504

    def __str__(self) -> str:
        text = (f"{self.fp16_nodes} nodes in FP16, {len(self.fp32_nodes)} kept in FP32, "
                f"{self.casts_added} casts added")
        return text + (f", {self.clipped_weights} weights clipped to the FP16 range" if self.clipped_weights else "")


def final_normalisation_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that L2-normalise a graph output (empty if no output is normalised)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found: set[str] = set()
    for output in model.graph.output:
        tail, stack, seen = set(), [output.name], set()
        while stack:
            name = stack.pop()
            node = producer.get(name)
            if node is None or node.name in seen or node.op_type not in _TAIL_OPS:
                continue
            seen.add(node.name)
            tail.add(node.name)
            stack.extend(i for i in node.input if i)
        if any(n.op_type in _NORM_OPS for n in model.graph.node if n.name in tail):
            found |= tail
    return found


def fp32_island_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes `convert_to_fp16` keeps in FP32."""
    return {n.name for n in model.graph.node if n.op_type in KEEP_FP32_OPS} | final_normalisation_nodes(model)


def _name_nodes(model: onnx.ModelProto) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in used:
                candidate += "_"
            node.name = candidate
            used.add(candidate)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def _to_fp16(array: np.ndarray, report: Fp16Report) -> np.ndarray:
    outside = np.abs(array) > FP16_MAX
    report.clipped_weights += int(np.count_nonzero(outside & np.isfinite(array)))
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: set[str] | None = None) -> tuple[onnx.ModelProto, Fp16Report]:
    """Return an FP16 copy of `model` (FP32 inputs/outputs) and a report; `model` is not modified.

    `keep_fp32` overrides the node names kept in FP32 (default: `fp32_island_nodes`).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        raise ValueError("FP16 conversion does not handle control flow (If/Loop/Scan subgraphs)")
    _name_nodes(model)
    graph = model.graph
    report = Fp16Report()
    islands = fp32_island_nodes(model) if keep_fp32 is None else set(keep_fp32)
    types = _elem_types(model)

    # Float Constant nodes become plain tensors, converted per consumer like initializers.
    constants: dict[str, np.ndarray] = {
        init.name: numpy_helper.to_array(init) for init in graph.initializer if init.data_type == FLOAT}
    kept_nodes = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type == FLOAT and len(node.attribute) == 1:
            constants[node.output[0]] = numpy_helper.to_array(value)
        else:
            kept_nodes.append(node)
    other_inits = [i for i in graph.initializer if i.data_type != FLOAT]

    new_inits: dict[str, onnx.TensorProto] = {}
    converted: dict[tuple[str, int], str] = {}  # (tensor, target type) -> name holding it
    new_nodes: list[onnx.NodeProto] = []
    dtype = dict(types)

    def as_type(name: str, target: int) -> str:
        if dtype.get(name) == target or (name, target) in converted:
            return converted.get((name, target), name)
        if name in constants:  # a float constant: store a converted copy, no runtime Cast
            array = constants[name]
            value = _to_fp16(array, report) if target == FLOAT16 else array.astype(np.float32)
            new_name = name if target == FLOAT else f"{name}_fp16"
            new_inits[new_name] = numpy_helper.from_array(value, new_name)
        else:
            new_name = f"{name}_{'fp16' if target == FLOAT16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [new_name], to=target, name=f"Cast_{new_name}"))
            report.casts_added += 1
        converted[(name, target)] = new_name
        dtype[new_name] = target
        return new_name

    for name in constants:
        dtype[name] = FLOAT
    for node in kept_nodes:
        fp32 = node.name in islands
        target = FLOAT if fp32 else FLOAT16
        source = FLOAT16 if fp32 else FLOAT
        if node.op_type not in _ANY_TYPE_INPUT_OPS:
            protected = _FLOAT32_ONLY_INPUTS.get(node.op_type, ())
            for index, name in enumerate(node.input):
                if not name:
                    continue
                if index in protected:
                    node.input[index] = as_type(name, FLOAT)
                elif dtype.get(name) == source:
                    node.input[index] = as_type(name, target)
        if not fp32:
            _retype_attributes(node, report)
        float_in = any(dtype.get(i) in (FLOAT, FLOAT16) for i in node.input if i)
        for out in node.output:
            # Outputs typed float by shape inference (or untyped outputs of a float node) follow the region.
            if types.get(out) == FLOAT or (out not in types and float_in):
                dtype[out] = target
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            dtype[node.output[0]] = to
        if fp32:
            report.fp32_nodes.append(node.name)
        elif float_in or any(dtype.get(o) == FLOAT16 for o in node.output):
            report.fp16_nodes += 1
        new_nodes.append(node)

    # Graph outputs stay FP32: cast an FP16 result back under the output's own name.
    for output in graph.output:
        if dtype.get(output.name) == FLOAT16:
            inner = f"{output.name}_fp16_out"
            for node in new_nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT, name=f"Cast_{output.name}_out"))
            report.casts_added += 1

    used = {i for node in new_nodes for i in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend([i for i in other_inits if i.name in used])
    graph.initializer.extend(init for name, init in new_inits.items() if name in used)
    # Float constants that every reader kept in FP32 were never copied: keep their original.
    for name, array in constants.items():
        if name in used and name not in new_inits:
            graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    del graph.value_info[:]
    return _sorted(model), report


def _retype_attributes(node: onnx.NodeProto, report: Fp16Report) -> None:
    """Attributes that name or hold float32 data, for a node that now runs in FP16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(attr.t), report), attr.t.name))


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Topologically order the nodes (inserted Casts were appended after their readers)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    waiting = defaultdict(list)
    pending = {}
    order: list[onnx.NodeProto] = []
    ready: deque[int] = deque()
    for index, node in enumerate(graph.node):
        missing = {i for i in node.input if i not in available}
        pending[index] = missing
        if not missing:
            ready.append(index)
        for name in missing:
            waiting[name].append(index)
    while ready:
        index = ready.popleft()
        node = graph.node[index]
        order.append(node)
        for out in node.output:
            for reader in waiting.pop(out, ()):
                pending[reader].discard(out)
                if not pending[reader]:
                    ready.append(reader)
    if len(order) != len(graph.node):
        raise RuntimeError("FP16 conversion left the graph with a cycle or a dangling input")
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


__all__ = ["Fp16Report", "KEEP_FP32_OPS", "convert_to_fp16", "final_normalisation_nodes", "fp32_island_nodes"]
