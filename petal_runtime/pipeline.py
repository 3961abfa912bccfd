"""The runtime pipeline: frames in, named tracks out.

    pipeline = Pipeline.from_dir("exported/", "gallery.npy")
    faces = pipeline.process(frame_bgr)            # one frame, synchronously -> list[FaceResult]
    for result in pipeline.run("clip.mp4"):        # a whole source, threaded -> FrameResult per frame
        ...
    pipeline.tracks()                              # TrackSummary per person seen

Per frame: YuNet detection (on a rescaled frame so faces down to `min_face` px are found; between
full-frame passes, only around live tracks), five-point alignment to 112x112, IoU/motion tracking,
IQA on every crop, alpha from the manifest's threshold, quality-aware selection of the crops the
recognizer runs on, the recognizer (IQA and recognizer batched across faces and frames),
quality-weighted track templates, and identification of each track against the gallery (top-k of
the kept crops' quality-weighted mean scores, "unknown" below the threshold that the false-alarm
target sets at the track's quality; see openset.py).

`run` joins three stages with bounded queues: decoding; analysis (detect, align, associate); and
recognition (IQA, selection, recognizer, templates, gallery), which balances the work of a small
CPU between two busy threads. Memory stays flat on an endless stream;
when the consumer is slower than a live source, frames are dropped by policy (`drop`), never
buffered without bound.
"""
from __future__ import annotations

import collections
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from .align import align_face
from .boxes import nms
from .contract import to_model_input
from .detect import YUNET_MIN_FACE, Detection, FaceDetector
from .errors import PetalError
from .gallery import UNKNOWN, Gallery
from .models import Models
from .sources import Frame, Source, open_source
from .openset import FALLBACK_THRESHOLD, Decision, FarCalibration, OpenSetRule, PetalWarning, check_far, load_rule
from .tracking import SELECTION_MODES, Selection, Tracker, quality_weight

DROP_POLICIES = ("auto", "block", "drop-oldest", "drop-newest")
MAX_UPSCALE = 2.0  # the most a frame is enlarged for the detector
MIN_FACE = int(YUNET_MIN_FACE / MAX_UPSCALE)  # the smallest min_face: YuNet's minimum at MAX_UPSCALE
STAGES = ("decode", "detect", "align", "track", "iqa", "select", "recognize", "identify")
ROI_SIZE = 96  # side of the square a live track's neighbourhood is resampled to for re-detection
ROI_FACTOR = 2.5  # that neighbourhood's side, in face sizes (the face comes out near 38 px)


@dataclass
class PipelineConfig:
    min_face: int = 16  # smallest face (detector box width, frame pixels) to find
    detect_scale: float | None = None  # None: YuNet's minimum / min_face (so min_face px faces are found)
    detect_every: int = 4  # a full-frame detection pass every N frames; between them, around live tracks
    detector_score: float = 0.6
    nms_threshold: float = 0.3
    far: float | None = None  # open-set false-alarm target (None: DEFAULT_FAR where the gallery is calibrated)
    open_set_threshold: float | None = None  # a fixed cosine instead of the calibrated FAR rule
    top_k: int = 5
    selection: str = "best"  # "best": recognizer on each track's best crops only; "all": on every crop
    per_track: int = 3
    selection_margin: float = 0.02
    selection_interval: int = 3
    iou_threshold: float = 0.2
    max_missed: int = 12
    template_size: int = 6
    reid_threshold: float = 0.6
    batch_size: int = 32
    queue_size: int = 8
    drop: str = "auto"  # block (files), drop-oldest (live sources), drop-newest

    def __post_init__(self) -> None:
        if self.min_face < MIN_FACE:
            raise PetalError(f"min_face {self.min_face} px is below what any detector finds (use {MIN_FACE} or more)")
        if self.selection not in SELECTION_MODES:
            raise PetalError(f"selection must be one of {', '.join(SELECTION_MODES)}, got {self.selection!r}")
        if self.drop not in DROP_POLICIES:
            raise PetalError(f"drop must be one of {', '.join(DROP_POLICIES)}, got {self.drop!r}")
        if self.detect_every < 1 or self.batch_size < 1 or self.queue_size < 1:
            raise PetalError("detect_every, batch_size and queue_size must be at least 1")
        if self.far is not None:
            check_far(self.far)

    def scale(self) -> float:
        if self.detect_scale is not None:
            return float(self.detect_scale)
        return float(np.clip(YUNET_MIN_FACE / self.min_face, 0.25, MAX_UPSCALE))


@dataclass
class FaceResult:
    frame: int
    track_id: int
    box: np.ndarray  # x, y, w, h in frame pixels
    landmarks: np.ndarray  # [5, 2]
    detection_score: float
    quality: float
    alpha: float
    recognized: bool  # the recognizer ran on this crop
    identity: str = UNKNOWN
    score: float = float("nan")
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"track_id": self.track_id, "box": [round(float(v), 1) for v in self.box],
                "detection_score": round(self.detection_score, 3), "quality": round(self.quality, 4),
                "alpha": round(self.alpha, 4), "recognized": self.recognized, "identity": self.identity,
                "score": None if np.isnan(self.score) else round(float(self.score), 4)}


@dataclass
class FrameResult:
    index: int
    time: float | None
    faces: list[FaceResult]
    image: np.ndarray | None = None  # BGR, when run(keep_images=True)

    def to_dict(self) -> dict:
        return {"index": self.index, "time": None if self.time is None else round(float(self.time), 4),
                "faces": [f.to_dict() for f in self.faces]}


@dataclass
class TrackSummary:
    track_id: int
    identity: str
    score: float
    top_k: list[tuple[str, float]]
    first_frame: int
    last_frame: int
    frames: int
    best_quality: float
    recognized: int  # crops the recognizer ran on
    merged_ids: list[int]
    decision: Decision | None = None  # the FAR and threshold the identity was decided at

    def to_dict(self) -> dict:
        return {"track_id": self.track_id, "identity": self.identity,
                "decision": None if self.decision is None else self.decision.to_dict(),
                "score": None if np.isnan(self.score) else round(float(self.score), 4),
                "top_k": [{"name": n, "score": round(float(s), 4)} for n, s in self.top_k],
                "first_frame": self.first_frame, "last_frame": self.last_frame, "frames": self.frames,
                "best_quality": None if not np.isfinite(self.best_quality) else round(float(self.best_quality), 4),
                "recognized": self.recognized, "merged_ids": self.merged_ids}


@dataclass
class PipelineStats:
    frames: int = 0  # frames analysed
    frames_read: int = 0
    dropped_frames: int = 0
    faces: int = 0  # crops (every one went through IQA)
    recognized: int = 0  # crops the recognizer ran on
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})

    @property
    def selection_saving(self) -> float:
        """Share of crops the recognizer did not have to run on."""
        return 1.0 - self.recognized / self.faces if self.faces else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def add(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def to_dict(self) -> dict:
        per_frame = {k: round(1000 * v / max(self.frames, 1), 3) for k, v in self.stage_seconds.items()}
        return {"frames": self.frames, "frames_read": self.frames_read, "dropped_frames": self.dropped_frames,
                "faces": self.faces, "recognized": self.recognized,
                "selection_saving": round(self.selection_saving, 4), "wall_seconds": round(self.wall_seconds, 3),
                "fps": round(self.fps, 2), "stage_ms_per_frame": per_frame}


@dataclass
class _Pending:
    """A frame after detection, alignment and association, waiting for IQA and the recognizer."""

    frame: Frame
    faces: list[FaceResult]
    crops: np.ndarray | None  # float32 [n, 3, 112, 112] RGB, one per face
    keep_image: bool
    selected: list[int] = field(default_factory=list)  # faces the recognizer runs on


class _BoundedQueue:
    """A bounded FIFO with a drop policy for the producer, and stop-aware blocking."""

    def __init__(self, maxsize: int, policy: str = "block") -> None:
        self.maxsize = maxsize
        self.policy = policy
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.dropped = 0

    def put(self, item: Any, stop: threading.Event, force: bool = False) -> bool:
        with self.cond:
            while len(self.items) >= self.maxsize and not force:
                if self.policy == "drop-oldest":
                    self.items.popleft()
                    self.dropped += 1
                    break
                if self.policy == "drop-newest":
                    self.dropped += 1
                    return False
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.items.append(item)
            self.cond.notify_all()
            return True

    def get(self, stop: threading.Event, block: bool = True) -> Any:
        with self.cond:
            while not self.items:
                if not block or stop.is_set():
                    return None
                self.cond.wait(0.1)
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def peek_all(self) -> list:
        with self.cond:
            return list(self.items)


_END = object()


class _Stages:
    """One Pipeline.run: decoding, analysis (detect, align, associate) and recognition, a thread each,
    joined by bounded queues. The frames queue follows the drop policy; the other two block.

    Every stage puts _END on its output queue when it stops, for whatever reason; an exception in a
    stage is kept for the consumer (which re-raises it) and stops the others.
    """

    def __init__(self, pipeline: "Pipeline", src: Source, owned: bool, keep_images: bool) -> None:
        config = pipeline.config
        policy = config.drop
        if policy == "auto":
            policy = "drop-oldest" if src.live else "block"
        self.pipeline, self.stats = pipeline, pipeline.stats
        self.src, self.owned, self.keep_images = src, owned, keep_images
        self.frames_q = _BoundedQueue(config.queue_size, policy)
        self.pending_q = _BoundedQueue(config.queue_size)
        self.results_q = _BoundedQueue(config.queue_size)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [self._thread(self.read, self.frames_q, "petal-decode"),
                        self._thread(self.analyze, self.pending_q, "petal-analyze"),
                        self._thread(self.recognize, self.results_q, "petal-recognize")]

    def _thread(self, body, out_q: _BoundedQueue, name: str) -> threading.Thread:
        return threading.Thread(target=self._guarded, args=(body, out_q), name=name, daemon=True)

    def _guarded(self, body, out_q: _BoundedQueue) -> None:
        try:
            body()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self.errors.append(exc)
            self.stop.set()
        finally:
            out_q.put(_END, self.stop, force=True)

    def read(self) -> None:
        """Decode frames into the frames queue (which drops by policy when full)."""
        try:
            iterator = iter(self.src)
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(iterator)
                except StopIteration:
                    break
                self.stats.add("decode", time.perf_counter() - t0)
                self.stats.frames_read += 1
                self.frames_q.put(frame, self.stop)
                self.stats.dropped_frames = self.frames_q.dropped  # live, for a service's metrics
        finally:
            self.stats.dropped_frames = self.frames_q.dropped
            if self.owned:
                self.src.close()

    def analyze(self) -> None:
        """Detect, align and associate each frame, in order."""
        while True:
            frame = self.frames_q.get(self.stop)
            if frame is _END or frame is None:
                break
            self.pending_q.put(self.pipeline._analyze(frame, self.keep_images), self.stop)

    def recognize(self) -> None:
        """Recognise analysed frames, batched across the frames already waiting (up to batch_size crops)."""
        done = False
        while not done:
            first = self.pending_q.get(self.stop)
            if first is _END or first is None:
                break
            batch, crops = [first], len(first.faces)
            while crops < self.pipeline.config.batch_size:
                nxt = self.pending_q.get(self.stop, block=False)
                if nxt is None:
                    break
                if nxt is _END:
                    done = True
                    break
                batch.append(nxt)
                crops += len(nxt.faces)
            for result in self.pipeline._recognize(batch):
                self.results_q.put(result, self.stop)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def results(self) -> Iterator[FrameResult]:
        """The recognised frames, in order, until the last stage ends; then a stage's exception, if any."""
        while True:
            item = self.results_q.get(self.stop)
            if item is _END or item is None:
                break
            yield item
        if self.errors:
            raise self.errors[0]

    def shut_down(self) -> None:
        self.stop.set()
        self.src.stop()
        # Analysis and recognition finish the item in hand and stop at their next queue operation;
        # waiting for them keeps a later run (or reset()) from sharing state with them. The reader
        # may sit in a network read: it gets a second, then is left to end with the source's timeout
        # (closing the source meanwhile is safe: the reading thread closes the container itself).
        self.threads[0].join(timeout=1.0)
        for t in self.threads[1:]:
            t.join()
        self.stats.dropped_frames = self.frames_q.dropped


class _Detector:
    """Full-frame YuNet passes every `detect_every` frames; in between, re-detection around live tracks."""

    def __init__(self, config: PipelineConfig, detector_model: str | Path | None = None) -> None:
        self.config = config
        self.full = FaceDetector(detector_model, config.detector_score, config.nms_threshold, scale=config.scale())
        self.roi = FaceDetector(detector_model, max(0.5, config.detector_score - 0.1), config.nms_threshold, scale=1.0)
        self.count = 0

    def __call__(self, image: np.ndarray, predicted: dict[int, np.ndarray]) -> list[Detection]:
        full_pass = self.count % self.config.detect_every == 0 or not predicted
        self.count += 1
        if full_pass:
            found = self.full.detect(image)
        else:
            found = []
            for box in predicted.values():
                found += self._around(image, box)
            found = _nms(found, self.config.nms_threshold)
        min_w = 0.5 * self.config.min_face
        return [d for d in found if d.box[2] >= min_w]

    def _around(self, image: np.ndarray, box: np.ndarray) -> list[Detection]:
        """Re-find one live track's face in its neighbourhood, resampled to ROI_SIZE (faces of any size
        come out near 38 px there). Only the detection nearest the predicted box is kept: other faces
        in the patch belong to other tracks (found through their own patch) or are new (found by the
        next full pass)."""
        size = max(box[2], box[3], 8.0)
        side = ROI_FACTOR * size
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        x0, y0 = cx - side / 2, cy - side / 2
        k = ROI_SIZE / side
        matrix = np.array([[k, 0, -k * x0], [0, k, -k * y0]], np.float64)
        interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
        patch = cv2.warpAffine(image, matrix, (ROI_SIZE, ROI_SIZE), flags=interp, borderMode=cv2.BORDER_REPLICATE)
        best, best_distance = None, size  # the face must lie within one face size of the prediction
        for d in self.roi.detect(patch):
            b = d.box / k + np.array([x0, y0, 0, 0])
            distance = float(np.hypot(b[0] + b[2] / 2 - cx, b[1] + b[3] / 2 - cy))
            if distance < best_distance and 0.5 <= b[2] / max(box[2], 1e-6) <= 2.0:
                best, best_distance = Detection(b, d.landmarks / k + np.array([x0, y0]), d.score), distance
        return [best] if best is not None else []


def _nms(detections: list[Detection], threshold: float) -> list[Detection]:
    keep = nms([d.box for d in detections], [d.score for d in detections], threshold)
    return [detections[i] for i in keep]


def check_frame(image) -> None:
    """Refuse what process() cannot analyse correctly, instead of finding no faces in it silently."""
    if not isinstance(image, np.ndarray):
        raise PetalError(f"process() takes a numpy BGR image (uint8 [H, W, 3]), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PetalError(f"process() takes a BGR image [H, W, 3], got shape {list(image.shape)}"
                         + (" (grey: cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))" if image.ndim == 2 else ""))
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise PetalError(f"process() got an empty image of shape {list(image.shape)}")
    if image.dtype != np.uint8:
        hint = ("(np.clip(image * 255, 0, 255).astype(np.uint8) for floats in 0..1)" if image.dtype.kind == "f"
                else "(image >> 8).astype(np.uint8) for 16-bit frames" if image.dtype == np.uint16 else "")
        raise PetalError(f"process() takes 8-bit frames (uint8, 0..255), got {image.dtype}; "
                         f"convert first {hint}".rstrip())


class Pipeline:
    def __init__(self, models: Models, gallery: Gallery | None = None, config: PipelineConfig | None = None,
                 detector_model: str | Path | None = None,
                 calibration: str | Path | FarCalibration | None = None) -> None:
        self.models = models
        self.config = config or PipelineConfig()
        if gallery is not None:
            gallery.check(models.fingerprint)
        self.gallery = gallery
        # The open-set rule (openset.py): the FAR target through the gallery's calibration
        # (gallery.far.json beside it, or `calibration`), or config.open_set_threshold as a fixed cosine.
        fixed = self.config.open_set_threshold
        self.open_set = OpenSetRule(threshold=FALLBACK_THRESHOLD if fixed is None else fixed)
        if gallery is not None:
            self.open_set = load_rule(gallery, gallery.path, self.config.far, self.config.open_set_threshold,
                                      calibration)
            if self.open_set.note:
                warnings.warn(self.open_set.note, PetalWarning, stacklevel=2)
        self.selection = Selection(self.config.selection, self.config.per_track, self.config.selection_margin,
                                   self.config.selection_interval)
        self._detector_model = detector_model
        self.reset()

    @classmethod
    def from_dir(cls, models: str | Path | None, gallery: str | Path | Gallery | None = None, backend: str = "auto",
                 config: PipelineConfig | None = None, threads: int | None = None, precision: str | None = None,
                 url: str | None = None, **kwargs) -> "Pipeline":
        """models: a petal-export folder; None with `url`, a server that serves them (--backend triton)."""
        loaded = Models.from_dir(models, backend=backend, threads=threads, precision=precision,
                                 max_batch=(config or PipelineConfig()).batch_size, url=url)
        try:
            if gallery is not None and not isinstance(gallery, Gallery):
                gallery = Gallery.load(gallery, loaded.fingerprint)
            return cls(loaded, gallery, config, **kwargs)
        except BaseException:
            loaded.close()
            raise

    def reset(self) -> None:
        """Forget all tracks and counters (a new video)."""
        c = self.config
        self.tracker = Tracker(c.iou_threshold, max_missed=c.max_missed, keep=c.template_size,
                               reid_threshold=c.reid_threshold)
        self.detector = _Detector(c, self._detector_model)
        self.stats = PipelineStats()
        self._frame_counter = 0

    def close(self) -> None:
        self.models.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the two halves of a frame
    def _analyze(self, frame: Frame, keep_image: bool = False) -> _Pending:
        """Stage 2: detection, alignment and association (the work that needs the full frame)."""
        stats = self.stats
        t0 = time.perf_counter()
        predicted = self.tracker.predicted_boxes(frame.index)
        detections = self.detector(frame.image, predicted)
        t1 = time.perf_counter()
        crops = [align_face(frame.image, d.landmarks) for d in detections]
        batch = to_model_input(np.stack([c[..., ::-1] for c in crops])) if crops else None  # BGR -> RGB
        t2 = time.perf_counter()
        ids = self.tracker.associate(frame.index, [d.box for d in detections])
        faces = [FaceResult(frame.index, tid, d.box, d.landmarks, d.score, float("nan"), float("nan"), False)
                 for d, tid in zip(detections, ids)]
        t3 = time.perf_counter()
        stats.add("detect", t1 - t0)
        stats.add("align", t2 - t1)
        stats.add("track", t3 - t2)
        stats.frames += 1
        stats.faces += len(faces)
        return _Pending(frame, faces, batch, keep_image)

    def _recognize(self, pending: list[_Pending]) -> list[FrameResult]:
        """Stage 3, on one or more frames in order: IQA on every crop (one batch), quality-aware
        selection, the recognizer on the selected crops (one batch), templates and identities."""
        t0 = time.perf_counter()
        with_faces = [p for p in pending if p.crops is not None]
        quality = self.models.quality(np.concatenate([p.crops for p in with_faces])) if with_faces else None
        alpha = self.models.alpha(quality) if quality is not None else None
        t1 = time.perf_counter()
        picked, picked_alpha, row = [], [], 0
        with self.tracker.lock:
            for p in with_faces:
                for i, face in enumerate(p.faces):
                    face.quality, face.alpha = float(quality[row]), float(alpha[row])
                    track = self.tracker.get(face.track_id)
                    track.best_quality = max(track.best_quality, face.quality)
                    if self.selection.wants(track, face.quality, p.frame.index):
                        self.selection.record(track, face.quality, p.frame.index)
                        face.recognized = True
                        p.selected.append(i)
                        picked.append(p.crops[i])
                        picked_alpha.append(face.alpha)
                    row += 1
        t2 = time.perf_counter()
        embeddings = self.models.embed(np.stack(picked), np.array(picked_alpha, np.float32)) if picked else None
        t3 = time.perf_counter()
        touched, row = set(), 0
        for p in with_faces:
            for i in p.selected:
                face = p.faces[i]
                track = self.tracker.add_embedding(face.track_id, embeddings[row], face.quality)
                touched.add(track.track_id)
                row += 1
        for tid in touched:
            self._identify(tid)
        results = []
        with self.tracker.lock:
            for p in pending:
                for face in p.faces:
                    track = self.tracker.get(face.track_id)
                    face.track_id = track.track_id
                    face.identity, face.score, face.top_k = track.identity, track.score, list(track.top_k)
                results.append(FrameResult(p.frame.index, p.frame.time, p.faces,
                                           p.frame.image if p.keep_image else None))
        t4 = time.perf_counter()
        self.stats.recognized += len(picked)
        self.stats.add("iqa", t1 - t0)
        self.stats.add("select", t2 - t1)
        self.stats.add("recognize", t3 - t2)
        self.stats.add("identify", t4 - t3)
        return results

    def _identify(self, track_id: int) -> None:
        with self.tracker.lock:
            track = self.tracker.get(track_id)
            if track.template is None or self.gallery is None or len(self.gallery) == 0:
                return
            # The kept crops' scores, averaged with quality weights, against the threshold at their quality.
            qualities = np.array([q for q, _ in track.kept], np.float64)
            weights = np.array([quality_weight(q) for q in qualities], np.float64)
            evidence = self.open_set.decide(self.gallery, np.stack([e for _, e in track.kept]), qualities, weights,
                                            self.config.top_k)
            track.identity, track.score, track.top_k = evidence.identity, evidence.score, evidence.top_k
            track.decision = evidence.decision

    # --- public API
    def process(self, image: np.ndarray, index: int | None = None, time_s: float | None = None) -> list[FaceResult]:
        """Analyse one BGR frame synchronously; frames of one stream must come in order.

        `image`: a numpy uint8 array [H, W, 3], BGR (what OpenCV and PyAV's bgr24 give); anything else
        (a list, another dtype, an empty or grey image) is a PetalError saying how to convert it.
        """
        check_frame(image)
        if index is None:
            index = self._frame_counter
        self._frame_counter = index + 1
        start = time.perf_counter()
        result = self._recognize([self._analyze(Frame(index, time_s, image))])[0]
        self.stats.wall_seconds += time.perf_counter() - start
        return result.faces

    def run(self, source: Source | str | int | Path, keep_images: bool = False) -> Iterator[FrameResult]:
        """Process a whole source in three threads; yields a FrameResult per analysed frame, in order.

        Closing the iterator early (break, Ctrl-C) stops the threads; `self.stats` and
        `self.tracks()` hold the results so far.
        """
        owned = not isinstance(source, Source)
        src = open_source(source) if owned else source
        start = time.perf_counter()
        stages = _Stages(self, src, owned, keep_images)
        stages.start()
        try:
            yield from stages.results()
        finally:
            stages.shut_down()
            self.stats.wall_seconds += time.perf_counter() - start

    def tracks(self, min_frames: int = 1) -> list[TrackSummary]:
        out = []
        for t in self.tracker.all_tracks():
            if t.frames < min_frames:
                continue
            out.append(TrackSummary(t.track_id, t.identity, t.score, list(t.top_k), t.first_frame, t.last_frame,
                                    t.frames, t.best_quality, t.embeddings_seen, list(t.merged_ids),
                                    t.decision))
        return out

    def canonical(self, track_id: int) -> int:
        return self.tracker.canonical(track_id)
