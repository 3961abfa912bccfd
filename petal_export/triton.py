"""A Triton Inference Server model repository from a petal-export folder (`petal-export ... --triton DIR`).

    DIR/petal_iqa/config.pbtxt, 1/model.onnx            ONNX Runtime backend: the IQA graph with alpha
                                                       folded in as a second output (the contract's formula)
    DIR/petal_recognizer/config.pbtxt, 1/model.onnx     ONNX Runtime backend, FP32
    DIR/petal_recognizer_fp16/ and _int8/               where exported: a TensorRT plan (the engine without
                                                       its PETAL header) where engines were built, else ONNX
    DIR/petal_face/config.pbtxt, 1/                     ensemble: image -> petal_iqa -> petal_recognizer

Each model has max_batch_size (the --batch MAX), dynamic batching (preferred sizes OPT and MAX) and an
instance group; every config.pbtxt carries the contract version and the models' sha256 in `parameters`
(petal_runtime.backends.triton.repository), so the runtime checks a gallery against a server exactly as
against a folder. The repository is written beside its target and renamed into place; a non-empty
folder that is not a PETAL repository is refused before anything is exported.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from petal_runtime.backends.triton.repository import (ALPHA_OUTPUT, ENSEMBLE_MODEL, GRAPH_IO, IQA_MODEL,
                                                      MODEL_PREFIX, PRECISION_MODELS, RECOGNIZER_MODEL,
                                                      is_petal_config, parameters)
from petal_runtime.contract import (ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, IQA_FILE, QUALITY_OUTPUT,
                                    RECOGNIZER_FILE, Manifest)
from petal_runtime.errors import PetalError
from petal_runtime.files import sha256_file
from petal_runtime.profiles import DEFAULT_BATCH, check_batch

CONFIG_FILE = "config.pbtxt"
VERSION = "1"
# Dynamic batching waits this long for more requests once one is queued (a few ms against a recognizer
# call of tens of ms on a CPU, single milliseconds on a GPU).
MAX_QUEUE_DELAY_US = 2000
ALPHA_TOLERANCE = 1e-6  # the folded alpha against the contract's formula on the same quality

Log = Callable[[str], None]


@dataclass(frozen=True)
class TritonOptions:
    """How each model is served. batch: MIN:OPT:MAX as petal-export --batch (MAX: max_batch_size; OPT and MAX:
    the preferred batch sizes); instances: model instances per device (instance_group count)."""

    batch: tuple[int, int, int] = DEFAULT_BATCH
    instances: int = 1
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    kind: str = "KIND_AUTO"  # a GPU where the server has one, else the CPU

    def __post_init__(self) -> None:
        check_batch(self.batch)
        if int(self.instances) < 1:
            raise PetalError(f"--triton-instances must be at least 1, got {self.instances}")


@dataclass
class RepositoryResult:
    out_dir: Path
    models: dict[str, dict] = field(default_factory=dict)  # model name -> {backend, source, sha256}
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the target folder


def is_petal_repository(folder: Path) -> bool:
    """Every entry a petal_* model folder whose config.pbtxt carries PETAL parameters."""
    entries = [p for p in folder.iterdir()]
    if not entries:
        return False
    for entry in entries:
        if not (entry.is_dir() and entry.name.startswith(MODEL_PREFIX) and (entry / CONFIG_FILE).is_file()):
            return False
        text = (entry / CONFIG_FILE).read_text(errors="replace")
        if not is_petal_config({key: "" for key in _parameter_keys(text)}):
            return False
    return True


def _parameter_keys(text: str) -> list[str]:
    return re.findall(r'key:\s*"([^"]+)"', text)


def check_target(out_dir: str | Path) -> Path:
    """The repository folder, refused (PetalError) if it is a file or a non-empty folder that is not a
    PETAL repository. Checked before the export starts, so a wrong --triton costs nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PetalError(f"--triton {out} exists and is not a folder")
    if out.is_dir():
        try:
            if any(out.iterdir()) and not is_petal_repository(out):
                raise PetalError(f"--triton {out} is a non-empty folder that is not a PETAL Triton repository; "
                                 "give an empty or new folder (nothing there was changed)")
        except OSError as exc:
            raise PetalError(f"cannot read --triton {out} ({exc.strerror or exc})") from None
    anchor = out.resolve().parent
    while not anchor.exists():
        anchor = anchor.parent
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise PetalError(f"cannot write --triton {out}: {anchor} is not writable")
    return out


# ----------------------------------------------------------------------------- config.pbtxt


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensors(kind: str, entries: Iterable[tuple[str, list[int]]]) -> list[str]:
    items = [f'  {{ name: {_quote(name)} data_type: TYPE_FP32 dims: [ {", ".join(str(d) for d in dims)} ] }}'
             for name, dims in entries]
    return [f"{kind} [", ",\n".join(items), "]"]


def _parameters(params: dict[str, str]) -> list[str]:
    return [f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
            for key, value in params.items()]


def model_config(name: str, inputs: list[tuple[str, list[int]]], outputs: list[tuple[str, list[int]]],
                 params: dict[str, str], options: TritonOptions, backend: str | None = None,
                 platform: str | None = None, max_batch_size: int | None = None,
                 ensemble_steps: list[str] | None = None) -> str:
    lo, opt, hi = options.batch
    max_batch = hi if max_batch_size is None else max_batch_size
    lines = [f"name: {_quote(name)}"]
    if backend:
        lines.append(f"backend: {_quote(backend)}")
    if platform:
        lines.append(f"platform: {_quote(platform)}")
    lines.append(f"max_batch_size: {max_batch}")
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    if ensemble_steps is None:
        preferred = sorted({b for b in (opt, max_batch) if b <= max_batch})
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
                     f"max_queue_delay_microseconds: {int(options.max_queue_delay_us)} }}")
        lines.append(f"instance_group [ {{ count: {int(options.instances)} kind: {options.kind} }} ]")
    else:
        lines.append("ensemble_scheduling {")
        lines += ensemble_steps
        lines.append("}")
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = [f"    input_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in inputs.items()]
    maps += [f"    output_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in outputs.items()]
    return "\n".join([f"  step {{\n    model_name: {_quote(model)}\n    model_version: -1", *maps, "  }"])


# ----------------------------------------------------------------------------- the IQA with alpha


def alpha_gate_graph(manifest: Manifest):
    """ONNX of the contract's alpha formula (petal_runtime.contract.alpha_from_quality, traced through
    Manifest.alpha): quality [N, 1] -> alpha [N, 1]."""
    import torch

    from .onnx_export import BATCH_DIM, _torch_to_onnx

    class AlphaGate(torch.nn.Module):
        def forward(self, quality: torch.Tensor) -> torch.Tensor:
            return manifest.alpha(quality)

    sample = torch.tensor([[-1.0], [0.25], [0.5], [2.0]])
    return _torch_to_onnx(AlphaGate(), (sample,), [QUALITY_OUTPUT], [ALPHA_OUTPUT],
                          {QUALITY_OUTPUT: {0: BATCH_DIM}, ALPHA_OUTPUT: {0: BATCH_DIM}})


def iqa_with_alpha(iqa_path: Path, manifest: Manifest):
    """iqa.onnx with a second output, alpha, computed in the graph from its quality."""
    import onnx
    from onnx import compose

    iqa = onnx.load(str(iqa_path))
    gate = alpha_gate_graph(manifest)
    _check_gate(gate, manifest)
    gate_graph = compose.add_prefix_graph(gate.graph, "petal_alpha/", rename_inputs=False, rename_outputs=False)
    graph = compose.merge_graphs(iqa.graph, gate_graph, io_map=[(QUALITY_OUTPUT, QUALITY_OUTPUT)],
                                 outputs=[QUALITY_OUTPUT, ALPHA_OUTPUT], name=f"{iqa.graph.name}_with_alpha")
    model = onnx.helper.make_model(graph, opset_imports=list(iqa.opset_import), ir_version=iqa.ir_version,
                                   producer_name="petal-export --triton")
    for prop in iqa.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.checker.check_model(model, full_check=True)
    names = [o.name for o in model.graph.output]
    if names != [QUALITY_OUTPUT, ALPHA_OUTPUT]:
        raise PetalError(f"the IQA graph with alpha has outputs {names}, expected {[QUALITY_OUTPUT, ALPHA_OUTPUT]}")
    return model


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _check_gate(gate, manifest: Manifest) -> None:
    """The traced gate against the contract's formula on a grid of qualities, past both clipping ends."""
    grid = np.linspace(-1.0, 2.0, 61, dtype=np.float32).reshape(-1, 1)
    got = _session(gate.SerializeToString()).run([ALPHA_OUTPUT], {QUALITY_OUTPUT: grid})[0]
    want = np.asarray(manifest.alpha(grid), np.float32)
    if got.shape != want.shape or float(np.abs(got - want).max()) > ALPHA_TOLERANCE:
        raise PetalError("the traced alpha gate does not match the contract's formula "
                         f"(max difference {float(np.abs(got - want).max()):.2e})")


def verify_iqa_with_alpha(model, iqa_path: Path, manifest: Manifest, faces: np.ndarray) -> float:
    """Quality identical to iqa.onnx's and alpha = the contract's alpha of that quality, on `faces`
    (float32 NCHW 0..255, any size). Returns the largest alpha difference."""
    folded = _session(model.SerializeToString())
    plain = _session(str(iqa_path))
    quality, alpha = folded.run([QUALITY_OUTPUT, ALPHA_OUTPUT], {IMAGE_INPUT: faces})
    reference = plain.run([QUALITY_OUTPUT], {IMAGE_INPUT: faces})[0]
    if quality.shape != reference.shape or not np.array_equal(quality, reference):
        raise PetalError("the IQA graph with alpha changed the quality output "
                         f"(max difference {float(np.abs(quality - reference).max()):.2e})")
    difference = float(np.abs(alpha - np.asarray(manifest.alpha(quality), np.float32)).max())
    if alpha.shape != quality.shape or difference > ALPHA_TOLERANCE:
        raise PetalError(f"the folded alpha differs from the contract's formula by {difference:.2e}")
    return difference


def _check_faces(size: int) -> list[np.ndarray]:
    """Deterministic face-sized images (a ramp plus seeded noise) at the face size and at half of it."""
    rng = np.random.default_rng(0)
    batches = []
    for side in (size, max(8, size // 2)):
        ramp = np.linspace(0.0, 255.0, 3 * side * side, dtype=np.float32).reshape(1, 3, side, side)
        noise = rng.normal(0.0, 40.0, (4, 3, side, side)).astype(np.float32)
        batches.append(np.clip(ramp + noise, 0.0, 255.0).astype(np.float32))
    return batches


# ----------------------------------------------------------------------------- the repository


def _recognizer_variants(models_dir: Path, manifest: Manifest) -> dict[str, tuple[str, str]]:
    """precision -> (source file, "onnxruntime" or "tensorrt") for the recognizer models this export can
    fill: FP32 always; FP16 and INT8 from a TensorRT engine where one was built, else from its ONNX graph."""
    from .formats import FORMATS

    variants = {"fp32": (RECOGNIZER_FILE, "onnxruntime")}
    for precision, engine_format, onnx_format in (("fp16", "trt-fp16", "onnx-fp16"),
                                                 ("int8", "trt-int8", "onnx-int8")):
        engine = FORMATS[engine_format].filename("recognizer")
        graph = FORMATS[onnx_format].filename("recognizer")
        if engine in manifest.files and (models_dir / engine).is_file():
            variants[precision] = (engine, "tensorrt")
        elif graph in manifest.files and (models_dir / graph).is_file():
            variants[precision] = (graph, "onnxruntime")
    return variants


def write_repository(models_dir: str | Path, out_dir: str | Path, options: TritonOptions | None = None,
                     log: Log | None = print) -> RepositoryResult:
    """Write the Triton repository for the petal-export folder `models_dir` into `out_dir`."""
    from petal_runtime.backends.trt.loader import read_engine_file
    from petal_runtime.models import fingerprint, verify_file

    log = log or (lambda _line: None)
    options = options or TritonOptions()
    models_dir = Path(models_dir)
    out = check_target(out_dir)
    start = time.perf_counter()
    manifest = Manifest.load(models_dir)
    prints = fingerprint(models_dir, manifest)  # verifies recognizer.onnx and iqa.onnx against the manifest
    size, dim = int(manifest.face_size), int(manifest.embedding_size)
    result = RepositoryResult(out)
    lo, opt, hi = options.batch

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.petal-", dir=out.parent))
    try:
        def model_dir(name: str) -> Path:
            (staging / name / VERSION).mkdir(parents=True)
            return staging / name

        def params(source: str, model_file: Path | None, precision: str = "fp32", **extra: str) -> dict[str, str]:
            values = parameters(manifest, prints.models_sha256, source,
                                sha256_file(model_file) if model_file is not None else "", precision)
            return dict(sorted({**values, **{f"petal.{k}": v for k, v in extra.items()}}.items()))

        # petal_iqa: the IQA with alpha folded in
        folded = iqa_with_alpha(models_dir / IQA_FILE, manifest)
        difference = max(verify_iqa_with_alpha(folded, models_dir / IQA_FILE, manifest, faces)
                         for faces in _check_faces(size))
        folder = model_dir(IQA_MODEL)
        target = folder / VERSION / "model.onnx"
        target.write_bytes(folded.SerializeToString())
        (inputs, outputs) = GRAPH_IO["iqa"]
        (folder / CONFIG_FILE).write_text(model_config(
            IQA_MODEL, [(inputs[0], [3, -1, -1])], [(name, [1]) for name in outputs],
            params(f"{IQA_FILE} + alpha", target), options, backend="onnxruntime"))
        result.models[IQA_MODEL] = {"backend": "onnxruntime", "source": f"{IQA_FILE} + alpha",
                                    "sha256": sha256_file(target)}
        log(f"wrote {IQA_MODEL}: {IQA_FILE} with alpha folded in (max difference to the contract's formula "
            f"{difference:.1e})")

        # petal_recognizer and its FP16/INT8 variants
        recognizer_inputs = [(IMAGE_INPUT, [3, size, size]), (ALPHA_INPUT, [1])]
        recognizer_outputs = [(EMBEDDING_OUTPUT, [dim])]
        for precision, (source, backend) in _recognizer_variants(models_dir, manifest).items():
            name = PRECISION_MODELS[precision]
            verify_file(models_dir, source, manifest)
            folder = model_dir(name)
            extra: dict[str, str] = {}
            max_batch = hi
            if backend == "tensorrt":
                header, engine = read_engine_file(models_dir / source)
                target = folder / VERSION / "model.plan"
                target.write_bytes(engine)
                profile_max = _profile_max(header.extra.get("profile"))
                if profile_max is not None and profile_max < max_batch:
                    max_batch = profile_max
                    result.notes.append(f"{name}: max_batch_size {profile_max}, the engine's profile maximum")
                extra = {"tensorrt_version": header.tensorrt_version, "gpu": header.gpu,
                         "compute_capability": header.compute_capability}
                config = model_config(name, recognizer_inputs, recognizer_outputs,
                                      params(source, target, precision, **extra), options,
                                      backend="tensorrt", platform="tensorrt_plan", max_batch_size=max_batch)
            else:
                target = folder / VERSION / "model.onnx"
                shutil.copyfile(models_dir / source, target)
                config = model_config(name, recognizer_inputs, recognizer_outputs,
                                      params(source, target, precision), options, backend="onnxruntime")
            (folder / CONFIG_FILE).write_text(config)
            result.models[name] = {"backend": backend, "source": source, "sha256": sha256_file(target),
                                   "max_batch_size": max_batch, **extra}
            log(f"wrote {name}: {source} on the {backend} backend")

        # petal_face: the ensemble
        folder = model_dir(ENSEMBLE_MODEL)
        steps = [_step(IQA_MODEL, {IMAGE_INPUT: IMAGE_INPUT},
                       {QUALITY_OUTPUT: QUALITY_OUTPUT, ALPHA_OUTPUT: ALPHA_OUTPUT}),
                 _step(RECOGNIZER_MODEL, {IMAGE_INPUT: IMAGE_INPUT, ALPHA_INPUT: ALPHA_OUTPUT},
                       {EMBEDDING_OUTPUT: EMBEDDING_OUTPUT})]
        (folder / CONFIG_FILE).write_text(model_config(
            ENSEMBLE_MODEL, [(IMAGE_INPUT, [3, size, size])],
            [(EMBEDDING_OUTPUT, [dim]), (QUALITY_OUTPUT, [1]), (ALPHA_OUTPUT, [1])],
            params(f"ensemble of {IQA_MODEL} and {RECOGNIZER_MODEL}", None), options, platform="ensemble",
            max_batch_size=min(hi, result.models[RECOGNIZER_MODEL]["max_batch_size"]), ensemble_steps=steps))
        result.models[ENSEMBLE_MODEL] = {"backend": "ensemble", "source": f"{IQA_MODEL} -> {RECOGNIZER_MODEL}"}
        log(f"wrote {ENSEMBLE_MODEL}: ensemble image -> {IQA_MODEL} -> alpha -> {RECOGNIZER_MODEL}")
        _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote Triton repository {out} ({len(result.models)} models, max_batch_size {hi}, preferred {opt}/{hi}, "
        f"{options.instances} instance(s) each) in {time.perf_counter() - start:.1f} s")
    for note in result.notes:
        log(f"note: {note}")
    return result


def _profile_max(profile) -> int | None:
    try:
        return int(profile[IMAGE_INPUT][2][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _replace(staging: Path, out: Path) -> None:
    """Rename the finished repository into place: into a new or empty folder, or over a PETAL repository."""
    os.chmod(staging, 0o777 & ~_umask())
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    from petal_runtime.files import current_umask

    return current_umask()


__all__ = ["CONFIG_FILE", "MAX_QUEUE_DELAY_US", "RepositoryResult", "TritonOptions", "alpha_gate_graph",
           "check_target", "is_petal_repository", "iqa_with_alpha", "model_config", "verify_iqa_with_alpha",
           "write_repository"]
