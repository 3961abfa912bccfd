"""The multi-source service: N sources, one inference worker, events as they happen, a hot gallery.

    config = ServeConfig.load("serve.toml")
    with Service(config) as service:      # models, gallery, sources, sinks, HTTP: all checked here
        service.start()
        service.wait()                    # until every (file) source has ended, or stop()

Per source, one thread runs `Pipeline.run` (its own decode, analysis and recognition threads, its
own tracker); the pipeline's IQA and recognizer calls go to the shared `InferenceWorker`, which
batches them across sources. A source's thread turns its frame results into events (track_started,
identified, identity_changed, track_ended) and hands them to every sink's own queue. A source that
fails is logged and, when live, reopened with back-off; it never ends the others.

The gallery is loaded aside (checked against the models, its calibration with it), then swapped
into every pipeline under that pipeline's tracker lock, so a decision uses one gallery or the other,
never a mix; a gallery that does not load or was built with other models is refused and the one in
use stays. Its version (the first 12 hex digits of the .npy's sha256) is in every event and in /sources.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..ann import index_meta_path
from ..errors import PetalError
from ..files import atomic_path, first_line
from ..gallery import UNKNOWN, Gallery
from ..models import Models
from ..openset import OpenSetRule, calibration_path, load_rule
from ..pipeline import FaceResult, FrameResult, Pipeline, PipelineConfig
from ..sources import Frame, Source, StreamSource, open_source
from .config import ServeConfig, SourceSection
from .http import HttpServer
from .inference import BatchedModels, InferenceWorker
from .metrics import Registry
from .sinks import Sink, StreamSink, build_sinks

EVENT_TYPES = ("track_started", "identified", "identity_changed", "track_ended")
CAPTURE_MEMORY = 1024  # frames whose capture time is remembered per source (event latency)


@dataclass
class GalleryState:
    gallery: Gallery
    rule: OpenSetRule
    version: str
    key: tuple  # the files' stat when loaded
    loaded_at: float


def _stat_key(path: Path) -> tuple:
    out = []
    for p in (path, path.with_name(path.name + ".json"), calibration_path(path), index_meta_path(path)):
        try:
            s = p.stat()
            out.append((s.st_size, s.st_mtime_ns, s.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class ServePipeline(Pipeline):
    """A Pipeline whose gallery and open-set rule can be swapped while it runs; each track remembers
    the gallery version its identity was decided with."""

    gallery_version = ""

    def _identify(self, track_id: int) -> None:
        with self.tracker.lock:
            super()._identify(track_id)
            self.tracker.get(track_id).gallery_version = self.gallery_version

    def swap_gallery(self, state: GalleryState) -> None:
        with self.tracker.lock:
            self.gallery, self.open_set, self.gallery_version = state.gallery, state.rule, state.version
            for track in self.tracker.all_tracks():  # live identities follow the new gallery at once
                if track.template is not None:
                    self._identify(track.track_id)


class ServeSource(Source):
    """A configured source: renumbers frames across loops, paces files at their frame rate when
    `realtime` (skipping frames that are already late, as a camera would), remembers when each frame
    was captured, and hands stop() to the source inside."""

    def __init__(self, config: SourceSection, opener: Callable[[], Source]) -> None:
        super().__init__(config.name)
        self.config = config
        self.opener = opener
        self.inner = opener()
        self.live = self.inner.live or config.realtime
        self.fps, self.size = self.inner.fps, self.inner.size
        self.stats = self.inner.stats
        self.skipped = 0  # frames a realtime file source was too late for
        self.loops = 0
        self.captured: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.limit = config.max_frames or None

    def frames(self) -> Iterator[Frame]:
        index = 0
        offset = 0.0
        start = time.perf_counter()
        interval = 1.0 / self.fps if self.fps else 0.04
        while not self._closed.is_set():
            last_time = offset
            for frame in self.inner:
                if self._closed.is_set():
                    return
                t = offset + (frame.time if frame.time is not None else frame.index * interval)
                last_time = t
                if self.config.realtime:
                    due = start + t
                    now = time.perf_counter()
                    if now > due + interval:  # late: a camera would not have waited
                        self.skipped += 1
                        continue
                    if due > now and self._closed.wait(due - now):
                        return
                self.captured[index] = time.time()
                while len(self.captured) > CAPTURE_MEMORY:
                    self.captured.popitem(last=False)
                yield Frame(index, t, frame.image)
                index += 1
            if not self.config.loop or self._closed.is_set() or self.inner.live:
                return
            self.loops += 1
            offset = last_time + interval
            self.inner.close()
            self.inner = self.opener()

    def stop(self) -> None:
        super().stop()
        self.inner.stop()

    def close(self) -> None:
        super().close()
        self.inner.close()


@dataclass
class _TrackState:
    first_frame: int
    first_time: float
    last_frame: int
    frames: int = 0
    announced: bool = False
    identity: str = UNKNOWN
    best_quality: float = float("-inf")


class SourceRunner:
    """One source's thread: Pipeline.run over it, frame results turned into events."""

    def __init__(self, service: "Service", config: SourceSection) -> None:
        self.service = service
        self.config = config
        self.name = config.name
        self.state = "opening"
        self.error: str | None = None
        self.source: ServeSource | None = None
        self.frames = 0
        self.restarts = 0
        self.events = 0
        self._times: collections.deque = collections.deque(maxlen=64)
        self._tracks: dict[int, _TrackState] = {}
        s = service.config.service
        self.pipeline_config = PipelineConfig(min_face=config.min_face, detect_every=config.detect_every,
                                              top_k=s.top_k, selection=config.selection, per_track=config.per_track,
                                              batch_size=s.max_batch, queue_size=config.queue_size)
        self.pipeline = ServePipeline(service.batched, None, self.pipeline_config)
        self.thread = threading.Thread(target=self._run, name=f"petal-source-{self.name}", daemon=True)

    # --- opening
    def _open_inner(self) -> Source:
        url = self.config.url
        if self.config.live:
            return open_source(url, max_retries=self.config.connect_retries,
                               backoff=tuple(self.config.reconnect_backoff_s))
        return open_source(url)

    def open(self) -> None:
        try:
            self.source = ServeSource(self.config, self._open_inner)
        except PetalError as exc:
            raise PetalError(f"source {self.name}: {exc}") from None
        if isinstance(self.source.inner, StreamSource):
            self.source.inner.max_retries = None  # opened once: from now on reconnect until stopped

    # --- running
    def start(self) -> None:
        self.service.worker.register()
        self.state = "running"
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.service.stopping.is_set():
                try:
                    for result in self.pipeline.run(self.source, keep_images=self.service.thumbnails is not None):
                        self._on_frame(result)
                except Exception as exc:  # this source's failure only: logged, the others go on
                    self.error = first_line(exc)
                    self.service.log(f"source {self.name}: {self.error}")
                    if not self.config.live:
                        self.state = "failed"
                        break
                if not self.config.live or self.service.stopping.is_set():
                    break
                # A live stream that gave up (or failed): reopen it after a back-off.
                self.state = "reconnecting"
                delay = self.config.reconnect_backoff_s[0] * 2 ** min(self.restarts, 6)
                if self.service.stopping.wait(min(delay, self.config.reconnect_backoff_s[1])):
                    break
                self.restarts += 1
                try:
                    self.source.close()
                    self.open()
                    self.state = "running"
                except PetalError as exc:
                    self.error = first_line(exc)
                    self.service.log(self.error)
        finally:
            self._end_all()
            if self.state != "failed":
                self.state = "ended"
            self.service.worker.unregister()
            self.service.source_ended()

    def _on_frame(self, result: FrameResult) -> None:
        self.frames += 1
        now = time.perf_counter()
        self._times.append(now)
        captured = self.source.captured.get(result.index)
        seen: dict[int, FaceResult] = {}
        for face in result.faces:
            seen[face.track_id] = face
        min_frames = self.service.config.service.min_track_frames
        for tid, face in seen.items():
            st = self._tracks.get(tid)
            if st is None:
                st = self._tracks[tid] = _TrackState(result.index, result.time or 0.0, result.index)
            st.frames += 1
            st.last_frame = result.index
            if np.isfinite(face.quality):
                st.best_quality = max(st.best_quality, face.quality)
            if not st.announced and st.frames >= min_frames:
                st.announced = True
                self._emit("track_started", tid, face, result, captured)
            if st.announced and face.identity != st.identity:
                kind = "identified" if st.identity == UNKNOWN else "identity_changed"
                previous, st.identity = st.identity, face.identity
                self._emit(kind, tid, face, result, captured, previous=previous)
        max_missed = self.pipeline_config.max_missed
        for tid in list(self._tracks):
            st = self._tracks[tid]
            merged_into = self.pipeline.canonical(tid)
            if merged_into != tid or result.index - st.last_frame > max_missed:
                self._end(tid, result, merged_into if merged_into != tid else None)

    def _end_all(self) -> None:
        for tid in list(self._tracks):
            self._end(tid, None, None)

    def _end(self, tid: int, result: FrameResult | None, merged_into: int | None) -> None:
        st = self._tracks.pop(tid)
        if not st.announced:
            return
        extra = {"frames": st.frames, "first_frame": st.first_frame, "last_frame": st.last_frame,
                 "best_quality": round(float(st.best_quality), 4) if np.isfinite(st.best_quality) else None}
        if merged_into is not None:
            extra["merged_into"] = merged_into
        self._emit("track_ended", tid, None, result, None, **extra)

    def _emit(self, kind: str, tid: int, face: FaceResult | None, result: FrameResult | None,
              captured: float | None, **extra) -> None:
        with self.pipeline.tracker.lock:
            try:
                track = self.pipeline.tracker.get(tid)
            except KeyError:  # forgotten on an endless stream
                track = None
        decision = getattr(track, "decision", None)
        identity = face.identity if face is not None else (track.identity if track is not None else UNKNOWN)
        score = face.score if face is not None else (track.score if track is not None else float("nan"))
        event = {"type": kind, "source": self.name, "track_id": tid, "identity": identity,
                 "score": None if not np.isfinite(score) else round(float(score), 4),
                 "far": None if decision is None or decision.far is None else round(float(decision.far), 6),
                 "threshold": None if decision is None else round(float(decision.threshold), 4),
                 "cohort": None if decision is None else round(float(decision.cohort), 4),
                 "rule": None if decision is None else decision.rule,
                 "decision_quality": None if decision is None else round(float(decision.quality), 4),
                 "quality": (round(float(face.quality), 4) if face is not None and np.isfinite(face.quality)
                             else None if decision is None else round(float(decision.quality), 4)),
                 "frame": None if result is None else result.index,
                 "frame_time": None if result is None or result.time is None else round(float(result.time), 3),
                 "time": round(time.time(), 3),
                 "gallery_version": getattr(track, "gallery_version", None) or self.pipeline.gallery_version}
        if face is not None:
            event["box"] = [round(float(v), 1) for v in face.box]
        if kind in ("identified", "identity_changed"):
            event["previous_identity"] = extra.pop("previous")
            event["top_k"] = [{"name": n, "score": round(float(s), 4)} for n, s in face.top_k] if face else []
            if self.service.thumbnails is not None and result is not None and result.image is not None:
                event["thumbnail"] = self.service.write_thumbnail(self.name, tid, result, face)
        if captured is not None:
            event["latency_ms"] = round(1000 * (time.time() - captured), 1)
        event.update(extra)
        self.events += 1
        self.service.publish(event)

    # --- status
    def fps(self) -> float:
        times = self._times
        if len(times) < 2 or time.perf_counter() - times[-1] > 2.0:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def status(self) -> dict:
        src = self.source
        stats = self.pipeline.stats
        return {"name": self.name, "url": self.config.url, "state": self.state, "live": bool(src and src.live),
                "error": self.error, "frames": self.frames, "fps": round(self.fps(), 2),
                "dropped_frames": self.dropped(), "reconnects": self.reconnects(), "faces": stats.faces,
                "recognized": stats.recognized, "events": self.events,
                "tracks_open": len(self._tracks), "size": list(src.size) if src and src.size else None,
                "gallery_version": self.pipeline.gallery_version}

    def dropped(self) -> int:
        return int(self.pipeline.stats.dropped_frames + (self.source.skipped if self.source else 0))

    def reconnects(self) -> int:
        return int((self.source.stats.reconnects if self.source else 0) + self.restarts)


class Service:
    def __init__(self, config: ServeConfig, stdout=None, log: Callable[[str], None] | None = None) -> None:
        self.config = config.check()
        self._log = log
        self.stopping = threading.Event()
        self.all_ended = threading.Event()
        self._reload_requested = threading.Event()
        self._publish_lock = threading.Lock()
        self.seq = 0
        self.started_at: float | None = None
        self.models: Models | None = None
        self.http: HttpServer | None = None
        self.runners: list[SourceRunner] = []
        self.sinks: list[Sink] = []
        self._threads: list[threading.Thread] = []
        s = config.service
        self.thumbnails = Path(s.thumbnails) if s.thumbnails else None
        self._metrics()
        try:
            self.models = Models(s.models, backend=s.backend, threads=s.threads or None, max_batch=s.max_batch)
            self.worker = InferenceWorker(self.models, s.max_batch, s.max_wait_ms, self.registry)
            self.batched = BatchedModels(self.models, self.worker)
            self.gallery_state = self._load_gallery()
            self.runners = [SourceRunner(self, c) for c in config.source]
            for runner in self.runners:
                runner.open()
                runner.pipeline.swap_gallery(self.gallery_state)
            self.sinks = build_sinks(config.sinks, log=self.log)
            for sink in self.sinks:
                if isinstance(sink, StreamSink) and stdout is not None:
                    sink.stream = stdout
            if self.thumbnails is not None:
                self.thumbnails.mkdir(parents=True, exist_ok=True)
            if config.http.enabled:
                self.http = HttpServer(self, config.http.host, config.http.port)
        except BaseException:
            self.close()
            raise

    # --- metrics
    def _metrics(self) -> None:
        r = self.registry = Registry()
        per_source = ("source",)

        def each(value: Callable[[SourceRunner], float]):
            return lambda: {(x.name,): float(value(x)) for x in self.runners}

        r.gauge("petal_source_up", "1 while the source is delivering frames", per_source,
                read=each(lambda x: x.state == "running"))
        r.gauge("petal_source_fps", "Frames analysed per second (last 64 frames)", per_source,
                read=each(SourceRunner.fps))
        self.frames_total = r.counter("petal_source_frames_total", "Frames analysed", per_source)
        self.dropped_total = r.counter("petal_source_dropped_frames_total",
                                       "Frames dropped because analysis was behind a live (or realtime) source",
                                       per_source)
        self.reconnects_total = r.counter("petal_source_reconnects_total", "Stream reconnections", per_source)
        self.faces_total = r.counter("petal_source_faces_total", "Face crops found (each scored by the IQA)",
                                     per_source)
        self.recognized_total = r.counter("petal_recognizer_crops_total", "Crops the recognizer ran on", per_source)
        self.saved_total = r.counter("petal_recognizer_calls_saved_total",
                                     "Crops quality-aware selection kept from the recognizer", per_source)
        self.stage_total = r.counter("petal_stage_seconds_total", "Time spent per pipeline stage",
                                     ("source", "stage"))
        self.events_total = r.counter("petal_events_total", "Events published", ("type",))
        self.event_latency = r.histogram("petal_event_latency_seconds",
                                         "From frame capture to the event being published", ("type",))
        r.gauge("petal_sink_queue_depth", "Events waiting in a sink's queue", ("sink",),
                read=lambda: {(s.name,): float(s.depth) for s in self.sinks})
        r.gauge("petal_sink_dropped_total", "Events dropped because a sink's queue was full (oldest first)",
                ("sink",), read=lambda: {(s.name,): float(s.dropped) for s in self.sinks})
        r.gauge("petal_sink_delivered_total", "Events a sink delivered", ("sink",),
                read=lambda: {(s.name,): float(s.delivered) for s in self.sinks})
        r.gauge("petal_sink_failed_total", "Events a sink gave up on after its retries", ("sink",),
                read=lambda: {(s.name,): float(s.failed) for s in self.sinks})
        r.gauge("petal_sink_reconnects_total", "Times a sink's connection (MQTT) was made again after a loss",
                ("sink",),
                read=lambda: {(s.name,): float(s.reconnects) for s in self.sinks if hasattr(s, "reconnects")})
        r.gauge("petal_gallery_identities", "Identities in the gallery in use",
                read=lambda: {(): float(len(self.gallery_state.gallery))})
        r.gauge("petal_gallery_info", "The gallery in use (its version as a label)", ("version",),
                read=lambda: {(self.gallery_state.version,): 1.0})
        self.reloads_total = r.counter("petal_gallery_reloads_total", "Gallery reloads, by result", ("result",))

    def _refresh_metrics(self) -> None:
        for x in self.runners:
            stats = x.pipeline.stats
            self.frames_total.set_total(x.frames, source=x.name)
            self.dropped_total.set_total(x.dropped(), source=x.name)
            self.reconnects_total.set_total(x.reconnects(), source=x.name)
            self.faces_total.set_total(stats.faces, source=x.name)
            self.recognized_total.set_total(stats.recognized, source=x.name)
            self.saved_total.set_total(max(0, stats.faces - stats.recognized), source=x.name)
            for stage, seconds in list(stats.stage_seconds.items()):
                self.stage_total.set_total(round(seconds, 6), source=x.name, stage=stage)

    def metrics_text(self) -> str:
        self._refresh_metrics()
        return self.registry.render()

    # --- gallery
    def _load_gallery(self) -> GalleryState:
        s = self.config.service
        path = Path(s.gallery)
        key = _stat_key(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gallery = Gallery.load(path, self.models.fingerprint)  # a stale ANN index: a warning, exact search
            rule = load_rule(gallery, path, s.far, s.threshold)
        for w in caught:
            self.log(f"warning: {w.message}")
        if rule.note:
            self.log(f"warning: {rule.note}")
        version = str(gallery.meta.get("entries_sha256", ""))[:12]
        return GalleryState(gallery, rule, version, key, time.time())

    def request_reload(self) -> None:
        """Reload the gallery soon (what SIGHUP does); safe from a signal handler."""
        self._reload_requested.set()

    def reload_gallery(self) -> bool:
        """Load the gallery file aside and swap it in; on any problem keep the one in use. True if swapped."""
        try:
            state = self._load_gallery()
        except PetalError as exc:
            self.reloads_total.inc(result="refused")
            self.gallery_state.key = _stat_key(Path(self.config.service.gallery))  # not retried until it changes
            self.log(f"gallery reload refused, still using version {self.gallery_state.version}: {exc}")
            return False
        for runner in self.runners:
            runner.pipeline.swap_gallery(state)
        old, self.gallery_state = self.gallery_state, state
        self.reloads_total.inc(result="ok")
        self.log(f"gallery reloaded: version {old.version} -> {state.version} ({len(state.gallery)} identities)")
        return True

    def _watch_gallery(self) -> None:
        poll = self.config.service.gallery_poll_s
        path = Path(self.config.service.gallery)
        while not self.stopping.is_set():
            if self._reload_requested.wait(poll if poll > 0 else 0.5):
                self._reload_requested.clear()
                self.reload_gallery()
            elif poll > 0 and _stat_key(path) != self.gallery_state.key:
                time.sleep(0.05)  # let a writer finish the .npy and .json pair (it holds the gallery lock)
                self.reload_gallery()

    # --- events
    def publish(self, event: dict) -> None:
        with self._publish_lock:
            self.seq += 1
            event["seq"] = self.seq
        self.events_total.inc(type=event["type"])
        if "latency_ms" in event:
            self.event_latency.observe(event["latency_ms"] / 1000.0, type=event["type"])
        for sink in self.sinks:
            sink.offer(event)

    def write_thumbnail(self, source: str, tid: int, result: FrameResult, face: FaceResult) -> str | None:
        x, y, w, h = face.box
        pad = 0.4 * max(w, h)
        image = result.image
        x0, y0 = int(max(0, x - pad)), int(max(0, y - pad))
        x1, y1 = int(min(image.shape[1], x + w + pad)), int(min(image.shape[0], y + h + pad))
        if x1 <= x0 or y1 <= y0:
            return None
        ok, data = cv2.imencode(".jpg", image[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            return None
        target = self.thumbnails / f"{source}-{tid}-{result.index}.jpg"
        try:
            with atomic_path(target) as tmp:
                tmp.write_bytes(data.tobytes())
        except OSError as exc:
            self.log(f"thumbnail {target}: {exc.strerror or exc}")
            return None
        return str(target)

    # --- life cycle
    def start(self) -> "Service":
        self.started_at = time.time()
        self.worker.start()
        for sink in self.sinks:
            sink.start()
        if self.http is not None:
            self.http.start()
        watcher = threading.Thread(target=self._watch_gallery, name="petal-gallery-watch", daemon=True)
        watcher.start()
        self._threads.append(watcher)
        for runner in self.runners:
            runner.start()
        return self

    def source_ended(self) -> None:
        if all(r.state in ("ended", "failed") for r in self.runners):
            self.all_ended.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every source has ended (True), stop() was called, or `timeout` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopping.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self.all_ended.wait(0.2 if left is None else min(0.2, left)):
                if self.config.service.stop_when_sources_end:
                    return True
        return self.all_ended.is_set()

    def stop(self) -> None:
        """Close the sources, let every pipeline finish, deliver the events held (drain_s), stop HTTP."""
        self.stopping.set()
        for runner in self.runners:
            if runner.source is not None:
                runner.source.stop()
        for runner in self.runners:
            if runner.thread.is_alive():
                runner.thread.join(timeout=30)
        self.close()

    def close(self) -> None:
        self.stopping.set()
        worker = getattr(self, "worker", None)
        if worker is not None and worker.thread.is_alive():
            worker.stop()
        for runner in self.runners:
            if runner.source is not None:
                runner.source.close()
        drain = self.config.service.drain_s
        for sink in self.sinks:
            if sink.thread.is_alive():
                sink.close(drain)
            else:
                sink.finish()
        self.sinks_closed = True
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.models is not None:
            self.models.close()
            self.models = None

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        if not getattr(self, "sinks_closed", False):
            self.stop()

    # --- status
    def health(self) -> dict:
        up = sum(r.state == "running" for r in self.runners)
        ok = not self.stopping.is_set() and self.worker.thread.is_alive()
        return {"status": "ok" if ok else "stopping", "sources": len(self.runners), "sources_up": up,
                "gallery_version": self.gallery_state.version,
                "uptime_s": round(time.time() - (self.started_at or time.time()), 1)}

    def sources_status(self) -> dict:
        g = self.gallery_state
        return {"gallery": {"path": str(self.config.service.gallery), "version": g.version,
                            "identities": len(g.gallery), "loaded_at": round(g.loaded_at, 3),
                            "rule": "threshold" if self.config.service.threshold is not None else "far"},
                "sources": [r.status() for r in self.runners],
                "sinks": [s.status() for s in self.sinks]}

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        else:
            print(message, file=sys.stderr, flush=True)
