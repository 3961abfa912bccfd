"""Tracks of faces across frames: IoU/motion association, embedding re-identification, templates.

Association (per frame, on detections): each live track predicts its box from its last velocity;
pairs are scored by IoU, or for small fast faces whose boxes no longer overlap, by centre distance
relative to face size; greedy matching takes the best pairs first. Unmatched detections start new
tracks; a track unseen for `max_missed` frames ends.

Embedding association: when a young track receives its first embedding, it is compared with the
templates of tracks that ended recently (within `reid_window` frames, and not overlapping it in
time); above `reid_threshold` cosine the young track is merged into the old one (same person,
briefly lost), and its id becomes an alias of the old one.

Templates: each track keeps its `keep` best-quality embeddings; its template is their
quality-weighted mean, L2-normalised.

Quality-aware selection (`Selection`) decides per crop whether the recognizer runs at all: until a
track has `per_track` embeddings, then only for a crop clearly better than its worst kept one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .boxes import iou

SELECTION_MODES = ("best", "all")


def quality_weight(quality: float) -> float:
    """Template weight of an embedding: its quality, floored so every kept crop counts a little."""
    return float(max(quality, 0.01))


@dataclass
class Track:
    track_id: int
    box: np.ndarray  # last observed [x, y, w, h]
    first_frame: int
    last_frame: int
    frames: int = 1  # frames the face was seen in
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # per frame, of [cx, cy, w, h]
    best_quality: float = float("-inf")
    # Selection (analysis side): qualities of crops sent to the recognizer.
    selected: list[float] = field(default_factory=list)
    last_selected_frame: int = -10**9
    # Recognition side.
    kept: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (quality, embedding)
    template: np.ndarray | None = None
    embeddings_seen: int = 0
    identity: str = "unknown"
    score: float = float("nan")
    top_k: list[tuple[str, float]] = field(default_factory=list)
    merged_ids: list[int] = field(default_factory=list)
    decision: object | None = None  # openset.Decision behind `identity` (FAR, threshold, quality)

    def predict(self, frame: int) -> np.ndarray:
        steps = max(0, frame - self.last_frame)
        cx, cy, w, h = self.box[0] + self.box[2] / 2, self.box[1] + self.box[3] / 2, self.box[2], self.box[3]
        cx, cy, w, h = np.array([cx, cy, w, h]) + self.velocity * steps
        w, h = max(w, 2.0), max(h, 2.0)
        return np.array([cx - w / 2, cy - h / 2, w, h])

    def observe(self, frame: int, box: np.ndarray) -> None:
        steps = max(1, frame - self.last_frame)
        old = np.array([self.box[0] + self.box[2] / 2, self.box[1] + self.box[3] / 2, self.box[2], self.box[3]])
        new = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2, box[2], box[3]])
        measured = (new - old) / steps
        self.velocity = measured if self.frames == 1 else 0.6 * measured + 0.4 * self.velocity
        self.box = np.asarray(box, np.float64)
        self.last_frame = frame
        self.frames += 1


@dataclass(frozen=True)
class Selection:
    """Which crops the recognizer runs on. `all`: every crop. `best` (default): a track's first
    `per_track` crops (at least `min_interval` frames apart), then only crops whose quality beats the
    worst already sent by `margin`."""

    mode: str = "best"
    per_track: int = 3
    margin: float = 0.02
    min_interval: int = 3

    def wants(self, track: Track, quality: float, frame: int) -> bool:
        if self.mode == "all":
            return True
        if not track.selected:
            return True
        if frame - track.last_selected_frame < self.min_interval:
            return False
        if len(track.selected) < self.per_track:
            return True
        return quality > min(track.selected) + self.margin

    def record(self, track: Track, quality: float, frame: int) -> None:
        track.last_selected_frame = frame
        track.selected.append(float(quality))
        if self.mode == "best" and len(track.selected) > self.per_track:
            track.selected.remove(min(track.selected))


class Tracker:
    def __init__(self, iou_threshold: float = 0.2, distance: float = 1.0, max_missed: int = 12,
                 keep: int = 6, reid_window: int = 75, reid_threshold: float = 0.6, max_tracks: int = 10_000) -> None:
        self.iou_threshold = iou_threshold
        self.distance = distance  # centre distance, in face widths, still accepted as the same face
        self.max_missed = max_missed
        self.keep = keep
        self.reid_window = reid_window
        self.reid_threshold = reid_threshold
        self.max_tracks = max_tracks  # on an endless stream the oldest ended tracks are forgotten
        self.forgotten = 0
        self.tracks: dict[int, Track] = {}  # every track ever (merged ones removed), up to max_tracks
        self.aliases: dict[int, int] = {}  # merged id -> surviving id
        self._live: list[int] = []
        self._next = 1
        self._released_at = 0
        self.lock = threading.RLock()

    # --- association
    def live(self, frame: int) -> list[Track]:
        with self.lock:
            self._live = [t for t in self._live
                          if t in self.tracks and frame - self.tracks[t].last_frame <= self.max_missed]
            return [self.tracks[t] for t in self._live]

    def associate(self, frame: int, boxes: list[np.ndarray]) -> list[int]:
        """Track id for each detection box (new tracks for unmatched ones)."""
        with self.lock:
            live = self.live(frame)
            pairs = []
            for ti, track in enumerate(live):
                if track.last_frame >= frame:
                    continue
                predicted = track.predict(frame)
                size = max(predicted[2], predicted[3], 1.0)
                overlaps = iou(predicted, np.reshape(np.asarray(boxes, np.float64), (-1, 4)))
                for di, box in enumerate(boxes):
                    overlap = float(overlaps[di])
                    centre = np.hypot(predicted[0] + predicted[2] / 2 - box[0] - box[2] / 2,
                                      predicted[1] + predicted[3] / 2 - box[1] - box[3] / 2) / size
                    ratio = box[2] / max(predicted[2], 1e-6)
                    if overlap >= self.iou_threshold or (centre <= self.distance and 0.6 <= ratio <= 1.67):
                        pairs.append((overlap + 0.5 * max(0.0, 1.0 - centre), ti, di))
            pairs.sort(key=lambda p: -p[0])
            ids: list[int | None] = [None] * len(boxes)
            used = set()
            for _, ti, di in pairs:
                if ti in used or ids[di] is not None:
                    continue
                used.add(ti)
                live[ti].observe(frame, boxes[di])
                ids[di] = live[ti].track_id
            for di, box in enumerate(boxes):
                if ids[di] is None:
                    track = Track(self._next, np.asarray(box, np.float64), frame, frame)
                    self._next += 1
                    self.tracks[track.track_id] = track
                    self._live.append(track.track_id)
                    ids[di] = track.track_id
            if frame - self._released_at >= self.reid_window:
                self._release(frame)
            if len(self.tracks) > self.max_tracks:
                self._forget(frame)
            return [int(i) for i in ids]  # type: ignore[arg-type]

    def _release(self, frame: int) -> None:
        """Ended tracks past the re-identification window keep their summary only: their embeddings
        and template serve re-identification alone, so an endless stream holds ~200 bytes per ended
        track (up to max_tracks of them) instead of a few KB."""
        self._released_at = frame
        live = set(self._live)
        for track in self.tracks.values():
            if track.kept and track.track_id not in live and frame - track.last_frame > self.reid_window:
                track.kept, track.template = [], None

    def _forget(self, frame: int) -> None:
        live = set(self._live)
        ended = [t for t in self.tracks.values()
                 if t.track_id not in live and frame - t.last_frame > self.reid_window]
        for track in sorted(ended, key=lambda t: t.last_frame)[: len(self.tracks) - self.max_tracks]:
            del self.tracks[track.track_id]
            self.forgotten += 1
        self.aliases = {k: v for k, v in self.aliases.items() if v in self.tracks}

    def predicted_boxes(self, frame: int) -> dict[int, np.ndarray]:
        with self.lock:
            return {t.track_id: t.predict(frame) for t in self.live(frame)}

    # --- identity
    def canonical(self, track_id: int) -> int:
        with self.lock:
            while track_id in self.aliases:
                track_id = self.aliases[track_id]
            return track_id

    def get(self, track_id: int) -> Track:
        with self.lock:
            return self.tracks[self.canonical(track_id)]

    def add_embedding(self, track_id: int, embedding: np.ndarray, quality: float) -> Track:
        """Add a recognised crop to its track; may merge a young track into a recently ended one."""
        with self.lock:
            track = self.get(track_id)
            first = track.embeddings_seen == 0
            track.embeddings_seen += 1
            track.kept.append((float(quality), np.asarray(embedding, np.float32)))
            track.kept.sort(key=lambda k: -k[0])
            del track.kept[self.keep:]
            track.template = self._template(track.kept)
            if first:
                older = self._reidentify(track)
                if older is not None:
                    return self._merge(track, older)
            return track

    def _template(self, kept: list[tuple[float, np.ndarray]]) -> np.ndarray:
        weights = np.array([quality_weight(q) for q, _ in kept], np.float32)
        mean = (np.stack([e for _, e in kept]) * weights[:, None]).sum(0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def _reidentify(self, track: Track) -> Track | None:
        best, best_score = None, self.reid_threshold
        for other in self.tracks.values():
            if other is track or other.template is None:
                continue
            if other.last_frame >= track.first_frame or track.first_frame - other.last_frame > self.reid_window:
                continue  # overlapping in time (two people) or ended too long ago
            score = float(other.template @ track.template)
            if score >= best_score:
                best, best_score = other, score
        return best

    def _merge(self, young: Track, old: Track) -> Track:
        old.kept = sorted(old.kept + young.kept, key=lambda k: -k[0])[: self.keep]
        old.template = self._template(old.kept)
        old.embeddings_seen += young.embeddings_seen
        old.box, old.velocity = young.box, young.velocity
        old.last_frame = max(old.last_frame, young.last_frame)
        old.frames += young.frames
        old.best_quality = max(old.best_quality, young.best_quality)
        old.selected = sorted(old.selected + young.selected)[-max(1, len(old.selected)):]
        old.last_selected_frame = max(old.last_selected_frame, young.last_selected_frame)
        old.merged_ids.append(young.track_id)
        self.aliases[young.track_id] = old.track_id
        del self.tracks[young.track_id]
        self._live = [old.track_id if t == young.track_id else t for t in self._live]
        if self._live.count(old.track_id) > 1:
            seen = set()
            self._live = [t for t in self._live if not (t in seen or seen.add(t))]
        return old

    def all_tracks(self) -> list[Track]:
        with self.lock:
            return sorted(self.tracks.values(), key=lambda t: t.track_id)
