"""What a PETAL Triton model repository holds, defined once: model names, the alpha output, the
`parameters` every config.pbtxt carries, and how the runtime reads them back from a server.

    petal_iqa/             image [N,3,H,W] -> quality [N,1], alpha [N,1]   (the IQA graph, alpha folded in)
    petal_recognizer/      image [N,3,S,S], alpha [N,1] -> embedding [N,D] (FP32)
    petal_recognizer_fp16/ the same in FP16 (a TensorRT plan where engines were built, else ONNX)
    petal_recognizer_int8/ the same in INT8 (a TensorRT plan, else ONNX Runtime's QDQ graph)
    petal_face/            ensemble: image -> petal_iqa -> alpha -> petal_recognizer -> embedding, quality, alpha

petal_export.triton writes it; this module has no dependency beyond the runtime's own. Each model's
`parameters` are the graph's own `petal.*` metadata (Manifest.to_metadata: contract version, threshold,
clipping, sizes, names) plus `petal.files` (the export's sha256 per file), `petal.models_sha256` (the
fingerprint a gallery is tied to), `petal.source_file` and `petal.model_sha256` (the file this model was
made from, and the sha256 of the file in its version folder).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from ...contract import (ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT, IQA_FILE, METADATA_PREFIX, QUALITY_OUTPUT,
                         RECOGNIZER_FILE, Manifest)
from ...errors import PetalError
from ..base import Served

REPOSITORY_FORMAT = "1"
IQA_MODEL = "petal_iqa"
RECOGNIZER_MODEL = "petal_recognizer"
ENSEMBLE_MODEL = "petal_face"
ALPHA_OUTPUT = ALPHA_INPUT  # petal_iqa's second output feeds the recognizer's alpha input by name
PRECISION_MODELS = {"fp32": RECOGNIZER_MODEL, "fp16": f"{RECOGNIZER_MODEL}_fp16", "int8": f"{RECOGNIZER_MODEL}_int8"}
MODEL_PREFIX = "petal_"

PARAM_FILES = METADATA_PREFIX + "files"
PARAM_MODELS_SHA256 = METADATA_PREFIX + "models_sha256"
PARAM_MODEL_SHA256 = METADATA_PREFIX + "model_sha256"
PARAM_SOURCE_FILE = METADATA_PREFIX + "source_file"
PARAM_REPOSITORY_FORMAT = METADATA_PREFIX + "repository_format"
PARAM_CONTRACT_VERSION = METADATA_PREFIX + "contract_version"

GRAPH_IO = {  # graph -> (inputs, outputs) as the Triton models name them
    "iqa": ((IMAGE_INPUT,), (QUALITY_OUTPUT, ALPHA_OUTPUT)),
    "recognizer": ((IMAGE_INPUT, ALPHA_INPUT), (EMBEDDING_OUTPUT,)),
}


def recognizer_model(precision: str | None) -> str:
    if precision not in (None, "", *PRECISION_MODELS):
        raise PetalError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    return PRECISION_MODELS[precision or "fp32"]


def model_for(graph: str, precision: str | None = None) -> str:
    """The Triton model that runs `graph` ("recognizer" or "iqa") at `precision`; the IQA is FP32 always."""
    if graph == "iqa":
        return IQA_MODEL
    if graph == "recognizer":
        return recognizer_model(precision)
    raise PetalError(f"unknown graph {graph!r}")


def parameters(manifest: Manifest, models_sha256: str, source_file: str, model_sha256: str = "",
               precision: str | None = None) -> dict[str, str]:
    """The `parameters` of one model's config.pbtxt (string values)."""
    meta = dict(manifest.to_metadata())
    if precision:
        meta[METADATA_PREFIX + "precision"] = json.dumps(precision)
    meta[PARAM_FILES] = json.dumps(manifest.files, sort_keys=True)
    meta[PARAM_MODELS_SHA256] = models_sha256
    meta[PARAM_SOURCE_FILE] = source_file
    meta[PARAM_REPOSITORY_FORMAT] = REPOSITORY_FORMAT
    if model_sha256:
        meta[PARAM_MODEL_SHA256] = model_sha256
    return dict(sorted(meta.items()))


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The string parameters of a model config as Triton returns it (JSON, or a protobuf as a dict)."""
    found = config.get("parameters") or {}
    if not isinstance(found, Mapping):
        return {}
    values = {}
    for key, value in found.items():
        if isinstance(value, Mapping):
            value = value.get("string_value", value.get("stringValue"))
        if isinstance(value, str):
            values[str(key)] = value
    return values


def is_petal_config(params: Mapping[str, str]) -> bool:
    return PARAM_CONTRACT_VERSION in params and PARAM_MODELS_SHA256 in params


def manifest_metadata(params: Mapping[str, str]) -> dict[str, str]:
    """The parameters that are the graph's `petal.*` metadata (JSON values), without the repository's own
    keys (plain strings): what Manifest.from_metadata reads."""
    plain = {PARAM_MODELS_SHA256, PARAM_MODEL_SHA256, PARAM_SOURCE_FILE, PARAM_REPOSITORY_FORMAT}
    return {k: v for k, v in params.items() if k.startswith(METADATA_PREFIX) and k not in plain}


def _manifest(params: Mapping[str, str], source: str) -> Manifest:
    return Manifest.from_metadata(manifest_metadata(params), source)


def served(configs: Mapping[str, Mapping[str, Any]], where: str) -> Served:
    """Served (manifest, digests) from the configs of the models one runtime uses, each checked.

    configs: Triton model name -> its config (JSON as the server returns it). Every model must carry PETAL
    parameters of this contract version, and all of them the same export (models sha256).
    """
    found: dict[str, tuple[Manifest, str]] = {}
    for name, config in configs.items():
        params = config_parameters(config)
        if not is_petal_config(params):
            raise PetalError(f"{name} on {where} is not a PETAL model (its config has no {PARAM_CONTRACT_VERSION} "
                             f"and {PARAM_MODELS_SHA256} parameters): serve a repository petal-export --triton wrote")
        found[name] = (_manifest(params, f"{name} on {where}"), params[PARAM_MODELS_SHA256])
    digests = {sha for _, sha in found.values()}
    if len(digests) != 1:
        listing = ", ".join(f"{name} {sha[:12]}..." for name, (_, sha) in found.items())
        raise PetalError(f"the models on {where} come from different exports ({listing}): write the repository "
                         "again with one petal-export --triton")
    manifest = next(iter(found.values()))[0]
    missing = [f for f in (RECOGNIZER_FILE, IQA_FILE) if f not in manifest.files]
    if missing:
        raise PetalError(f"the models on {where} do not list the sha256 of {', '.join(missing)} in their "
                         f"{PARAM_FILES} parameter: write the repository again with petal-export --triton")
    return Served(manifest, manifest.files[RECOGNIZER_FILE], manifest.files[IQA_FILE], digests.pop())


__all__ = ["ALPHA_OUTPUT", "ENSEMBLE_MODEL", "GRAPH_IO", "IQA_MODEL", "MODEL_PREFIX", "PARAM_CONTRACT_VERSION",
           "PARAM_FILES", "PARAM_MODELS_SHA256", "PARAM_MODEL_SHA256", "PARAM_REPOSITORY_FORMAT",
           "PARAM_SOURCE_FILE", "PRECISION_MODELS", "RECOGNIZER_MODEL", "REPOSITORY_FORMAT", "config_parameters",
           "is_petal_config", "manifest_metadata", "model_for", "parameters", "recognizer_model", "served"]
