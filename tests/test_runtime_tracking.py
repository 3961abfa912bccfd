"""Tracker and quality-aware selection on synthetic boxes and embeddings (no models needed)."""
from __future__ import annotations

import numpy as np
import pytest

from petal_runtime.tracking import Selection, Track, Tracker, iou


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_iou():
    assert iou(np.array([0, 0, 10, 10]), np.array([0, 0, 10, 10])) == 1.0
    assert iou(np.array([0, 0, 10, 10]), np.array([5, 0, 10, 10])) == pytest.approx(50 / 150)
    assert iou(np.array([0, 0, 10, 10]), np.array([20, 20, 5, 5])) == 0.0


def _walk_across(hidden_b=(), frames=40, jitter=0.5, seed=0):
    """Walker A goes left to right on one row, B right to left 4 px lower; they cross at frame ~20.
    The detector reports them in a random order (its order carries no identity) with a little box
    noise, and misses B in the frames `hidden_b` (behind A). Returns each walker's track id per frame
    it was detected in, and the tracker."""
    rng = np.random.default_rng(seed)
    tracker = Tracker()
    seen: dict[str, dict[int, int]] = {"A": {}, "B": {}}
    for f in range(frames):
        truth = {"A": np.array([10 + 6 * f, 100, 20, 26], float), "B": np.array([250 - 6 * f, 104, 20, 26], float)}
        people = [p for p in rng.permutation(["A", "B"]) if not (p == "B" and f in hidden_b)]
        boxes = [truth[p] + np.r_[rng.uniform(-jitter, jitter, 2), 0, 0] for p in people]
        for person, track_id in zip(people, tracker.associate(f, boxes)):
            seen[person][f] = track_id
    return seen, tracker


@pytest.mark.parametrize("hidden_b", [(), tuple(range(18, 23))], ids=["both-visible", "b-occluded-at-crossing"])
def test_two_walkers_crossing_keep_their_own_tracks(hidden_b):
    """Through the crossing, every detection of a walker carries that walker's track: no swap, not even
    for one frame, and no new track (an occluded walker is picked up again by its predicted motion)."""
    seen, tracker = _walk_across(hidden_b)
    a, b = seen["A"][0], seen["B"][0]
    assert a != b
    assert set(seen["A"].values()) == {a}, f"walker A's detections went to tracks {seen['A']}"
    assert set(seen["B"].values()) == {b}, f"walker B's detections went to tracks {seen['B']}"
    assert len(seen["B"]) == 40 - len(hidden_b) and sorted(tracker.tracks) == sorted({a, b})


def test_small_fast_face_follows_by_centre_distance():
    """A 16 px face moving 12 px per frame overlaps its last box only a little: distance still links it."""
    tracker = Tracker()
    ids = [tracker.associate(f, [np.array([12.0 * f, 50, 16, 20])])[0] for f in range(20)]
    assert len(set(ids)) == 1


def test_missed_frames_end_a_track_and_reid_merges_it_back():
    tracker = Tracker(max_missed=3, reid_threshold=0.6)
    person = unit(np.r_[np.ones(4), np.zeros(124)])
    first = tracker.associate(0, [np.array([10, 10, 20, 20.0])])[0]
    tracker.add_embedding(first, person, 0.8)
    for f in range(1, 5):
        tracker.associate(f, [np.array([10 + f, 10, 20, 20.0])])
    # Occluded for 10 frames, then seen again far away: a new track at first ...
    second = tracker.associate(15, [np.array([200, 10, 20, 20.0])])[0]
    assert second != first
    # ... until its first embedding shows it is the same person: merged into the old track.
    merged = tracker.add_embedding(second, unit(person + 0.1 * np.r_[np.zeros(4), np.ones(124)] / 11), 0.7)
    assert merged.track_id == first and tracker.canonical(second) == first
    assert merged.merged_ids == [second] and merged.last_frame == 15 and merged.embeddings_seen == 2
    # Someone else does not merge.
    third = tracker.associate(30, [np.array([400, 10, 20, 20.0])])[0]
    other = tracker.add_embedding(third, unit(np.r_[np.zeros(4), np.ones(124)]), 0.9)
    assert other.track_id == third


def test_template_is_quality_weighted_mean_of_best_kept():
    tracker = Tracker(keep=2)
    tid = tracker.associate(0, [np.array([0, 0, 20, 20.0])])[0]
    a, b, c = unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1])
    tracker.add_embedding(tid, a, 0.9)
    tracker.add_embedding(tid, b, 0.3)
    tracker.add_embedding(tid, c, 0.1)  # worst: not kept
    track = tracker.get(tid)
    assert [q for q, _ in track.kept] == [0.9, 0.3]
    np.testing.assert_allclose(track.template, unit(0.9 * a + 0.3 * b), atol=1e-6)


def test_selection_best_runs_recognizer_on_few_crops():
    track = Track(1, np.zeros(4), 0, 0)
    policy = Selection("best", per_track=3, margin=0.05, min_interval=2)
    chosen = []
    for f, q in enumerate([0.2, 0.25, 0.3, 0.3, 0.3, 0.31, 0.3, 0.6, 0.6, 0.61, 0.2, 0.9]):
        if policy.wants(track, q, f):
            policy.record(track, q, f)
            chosen.append(f)
    # first crop, then every 2nd frame until three are kept, then only clearly better ones
    assert chosen == [0, 2, 4, 6, 8, 11]
    assert sorted(track.selected) == [0.3, 0.6, 0.9]
    everything = Selection("all")
    assert all(everything.wants(track, 0.0, f) for f in range(5))


def test_forgetting_bounds_memory():
    tracker = Tracker(max_tracks=50, reid_window=5, max_missed=1)
    for f in range(0, 400, 4):  # a new face every 4 frames, each seen once
        tracker.associate(f, [np.array([f % 300, 0, 20, 20.0])])
    assert len(tracker.tracks) <= 51 and tracker.forgotten >= 49


def test_ended_tracks_past_the_reid_window_drop_their_embeddings_and_keep_their_summary():
    tracker = Tracker(reid_window=5, max_missed=1, keep=6)
    rng = np.random.default_rng(0)
    for f in range(0, 200, 4):  # a new face every 4 frames (far from the last), each with embeddings
        (track_id,) = tracker.associate(f, [np.array([(f * 7) % 600, 0, 20, 20.0])])
        for q in (0.2, 0.5, 0.8):
            e = rng.normal(size=128)
            tracker.add_embedding(track_id, e / np.linalg.norm(e), q)
        tracker.get(track_id).identity = f"person {f}"
    old = [t for t in tracker.all_tracks() if 196 - t.last_frame > 2 * tracker.reid_window]
    assert len(old) > 40
    assert all(t.kept == [] and t.template is None for t in old)
    assert all(t.identity.startswith("person ") and t.embeddings_seen >= 3 for t in old)
    recent = tracker.get(track_id)
    assert len(recent.kept) == 3 and recent.template is not None  # still a re-identification candidate


def test_iou_is_vectorised_and_nms_keeps_the_best_of_each_overlap():
    from petal_runtime.boxes import nms

    boxes = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5]], float)
    pairs = iou(boxes[:, None], boxes[None])
    assert pairs.shape == (3, 3) and np.allclose(np.diag(pairs), 1.0)
    assert pairs[0, 1] == pytest.approx(50 / 150) and pairs[0, 2] == 0.0
    assert iou(boxes[0], boxes).tolist() == pairs[0].tolist()
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert nms(boxes, [0.5, 0.9, 0.1], 0.3) == [1, 2]  # 0 overlaps the better 1 by 0.33
    assert nms(boxes, [0.5, 0.9, 0.1], 0.4) == [1, 0, 2]
    assert nms(np.zeros((0, 4)), [], 0.3) == []
