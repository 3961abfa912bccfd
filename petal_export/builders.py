"""The builder of each export format: the function a row of petal_export.formats' table carries.

`row.builder(job, row)` writes the row's file for each graph into the export's staging area and
checks it: ONNX graphs with onnx.checker and the contract, then against PyTorch on real faces through
ONNX Runtime; engines through the runtime's TensorRT runner. Rows are built in the table's order, so
what a format is made from (the FP32 graphs; the Q/DQ graphs for trt-int8) is staged before it.

Nothing heavy is imported until a builder runs: the table stays light (no torch, no onnx).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from petal_runtime.backends import GRAPHS
from petal_runtime.contract import ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, QUALITY_OUTPUT
from petal_runtime.errors import PetalError
from petal_runtime.files import sha256_file

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .export import ExportResult, _Stager
    from .formats import ExportFormat
    from .verify import Comparator

# Graphs an INT8 set carries in float. The IQA's quality sets alpha one to one, and INT8 moved it by
# up to 0.07 on real faces at 56 px (the retrained gate), past the verifier's 0.05; in float it costs
# about 0.8 ms a face on the CPU, against the recognizer's tens.
FLOAT_IN_INT8 = {"iqa": "its INT8 quality moved by up to 0.07, more than alpha tolerates; about 0.8 ms a face"}

Log = Callable[[str], None]


class ExportJob:
    """What the builders of one export share: the PyTorch models, the real faces, the staging area,
    the log, and the PyTorch reference of each graph (run once, when its first file is verified)."""

    def __init__(self, result: ExportResult, stager: _Stager, formats: list[ExportFormat], recognizer, scorer,
                 faces: np.ndarray, calib_faces: np.ndarray | None, calib_dir: Path | None,
                 batch: tuple[int, int, int], log: Log) -> None:
        self.result, self.stager, self.formats = result, stager, formats
        self.recognizer, self.scorer = recognizer, scorer
        self.faces, self.calib_faces, self.calib_dir = faces, calib_faces, calib_dir
        self.batch, self.log = batch, log
        self.fp32_paths: dict[str, Path] = {}  # graph -> the staged FP32 graph (build_onnx, always first)
        self.comparators: dict[str, Comparator] = {}
        self._calibration: dict[str, list] | None = None

    @property
    def manifest(self):
        return self.result.manifest

    def comparator(self, graph: str) -> Comparator:
        """The PyTorch reference for `graph`, run once, when the first file of that graph is verified."""
        if graph not in self.comparators:
            import numpy as np

            from .faces import degraded_copies
            from .verify import Comparator, TorchRunner, iqa_cases, recognizer_cases

            start = time.perf_counter()
            if graph == "recognizer":
                self.comparators[graph] = Comparator(
                    graph, TorchRunner(self.recognizer, [IMAGE_INPUT, ALPHA_INPUT], EMBEDDING_OUTPUT),
                    recognizer_cases(self.faces), EMBEDDING_OUTPUT)
                if self.comparators[graph].alpha_effect() <= 1e-4:
                    self.result.notes.append("this checkpoint's adapters do not change the embedding (alpha has "
                                             "no effect yet); the graph's alpha path was checked structurally")
            else:
                iqa_faces = np.concatenate([self.faces, degraded_copies(self.faces)])  # across the quality range
                self.comparators[graph] = Comparator(graph, TorchRunner(self.scorer, [IMAGE_INPUT], QUALITY_OUTPUT),
                                                     iqa_cases(iqa_faces), QUALITY_OUTPUT)
            self.log(f"  PyTorch {graph} reference on {len(self.faces)} real faces in "
                     f"{time.perf_counter() - start:.1f} s")
        return self.comparators[graph]

    def finish(self, graph: str, model: onnx.ModelProto, fmt: ExportFormat) -> Path:
        """Stamp the contract's metadata on `model`, check it, and stage it as `fmt`'s file of `graph`."""
        from .onnx_export import alpha_reaches_output, check_graph, save_model, set_metadata

        manifest = self.manifest
        set_metadata(model, dataclasses.replace(manifest, precision=fmt.precision).to_metadata())
        check_graph(model, graph, embedding_size=manifest.embedding_size, input_size=manifest.face_size)
        if graph == "recognizer" and not alpha_reaches_output(model):
            raise PetalError(f"the exported {fmt.name} recognizer does not use its alpha input (adapters folded?)")
        return self.stager.write(fmt.filename(graph), lambda tmp: save_model(model, tmp))

    def verify(self, graph: str, path: Path, fmt: ExportFormat) -> None:
        """Run the staged ONNX file on ONNX Runtime (CPU) and hold it to the PyTorch reference."""
        from petal_runtime.backends.onnxrt import OnnxrtRunner, SessionFromOnnx

        from .verify import check_iqa, check_recognizer

        runner = OnnxrtRunner(SessionFromOnnx(path, ["CPUExecutionProvider"]),
                              name=f"onnxruntime:{fmt.filename(graph)}")
        reference = self.comparator(graph)
        start = time.perf_counter()
        comparison = reference.compare(runner, fmt.precision)
        for line in comparison.lines():
            self.log("  " + line)
        self.log(f"  verified in {time.perf_counter() - start:.1f} s")
        if graph == "recognizer":
            check_recognizer(reference, comparison)
        else:
            self.log(f"  quality rank correlation to PyTorch: {check_iqa(reference, comparison):.4f}")
        self.result.comparisons[f"{graph} {fmt.name}"] = comparison

    def calibration_feeds(self) -> dict[str, list]:
        """graph -> INT8 calibration feeds: the calibration faces and a degraded copy of each (made once)."""
        if self._calibration is None:
            import numpy as np

            from .faces import degraded_copies
            from .int8 import calibration_feeds

            calib_set = np.concatenate([self.calib_faces, degraded_copies(self.calib_faces, seed=1)])
            self._calibration = {"recognizer": calibration_feeds(calib_set, with_alpha=True),
                                 "iqa": calibration_feeds(calib_set, with_alpha=False)}
            self.log(f"  calibration: {len(self.calib_faces)} real faces from {self.calib_dir} and a degraded copy "
                     "of each")
        return self._calibration

    def staged(self, fmt: ExportFormat) -> dict[str, Path]:
        """graph -> the staged file of `fmt`."""
        return {graph: self.stager.files[fmt.filename(graph)] for graph in GRAPHS}


# ----------------------------------------------------------------------------- one builder a row


def build_onnx(job: ExportJob, fmt: ExportFormat) -> None:
    """FP32: each graph traced from PyTorch."""
    from .onnx_export import export_iqa_graph, export_recognizer_graph

    size, dim = job.manifest.face_size, job.manifest.embedding_size
    for graph in GRAPHS:
        start = time.perf_counter()
        model = (export_recognizer_graph(job.recognizer, size, dim) if graph == "recognizer"
                 else export_iqa_graph(job.scorer, size))
        job.log(f"traced {graph} to ONNX opset {model.opset_import[0].version} in {time.perf_counter() - start:.1f} s")
        job.fp32_paths[graph] = job.finish(graph, model, fmt)
        job.verify(graph, job.fp32_paths[graph], fmt)


def build_onnx_fp16(job: ExportJob, fmt: ExportFormat) -> None:
    """FP16 from the FP32 graphs (petal_export.fp16 says what stays FP32)."""
    import onnx

    from .fp16 import convert_to_fp16

    for graph in GRAPHS:
        model, report = convert_to_fp16(onnx.load(str(job.fp32_paths[graph])))
        job.log(f"  {graph} FP16: {report}")
        job.verify(graph, job.finish(graph, model, fmt), fmt)


def build_onnx_int8(job: ExportJob, fmt: ExportFormat) -> None:
    """INT8 QDQ for ONNX Runtime on the CPU."""
    from .int8 import quantize_int8

    _build_quantized(job, fmt, "INT8", quantize_int8, for_tensorrt=False)


def build_onnx_int8_qdq(job: ExportJob, fmt: ExportFormat) -> None:
    """INT8 Q/DQ for TensorRT, checked against TensorRT's Q/DQ rules."""
    from .int8 import quantize_int8_qdq

    _build_quantized(job, fmt, "INT8 Q/DQ for TensorRT", quantize_int8_qdq, for_tensorrt=True)


def _build_quantized(job: ExportJob, fmt: ExportFormat, label: str, quantize, for_tensorrt: bool) -> None:
    """Each graph quantised from its FP32 graph with the job's calibration feeds (FLOAT_IN_INT8 kept in float)."""
    import onnx

    from .int8 import qdq_violations

    feeds = job.calibration_feeds()
    for graph in GRAPHS:
        if graph in FLOAT_IN_INT8:
            job.log(f"  {graph} {label}: kept in float ({FLOAT_IN_INT8[graph]})")
            model = onnx.load(str(job.fp32_paths[graph]))
        else:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="petal-int8-") as work:
                quantized = Path(work) / "model.onnx"
                quantize(job.fp32_paths[graph], quantized, feeds[graph])
                model = onnx.load(str(quantized))
            problems = qdq_violations(model) if for_tensorrt else []
            if problems:
                raise PetalError(f"the {graph} Q/DQ graph is not what TensorRT accepts: {problems[0]}")
            job.log(f"  {graph} {label}: calibrated and quantised in {time.perf_counter() - start:.1f} s")
        job.verify(graph, job.finish(graph, model, fmt), fmt)


def build_trt(job: ExportJob, fmt: ExportFormat) -> None:
    """A TensorRT engine per graph from the ONNX files this export staged (build_engines)."""
    sources = {f.name: job.staged(f) for f in job.formats if not f.is_engine}
    build_engines(job.result, job.stager, [fmt], sources, {g: job.comparator(g) for g in GRAPHS}, job.batch,
                  job.log)


def build_engines(result: ExportResult, stager: _Stager, engine_formats: list[ExportFormat],
                  sources: dict[str, dict[str, Path]], comparators: dict, batch: tuple[int, int, int],
                  log: Log) -> None:
    """Build each engine from the ONNX file petal_export.trt.build_plan names for the TensorRT here
    (`sources`: format name -> graph -> the staged, verified file), run it through the runtime's
    TrtRunner and compare it with PyTorch like the ONNX files."""
    import onnx

    from petal_runtime.backends.trt import EngineFromFile, TrtRunner, get_memory, import_tensorrt

    from .formats import FORMATS
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


__all__ = ["FLOAT_IN_INT8", "ExportJob", "build_engines", "build_onnx", "build_onnx_fp16", "build_onnx_int8",
           "build_onnx_int8_qdq", "build_trt"]
