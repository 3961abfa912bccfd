"""TensorRT engines for TensorRT 10.x and 11.x (import-guarded: nothing here needs TensorRT until an
engine is built).

One builder, two typing modes, chosen by the installed TensorRT's version (`build_plan`):

- **Strongly typed** (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`; TensorRT >= 10.12, and every
  INT8 engine): every tensor keeps the type the ONNX graph gives it, so the precision lives in the
  graph, not in builder flags. FP16 engines are parsed from the exporter's own `<graph>.fp16.onnx`
  (whose FP32 islands - normalisation, softmax, the final L2 normalisation - stay FP32 because the
  graph says so); INT8 engines from `<graph>.qdq.onnx`, an explicit-quantization graph (symmetric
  Q/DQ, per-channel weights, calibrated on real faces by petal_export.int8). TensorRT 11 removed
  every weak-typing API (BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS, int8_calibrator,
  IInt8EntropyCalibrator2, ILayer.set_output_type); strong typing is always on there and the flag is
  accepted and ignored, so passing it is right on both.
- **Weakly typed** (TensorRT 10.0-10.11 FP16 only, e.g. older JetPack images): the FP32 graph with
  `BuilderFlag.FP16`, the FP32 islands pinned by layer precision and output type, and
  `OBEY_PRECISION_CONSTRAINTS`, as before. Weak typing was deprecated in 10.12.

No implicit (calibrator) INT8 any more: TensorRT 11 has no calibrator API, and one INT8 path for
both versions is one thing to verify.

Every engine gets one optimisation profile with a (min, opt, max) shape per named input (`image`,
and `alpha` for the recognizer), a workspace limit, and a timing cache read before and saved after
each build (per GPU and TensorRT version under ~/.cache/petal/trt). The serialised engine is written
behind the PETAL engine header (petal_runtime.backends.trt.loader: TensorRT version, GPU name,
compute capability, plus precision, typing, graph, profile, the source ONNX file's sha256 and the
command that rebuilds it), so the runtime refuses an engine from another TensorRT or GPU in one line.

Nothing here has run on a GPU in this repository: tests drive it through fake `tensorrt` modules whose
API surface follows the real 10.x and 11.x bindings (tests/trt_fakes.py, tests/test_trt_api_surface.py).
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from petal_runtime.profiles import DEFAULT_BATCH, check_batch, profile_shapes
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_write_bytes

WORKSPACE_BYTES = 1 << 30
SUPPORTED_MAJORS = (10, 11)  # the `trt` extra pins tensorrt>=10,<12
STRONG_TYPING_FROM = (10, 12)  # weak typing deprecated in 10.12, removed in 11.0
STRONG, WEAK = "strong", "weak"

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def parse_version(text: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", str(text))
    if not found:
        raise PetalError(f"cannot read TensorRT's version {text!r}")
    return int(found.group(1)), int(found.group(2))


_PIP_RANGE = f"tensorrt>={SUPPORTED_MAJORS[0]},<{SUPPORTED_MAJORS[-1] + 1}"
ENGINE_INSTALL_HINT = f"TensorRT is not installed (pip install '{_PIP_RANGE}' on a machine with an NVIDIA GPU)"


def version_problem(text: str) -> str | None:
    """None for a TensorRT this builder supports (10.x, 11.x); else why not."""
    major, minor = parse_version(text)
    if major not in SUPPORTED_MAJORS:
        return (f"TensorRT {text} is outside the supported range 10.x-11.x "
                f"(pip install '{_PIP_RANGE}')")
    return None


@dataclass(frozen=True)
class BuildPlan:
    """How an engine of `precision` is built on TensorRT `version`: typing mode and source graph format."""

    precision: str
    typing: str  # STRONG or WEAK
    source_format: str  # the petal_export.formats name of the ONNX file the engine is parsed from


def build_plan(precision: str, version: str) -> BuildPlan:
    problem = version_problem(version)
    if problem:
        raise PetalError(problem)
    if precision == "int8":
        return BuildPlan("int8", STRONG, "onnx-int8-qdq")
    if precision != "fp16":
        raise PetalError(f"engines are fp16 or int8, not {precision!r}")
    if parse_version(version) >= STRONG_TYPING_FROM:
        return BuildPlan("fp16", STRONG, "onnx-fp16")
    return BuildPlan("fp16", WEAK, "onnx")


def engines_unavailable() -> str | None:
    """None where engines can be built here; else why not (no TensorRT, one outside 10-11, no usable GPU)."""
    from petal_runtime.backends.trt import import_tensorrt, probe_gpu, tensorrt_missing

    problem = tensorrt_missing(ENGINE_INSTALL_HINT)
    if problem:
        return problem
    try:
        problem = version_problem(getattr(import_tensorrt(), "__version__", "unknown"))
    except PetalError as exc:
        problem = str(exc)
    if problem:
        return problem
    device, why = probe_gpu()
    return None if device is not None else f"no usable CUDA GPU ({why})"


def recognizer_profile(batch: tuple[int, int, int], input_size: int) -> ProfileShapes:
    return profile_shapes("recognizer", input_size, check_batch(batch))


def iqa_profile(batch: tuple[int, int, int], input_size: int) -> ProfileShapes:
    """Any crop from half to twice the face size (the graph itself takes any size)."""
    return profile_shapes("iqa", input_size, check_batch(batch))


def timing_cache_path(tensorrt_version: str, device) -> Path:
    from petal_runtime.model_store import cache_dir

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.name).strip("-").lower() or "gpu"
    return cache_dir().parent / "trt" / f"timing-{gpu}-sm{device.compute_capability}-trt{tensorrt_version}.cache"


@dataclass
class EngineRequest:
    graph: str  # "recognizer" or "iqa"
    onnx_path: Path  # the graph build_plan names: fp16 / qdq ONNX (strongly typed) or the FP32 one (weak)
    onnx_sha256: str
    precision: str  # "fp16" or "int8"
    profile: ProfileShapes
    fp32_layers: frozenset[str] = frozenset()  # weak typing only: ONNX node names to pin to FP32
    extra: dict | None = None  # more header fields (checkpoint, contract version, rebuild command)


def _import():
    from petal_runtime.backends.trt import import_tensorrt

    return import_tensorrt()


def _pin_fp32(trt, network, names: frozenset[str]) -> int:
    """Weak typing: pin normalisation/softmax layers and the given ONNX nodes' layers to FP32; returns how many."""
    kinds = {getattr(trt.LayerType, k) for k in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, k)}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        from_node = any(layer.name == n or layer.name.startswith(n + "_") or layer.name.startswith(n + " ")
                        for n in names)
        if layer.type not in kinds and not from_node:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(o.dtype not in floats for o in outputs):
            continue  # shape and index layers keep their types
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
    return pinned


def build_engine(request: EngineRequest, target: Path, memory, log: Callable[[str], None] = print) -> dict:
    """Build, serialise and write one engine (header + plan) to `target`; returns the header fields."""
    from petal_runtime.backends.trt.loader import EngineHeader, write_engine_file

    trt = _import()
    version = str(trt.__version__)
    plan = build_plan(request.precision, version)
    device = memory.device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.typing == STRONG else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PetalError(f"TensorRT {version}'s ONNX parser rejected {request.onnx_path.name}: "
                         f"{errors[0] if errors else 'no detail'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    pinned = 0
    if plan.typing == WEAK:  # TensorRT < 10.12, FP16 only: the precision comes from flags
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_fp32(trt, network, request.fp32_layers)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in request.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = timing_cache_path(version, device)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, False)

    with memory.activate():  # the build needs the GPU's context current
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PetalError(f"TensorRT {version} could not build the {request.precision} {request.graph} engine "
                         "(see its log above)")
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    extra = {"precision": request.precision, "typing": plan.typing, "graph": request.graph,
             "onnx_file": request.onnx_path.name, "onnx_sha256": request.onnx_sha256,
             "profile": {name: [list(s) for s in shapes] for name, shapes in request.profile.items()},
             "fp32_layers": pinned, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             **(request.extra or {})}
    write_engine_file(target, serialized, EngineHeader.for_device(version, device, **extra))
    what = (f"strongly typed from {request.onnx_path.name}" if plan.typing == STRONG
            else f"weakly typed (FP16 flag, {pinned} layers pinned to FP32)")
    log(f"  {request.graph} {request.precision} engine: TensorRT {version} on {device.name} "
        f"(sm {device.compute_capability}), {what}, timing cache {cache_path}")
    return {"tensorrt_version": version, "gpu": device.name, "compute_capability": device.compute_capability,
            **extra}


__all__ = ["DEFAULT_BATCH", "STRONG", "STRONG_TYPING_FROM", "SUPPORTED_MAJORS", "WEAK", "BuildPlan", "EngineRequest",
           "build_engine", "build_plan", "check_batch", "engines_unavailable", "iqa_profile", "parse_version",
           "recognizer_profile", "timing_cache_path", "version_problem"]
