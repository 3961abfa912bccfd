"""Run one model of a Triton server on a dict of named arrays (tritonclient, HTTP or gRPC).

The runner reads the model's metadata (names, datatypes, dims) and config (max_batch_size, backend,
parameters) when activated; infer() splits a batch larger than the model's max_batch_size. A request
that fails because the server went away is retried once on a new connection (a restarted server drops
the old one), then reported as TritonUnreachable naming the URL; the next call connects again, so a
pipeline recovers as soon as the server is back.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from ...errors import PetalError
from ..base import Runner, TensorInfo
from .loader import ClientFromUrl, TritonUnreachable, close_client, describe_failure, is_unreachable
from .repository import config_parameters, manifest_metadata

_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def _info(entry: dict) -> TensorInfo:
    shape = tuple(None if int(d) < 0 else int(d) for d in entry.get("shape", ()))
    return TensorInfo(str(entry["name"]), np.dtype(_DTYPES.get(str(entry.get("datatype")), np.float32)), shape)


class TritonRunner(Runner):
    def __init__(self, loader: ClientFromUrl, model: str, version: str = "", name: str | None = None) -> None:
        super().__init__(name or f"triton:{model}")
        self.loader = loader
        self.model = model
        self.version = version
        self.config: dict = {}
        self.max_batch_size = 0
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._local = threading.local()
        self._clients: list = []
        self._clients_lock = threading.Lock()
        self.last_inference_time: float | None = None

    # --- connections (one per thread)
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self.loader()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            close_client(client)

    def _call(self, doing: str, method: str, *args, **kwargs) -> Any:
        """client.method(*args, **kwargs), retried once on a fresh connection if the server went away."""
        for attempt in (0, 1):
            try:
                return getattr(self._client(), method)(*args, **kwargs)
            except TritonUnreachable:
                self._drop_client()
                if attempt:
                    raise
            except PetalError:
                raise
            except Exception as exc:  # tritonclient's and the sockets' exception types
                self._drop_client()
                if attempt or not is_unreachable(exc):
                    raise describe_failure(self.loader.url, exc, doing) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # --- lifecycle
    def activate_impl(self) -> None:
        as_json = self.loader.as_json()
        doing = f"reading {self.model}'s metadata"
        ready = self._call(doing, "is_model_ready", self.model, self.version, **self.loader.timeout_kwargs())
        if not ready:
            raise PetalError(f"Triton server at {self.loader.url.text} does not serve {self.model} (not loaded or "
                             "not ready): serve the repository petal-export --triton wrote")
        metadata = self._call(doing, "get_model_metadata", self.model, self.version, **as_json)
        config = self._call(f"reading {self.model}'s config", "get_model_config", self.model, self.version,
                            **as_json)
        self.config = dict(config.get("config", config))  # gRPC wraps it in {"config": ...}
        self.max_batch_size = int(self.config.get("max_batch_size", 0) or 0)
        self._inputs = [_info(t) for t in metadata.get("inputs", [])]
        self._outputs = [_info(t) for t in metadata.get("outputs", [])]

    def deactivate_impl(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            close_client(client)
        self._local = threading.local()

    # --- description
    def inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def parameters(self) -> dict[str, str]:
        return config_parameters(self.config)

    def metadata(self) -> dict[str, str]:
        """The model's petal.* parameters that are the graph's ONNX metadata_props (the same facts)."""
        return manifest_metadata(self.parameters())

    def runs_on(self) -> str:
        """What executes the model on the server: its backend or platform."""
        return str(self.config.get("backend") or self.config.get("platform") or "?")

    def description(self) -> str:
        return f"triton ({self.loader.url.text}: {self.model} on {self.runs_on()})"

    # --- inference
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feed.values()))) if feed else 0
        step = self.max_batch_size if self.max_batch_size > 0 else max(batch, 1)
        start = time.perf_counter()
        parts = [self._infer_once({k: v[i:i + step] for k, v in feed.items()}) for i in range(0, max(batch, 1), step)]
        self.last_inference_time = time.perf_counter() - start
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _infer_once(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self.loader.module()
        inputs = []
        for info in self._inputs:
            value = np.ascontiguousarray(feed[info.name], dtype=info.dtype)
            item = module.InferInput(info.name, list(value.shape), _datatype(info.dtype))
            if self.loader.protocol == "http":
                item.set_data_from_numpy(value, binary_data=True)
            else:
                item.set_data_from_numpy(value)
            inputs.append(item)
        if self.loader.protocol == "http":
            outputs = [module.InferRequestedOutput(t.name, binary_data=True) for t in self._outputs]
        else:
            outputs = [module.InferRequestedOutput(t.name) for t in self._outputs]
        result = self._call(f"running {self.model}", "infer", self.model, inputs, model_version=self.version,
                            outputs=outputs)
        return {t.name: np.asarray(result.as_numpy(t.name)) for t in self._outputs}

    def statistics(self) -> dict:
        """The server's inference statistics for this model (tritonclient's JSON)."""
        return self._call(f"reading {self.model}'s statistics", "get_inference_statistics", self.model,
                          self.version, **self.loader.as_json())


def _datatype(dtype: np.dtype) -> str:
    for name, numpy_type in _DTYPES.items():
        if np.dtype(numpy_type) == dtype:
            return name
    raise PetalError(f"no Triton datatype for {dtype}")


__all__ = ["TritonRunner"]
