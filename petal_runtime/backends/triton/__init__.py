"""Triton Inference Server backend: the models run on a server, by URL (tritonclient HTTP or gRPC).

    petal-run clip.mp4 --gallery gallery.npy --backend triton --triton-url http://gpu-server:8000
    Models(None, backend="triton", url="grpc://gpu-server:8001")

The server serves a repository `petal-export ... --triton DIR` wrote (repository.py). The runtime reads the
manifest and the sha256 of the graphs from the models' config parameters, checks the contract version as
for a local folder, and ties galleries to the same fingerprint; detection, tracking, alignment and the
gallery stay local. The IQA runs as `petal_iqa` and the recognizer as `petal_recognizer` (or its
FP16/INT8 variant for --precision); `petal_face`, the ensemble, is for clients that send aligned faces
only. auto never picks this backend.
"""
from __future__ import annotations

from pathlib import Path

from ..base import BackendSpec, Served
from .loader import ClientFromUrl, TritonUnreachable, TritonUrl, tritonclient_missing
from .repository import IQA_MODEL, model_for, served
from .runner import TritonRunner


def _unusable(models_dir: Path, graph: str) -> str | None:
    missing = tritonclient_missing()
    if missing:
        return missing
    from .. import REMOTE_ONLY

    return f"{REMOTE_ONLY}: choose it with --backend triton --triton-url URL"


def create(models_dir: Path | None, graph: str, url: str | None = None, precision: str | None = None,
           **_) -> TritonRunner:
    if url is None:
        from ...errors import PetalError

        raise PetalError("the triton backend needs the server's URL (--triton-url URL)")
    return TritonRunner(ClientFromUrl(url), model_for(graph, precision))


def _served(url: str, precision: str | None = None) -> Served:
    """What the server at `url` serves for the IQA and the recognizer at `precision` (their configs' parameters)."""
    loader = ClientFromUrl(url)
    runners = [TritonRunner(loader, name) for name in dict.fromkeys((IQA_MODEL, model_for("recognizer", precision)))]
    configs = {}
    try:
        for runner in runners:
            runner.activate()
            configs[runner.model] = runner.config
    finally:
        for runner in runners:
            runner.deactivate()
    return served(configs, loader.url.text)  # the IQA's (FP32) manifest first


BACKEND = BackendSpec("triton", priority=0, unusable=_unusable, create=create, served=_served,
                      summary="Triton Inference Server by URL (tritonclient HTTP/gRPC; a petal-export --triton "
                              "repository)")

__all__ = ["BACKEND", "ClientFromUrl", "TritonRunner", "TritonUnreachable", "TritonUrl"]
