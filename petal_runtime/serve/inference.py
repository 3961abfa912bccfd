"""One inference worker for every source: the IQA and recognizer calls of all sources, batched.

Each source's pipeline gets a `BatchedModels` in place of `Models`: its `quality()` and `embed()`
hand the crops to the worker and wait. The worker takes the first request waiting, then gathers
more until every active source has one waiting, the batch holds `max_batch` crops, or `max_wait_ms`
has passed since that first request; IQA requests and recognizer requests run as one call each
(split at `max_batch` by Models), and each caller gets its own rows back.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..models import Models
from .metrics import BATCH_BUCKETS, Registry


@dataclass
class _Request:
    kind: str  # "iqa" or "recognizer"
    faces: np.ndarray
    alpha: np.ndarray | None
    queued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class WorkerStopped(RuntimeError):
    """The inference worker has stopped; the source asking ends."""


class InferenceWorker:
    def __init__(self, models: Models, max_batch: int = 32, max_wait_ms: float = 20.0,
                 registry: Registry | None = None) -> None:
        self.models = models
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.pending: list[_Request] = []
        self.cond = threading.Condition()
        self.clients = 0  # sources that may send requests now
        self._stop = False
        self.calls = 0
        self.thread = threading.Thread(target=self._loop, name="petal-inference", daemon=True)
        registry = registry or Registry()
        self.batch_sizes = registry.histogram("petal_inference_batch_size", "Crops per IQA or recognizer call",
                                              ["model"], BATCH_BUCKETS)
        self.batch_sources = registry.histogram("petal_inference_batch_requests",
                                                "Source requests merged into one call", ["model"], BATCH_BUCKETS)
        self.seconds = registry.histogram("petal_inference_seconds", "Time of one batched call", ["model"])
        self.waits = registry.histogram("petal_inference_wait_seconds",
                                        "Time a request waited before its batch ran", ["model"])
        registry.gauge("petal_inference_queue_depth", "Requests waiting for the inference worker",
                       read=lambda: {(): float(len(self.pending))})

    def start(self) -> "InferenceWorker":
        self.thread.start()
        return self

    def register(self) -> None:
        with self.cond:
            self.clients += 1
            self.cond.notify_all()

    def unregister(self) -> None:
        with self.cond:
            self.clients = max(0, self.clients - 1)
            self.cond.notify_all()

    def submit(self, kind: str, faces: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
        request = _Request(kind, faces, alpha)
        with self.cond:
            if self._stop:
                raise WorkerStopped("the inference worker has stopped")
            self.pending.append(request)
            self.cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def _take(self) -> list[_Request] | None:
        with self.cond:
            while not self.pending:
                if self._stop:
                    return None
                self.cond.wait(0.1)
            deadline = self.pending[0].queued + self.max_wait
            while not self._stop:
                crops = sum(len(r.faces) for r in self.pending)
                if len(self.pending) >= max(1, self.clients) or crops >= self.max_batch:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.cond.wait(left)
            batch, self.pending = self.pending, []
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                break
            for kind in ("iqa", "recognizer"):
                requests = [r for r in batch if r.kind == kind]
                if requests:
                    self._run(kind, requests)
        with self.cond:  # anything that arrived after the stop
            for request in self.pending:
                request.error = WorkerStopped("the inference worker has stopped")
                request.done.set()
            self.pending = []

    def _run(self, kind: str, requests: list[_Request]) -> None:
        start = time.perf_counter()
        try:
            faces = np.concatenate([r.faces for r in requests])
            if kind == "iqa":
                out = self.models.quality(faces)
            else:
                out = self.models.embed(faces, np.concatenate([np.asarray(r.alpha, np.float32).reshape(-1)
                                                               for r in requests]))
            row = 0
            for r in requests:
                r.result = out[row:row + len(r.faces)]
                row += len(r.faces)
        except BaseException as exc:  # handed to every caller of this batch
            for r in requests:
                r.error = exc
        end = time.perf_counter()
        self.calls += 1
        self.batch_sizes.observe(sum(len(r.faces) for r in requests), model=kind)
        self.batch_sources.observe(len(requests), model=kind)
        self.seconds.observe(end - start, model=kind)
        for r in requests:
            self.waits.observe(start - r.queued, model=kind)
            r.done.set()


class BatchedModels:
    """What a Pipeline needs of Models, with IQA and the recognizer sent to the shared worker."""

    def __init__(self, models: Models, worker: InferenceWorker) -> None:
        self._models = models
        self.worker = worker
        self.fingerprint = models.fingerprint
        self.manifest = models.manifest
        self.embedding_size = models.embedding_size

    def alpha(self, quality: np.ndarray) -> np.ndarray:
        return self._models.alpha(quality)

    def quality(self, faces: np.ndarray) -> np.ndarray:
        if len(faces) == 0:
            return np.zeros(0, np.float32)
        return self.worker.submit("iqa", faces)

    def embed(self, faces: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        return self.worker.submit("recognizer", faces, alpha)

    def close(self) -> None:
        """The shared models are closed by the service, not by each source."""
