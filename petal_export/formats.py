"""THE table of export formats: file suffix, whether a GPU is needed, which options each accepts, and
the builder that writes it (petal_export.builders; the exporter runs the selected rows' builders in order).

Every export writes the FP32 ONNX graphs (`onnx`); `--fp16` adds `onnx-fp16` and `trt-fp16`,
`--int8` adds `onnx-int8` (for ONNX Runtime on the CPU), `onnx-int8-qdq` (TensorRT's explicit
quantization input) and `trt-int8`. TensorRT engines are built from the exporter's own graphs:
trt-fp16 from onnx-fp16 (strongly typed; FP32 `onnx` with the FP16 flag on TensorRT < 10.12),
trt-int8 from onnx-int8-qdq (strongly typed), as petal_export.trt.build_plan says. A format-specific
option that no selected format accepts is an error (`--calib` without `--int8`, `--batch` without an engine
format), never silently ignored. File names are `<graph><suffix>`: recognizer.onnx, recognizer.fp16.onnx,
recognizer.int8.engine, ... (engine names follow petal_runtime.backends.trt.loader, which finds
them by these names).

Beside the files of the models folder, an export can write a model repository for a server: `triton`
(`--triton DIR`, petal_export.triton), made from the verified files once they are in place. It is a row
of the same kind (name, GPU, options), in REPOSITORIES.

This module imports neither torch nor onnx (nor do the builders, until one runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from petal_runtime.backends import GRAPHS
from petal_runtime.backends.trt.loader import ENGINE_SUFFIX
from petal_runtime.contract import IQA_FILE, RECOGNIZER_FILE
from petal_runtime.errors import PetalError

from . import builders

# Format-specific options and the command-line flags that set them.
OPTION_FLAGS = {"calib": "--calib", "batch": "--batch", "require_engine": "--require-engine",
                "triton_instances": "--triton-instances"}


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # appended to the graph name
    precision: str  # what the manifest and the graph metadata call it
    needs_gpu: bool
    options: frozenset[str]  # format-specific options this format accepts
    summary: str
    # builder(job, row): writes and verifies this format's file of each graph (petal_export.builders)
    builder: Callable[[builders.ExportJob, ExportFormat], None] = field(repr=False, compare=False)

    @property
    def is_engine(self) -> bool:
        return self.suffix.endswith(ENGINE_SUFFIX)

    def filename(self, graph: str) -> str:
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}")
        return f"{graph}{self.suffix}"


_TABLE = (
    ExportFormat("onnx", ".onnx", "fp32", False, frozenset(),
                 "FP32 ONNX graphs, verified against PyTorch (always written)", builders.build_onnx),
    ExportFormat("onnx-fp16", ".fp16.onnx", "fp16", False, frozenset(),
                 "FP16 ONNX graphs; LayerNorm, softmax and the final normalisation stay FP32",
                 builders.build_onnx_fp16),
    ExportFormat("onnx-int8", ".int8.onnx", "int8", False, frozenset({"calib"}),
                 "INT8 QDQ for ONNX Runtime on the CPU (asymmetric activations: more accurate there)",
                 builders.build_onnx_int8),
    ExportFormat("onnx-int8-qdq", ".qdq.onnx", "int8", False, frozenset({"calib"}),
                 "INT8 Q/DQ for TensorRT (symmetric, per-channel weights): the trt-int8 source",
                 builders.build_onnx_int8_qdq),
    ExportFormat("trt-fp16", ".fp16" + ENGINE_SUFFIX, "fp16", True, frozenset({"batch", "require_engine"}),
                 "TensorRT 10/11 FP16 engines, strongly typed from onnx-fp16; PETAL header", builders.build_trt),
    ExportFormat("trt-int8", ".int8" + ENGINE_SUFFIX, "int8", True, frozenset({"batch", "calib", "require_engine"}),
                 "TensorRT 10/11 INT8 engines, strongly typed from onnx-int8-qdq; PETAL header", builders.build_trt),
)
FORMATS: dict[str, ExportFormat] = {f.name: f for f in _TABLE}


@dataclass(frozen=True)
class RepositoryFormat:
    """A model repository for a server, written from the export (a folder of its own, not <graph><suffix>)."""

    name: str
    layout: str  # what the folder holds
    flag: str  # the option that selects it
    needs_gpu: bool
    options: frozenset[str]
    summary: str


REPOSITORIES: dict[str, RepositoryFormat] = {r.name: r for r in (
    RepositoryFormat("triton", "DIR/petal_{iqa,recognizer,face}/", "--triton DIR", False,
                     frozenset({"batch", "triton_instances"}),
                     "Triton model repository: IQA with alpha and recognizer (ONNX Runtime; TensorRT plans where "
                     "built), ensemble petal_face; --batch MAX is max_batch_size"),
)}

assert FORMATS["onnx"].filename("recognizer") == RECOGNIZER_FILE and FORMATS["onnx"].filename("iqa") == IQA_FILE


def selected_formats(fp16: bool = False, int8: bool = False) -> list[ExportFormat]:
    """The formats an export with these precision flags writes, in the order they are built."""
    names = ["onnx"]
    if fp16:
        names.append("onnx-fp16")
    if int8:
        names += ["onnx-int8", "onnx-int8-qdq"]
    if fp16:
        names.append("trt-fp16")
    if int8:
        names.append("trt-int8")
    return [FORMATS[n] for n in names]


def selected_repositories(triton: bool = False) -> list[RepositoryFormat]:
    return [REPOSITORIES["triton"]] if triton else []


def _selecting_flag(row: ExportFormat | RepositoryFormat) -> str:
    if isinstance(row, RepositoryFormat):
        return row.flag
    return "--int8" if row.precision == "int8" else "--fp16"


def validate_options(formats: Iterable[ExportFormat | RepositoryFormat], given: Iterable[str]) -> None:
    """Raise a one-line PetalError for an option that none of `formats` (and repositories) accepts.

    `given`: names of the format-specific options the user set explicitly (keys of OPTION_FLAGS).
    """
    formats = list(formats)
    for option in given:
        if option not in OPTION_FLAGS:
            raise ValueError(f"{option!r} is not a format-specific option")
        if any(option in f.options for f in formats):
            continue
        rows = [f for f in (*_TABLE, *REPOSITORIES.values()) if option in f.options]
        flags = list(dict.fromkeys(_selecting_flag(f) for f in rows))
        flags.sort(key=lambda f: ("--fp16", "--int8").index(f) if f in ("--fp16", "--int8") else 2)
        raise PetalError(f"{OPTION_FLAGS[option]} is not accepted by the selected formats "
                         f"({', '.join(f.name for f in formats)}); only {', '.join(f.name for f in rows)} take it "
                         f"(add {' or '.join(flags)})")


def format_table() -> str:
    """The table as text, for `petal-export --list-formats` and the README."""
    rows = [("format", "files", "GPU", "options", "")]
    for f in _TABLE:
        opts = ", ".join(OPTION_FLAGS[o] for o in sorted(f.options)) or "-"
        rows.append((f.name, f"<graph>{f.suffix}", "yes" if f.needs_gpu else "no", opts, f.summary))
    for r in REPOSITORIES.values():
        opts = ", ".join(OPTION_FLAGS[o] for o in sorted(r.options)) or "-"
        rows.append((r.name, r.layout, "yes" if r.needs_gpu else "no", opts, f"{r.flag}: {r.summary}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows).rstrip()


__all__ = ["ExportFormat", "FORMATS", "GRAPHS", "OPTION_FLAGS", "REPOSITORIES", "RepositoryFormat", "format_table",
           "selected_formats", "selected_repositories", "validate_options"]
