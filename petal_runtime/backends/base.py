"""The runner interface every backend implements (after Polygraphy's BaseRunner).

A loader builds or loads a model lazily (it is a callable); a runner owns what the loader returns
while it is active and runs it on a dict of named arrays:

    with OnnxrtRunner(SessionFromOnnx("recognizer.onnx")) as runner:
        outputs = runner.infer({"image": faces, "alpha": alpha})   # {"embedding": ...}

A new backend is a new folder under petal_runtime/backends with a loader and a runner, plus a
`BACKEND` description in its __init__.py; nothing else changes.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import FeedError, InternalError


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, numpy dtype and shape (None for a dynamic axis)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown (a PyTorch module), nothing checked

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype} {dims}"


class Runner(abc.ABC):
    """activate() / infer(dict) -> dict / deactivate(); also a context manager."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False

    # --- lifecycle
    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- inference
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named inputs; returns every output by name. The batch may be of any size."""
        if not self.is_active:
            raise InternalError(f"runner {self.name} is not active: call activate() or use it in a with block")
        self.check_feed(feed)
        return self.infer_impl(feed)

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        """FeedError unless the feed has exactly the graph's inputs, each a numpy array whose dtype casts to the
        input's (same kind: float64 or float16 to float32 passes, strings or objects do not), whose rank and fixed
        dimensions match, and whose leading (batch) dimension is the same for every input."""
        if not isinstance(feed, Mapping):
            raise FeedError(f"runner {self.name} takes a dict of named arrays, got {type(feed).__name__}")
        infos = self.inputs()
        expected = {t.name for t in infos}
        if expected != set(feed):
            raise FeedError(f"runner {self.name} takes inputs {sorted(expected)}, got {sorted(map(str, feed))}")
        batches: dict[str, int] = {}
        for info in infos:
            value = feed[info.name]
            if not isinstance(value, np.ndarray):
                raise FeedError(f"runner {self.name}: input {info.name} must be a numpy array, "
                                f"got {type(value).__name__}")
            numeric = np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
            if not numeric or not np.can_cast(value.dtype, info.dtype, casting="same_kind"):
                raise FeedError(f"runner {self.name}: input {info.name} is {value.dtype}, expected {info.describe()}")
            if info.shape is not None and (value.ndim != len(info.shape) or any(
                    want is not None and got != want for got, want in zip(value.shape, info.shape))):
                raise FeedError(f"runner {self.name}: input {info.name} has shape {list(value.shape)}, "
                                f"expected {info.describe()}")
            if value.ndim:
                batches[info.name] = value.shape[0]
        if len(set(batches.values())) > 1:
            raise FeedError(f"runner {self.name}: inputs disagree on the batch size: {batches}")

    @abc.abstractmethod
    def inputs(self) -> list[TensorInfo]: ...

    @abc.abstractmethod
    def outputs(self) -> list[TensorInfo]: ...

    def metadata(self) -> dict[str, str]:
        """The model's string metadata (ONNX metadata_props); empty where the format has none."""
        return {}

    def description(self) -> str:
        """One line naming the backend and where it runs (for logs and the JSON report)."""
        return self.name

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...


@dataclass(frozen=True)
class BackendSpec:
    """What a backend folder tells the rest of the runtime about itself.

    `unusable(models_dir, graph)` returns None when the backend can run that graph ("recognizer" or
    "iqa") from that folder here, else the reason it cannot (missing library, no GPU, no file);
    it must be cheap and must not raise. `create(models_dir, graph, **options)` returns an inactive
    Runner. `priority`: auto picks the usable backend with the highest.

    A remote backend (the models live on a server, not in a folder) also has `served(url, precision=)`,
    which returns what the server says it serves (a `Served`); its `create` gets models_dir None and
    `url=`. auto never picks one.
    """

    name: str
    priority: int
    unusable: Callable[[Path, str], str | None]
    create: Callable[..., Runner]
    summary: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    served: Callable[..., "Served"] | None = None

    @property
    def remote(self) -> bool:
        return self.served is not None


@dataclass(frozen=True)
class Served:
    """What a server declares about the models it serves: the export's manifest (contract version
    checked) and the sha256 of the FP32 graphs, and of both combined, that a gallery is tied to."""

    manifest: Any  # contract.Manifest
    recognizer_sha256: str
    iqa_sha256: str
    models_sha256: str
