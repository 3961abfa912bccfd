"""Inference backends, one folder each (Polygraphy style): `onnxrt` (ONNX Runtime), `trt` (TensorRT),
`ort_gpu` (ONNX Runtime's GPU providers) and `triton` (a Triton Inference Server, by URL).

Each folder's __init__ exposes `BACKEND`, a `BackendSpec`; this module finds them by walking the
package, so a new backend is a new folder and nothing else changes.

    choose_backend("auto", models_dir)   # TensorRT where importable, a GPU answers and engines exist,
                                         # else ONNX Runtime
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..errors import PetalError
from .base import BackendSpec, Runner, Served, TensorInfo

AUTO = "auto"
GRAPHS = ("recognizer", "iqa")
# How a remote backend's unusable() begins when only its missing URL stands in the way.
REMOTE_ONLY = "runs on a server"


def backends() -> dict[str, BackendSpec]:
    """Every backend folder's BACKEND, by name, highest priority first."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "BACKEND", None)
        if isinstance(spec, BackendSpec):
            found.append(spec)
    return {s.name: s for s in sorted(found, key=lambda s: -s.priority)}


def backend_names() -> list[str]:
    return [AUTO, *backends()]


def get_backend(name: str) -> BackendSpec:
    table = backends()
    for spec in table.values():
        if name == spec.name or name in spec.aliases:
            return spec
    raise PetalError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")


def remote_backend(name: str, url: str | None) -> BackendSpec | None:
    """The remote backend a server URL is for (`auto` with a URL: the one remote backend), or None
    for a local folder. A remote backend without a URL, or a URL for a local backend, is an error."""
    if url is None:
        if name != AUTO and get_backend(name).remote:
            raise PetalError(f"backend {get_backend(name).name} runs on a server: give its URL (--triton-url URL)")
        return None
    remote = [spec for spec in backends().values() if spec.remote]
    spec = get_backend(name) if name != AUTO else (remote[0] if len(remote) == 1 else None)
    if spec is None or not spec.remote:
        raise PetalError(f"a server URL ({url}) is for a server backend ({', '.join(s.name for s in remote)}), "
                         f"not {name}")
    reason = spec.unusable(Path(), "recognizer")
    if reason and not reason.startswith(REMOTE_ONLY):
        raise PetalError(f"backend {spec.name} cannot run here: {reason}")
    return spec


def choose_backend(name: str, models_dir: str | Path,
                   graphs: tuple[str, ...] = GRAPHS) -> tuple[BackendSpec, list[str]]:
    """The backend to use for `graphs` in `models_dir`, and notes on the ones passed over.

    auto: the highest-priority backend that can run every graph. A named backend that cannot run
    them is an error that says why.
    """
    models_dir = Path(models_dir)
    if name != AUTO:
        spec = get_backend(name)
        for graph in graphs:
            reason = spec.unusable(models_dir, graph)
            if reason:
                raise PetalError(f"backend {spec.name} cannot run {graph}: {reason}")
        return spec, []
    notes = []
    for spec in backends().values():
        reasons = [r for r in (spec.unusable(models_dir, g) for g in graphs) if r]
        if not reasons:
            return spec, notes
        notes.append(f"{spec.name}: {reasons[0]}")
    raise PetalError("no backend can run these models: " + "; ".join(notes))


__all__ = ["AUTO", "REMOTE_ONLY", "BackendSpec", "Runner", "Served", "TensorInfo", "backend_names", "backends",
           "choose_backend", "get_backend", "remote_backend"]
