"""The pipeline and petal-run on real encoded clips: real LFW faces walking through a scene at low
resolution (H.264 through PyAV, with blur, noise and compression), identified against a gallery
built from *other* photos of the same people."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

import runtime_support as rs
from runtime_support import run
from petal_runtime.errors import PetalError
from petal_runtime.pipeline import Pipeline, PipelineConfig
from petal_runtime.sources import Frame, Source

setup = rs.setup  # the module's models, gallery and clip (a fixture of runtime_support)


def assign_truth(report: dict, clip) -> dict[int, str]:
    """track id -> identity of the walker its faces sit on (by box centre distance)."""
    votes: dict[int, dict[str, int]] = {}
    for frame in report["frames"]:
        for face in frame["faces"]:
            x, y, w, h = face["box"]
            best, dist = None, 1e9
            for truth in clip.tracks:
                box = truth.box_at(frame["index"])
                if box is None:
                    continue
                d = np.hypot(box[0] + box[2] / 2 - x - w / 2, box[1] + box[3] / 2 - y - h / 2)
                if d < dist:
                    best, dist = truth.identity, d
            if best is not None and dist < max(w, h):
                votes.setdefault(face["track_id"], {}).setdefault(best, 0)
                votes[face["track_id"]][best] += 1
    return {tid: max(v, key=v.get) for tid, v in votes.items()}


@pytest.fixture(scope="module")
def cli_run(setup, tmp_path_factory):
    models, gallery, clip = setup
    out = tmp_path_factory.mktemp("run")
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", out / "r.json",
                 "--annotate", out / "a.mp4", "--progress")
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "r.json").read_text()), out


def test_every_walker_is_named(cli_run, setup):
    _, report, _ = cli_run
    _, _, clip = setup
    assert all(t.source.endswith("_0001.jpg") for t in clip.tracks)  # the gallery holds photos 2-5 only
    truth = assign_truth(report, clip)
    tracks = report["tracks"]
    assert len(tracks) == len(clip.tracks), [(t["track_id"], t["identity"], t["frames"]) for t in tracks]
    for track in tracks:
        assert track["identity"] == truth[track["track_id"]], track
        assert track["score"] >= 0.3 and track["top_k"][0]["name"] == track["identity"]
    assert sorted(t["identity"] for t in tracks) == sorted(clip.identities)


def test_report_layout_and_selection_saving(cli_run, setup):
    result, report, _ = cli_run
    _, _, clip = setup
    assert report["status"] == "complete" and report["source"] == str(clip.path)
    assert report["models"]["backend"] == "onnxruntime" and len(report["models"]["models_sha256"]) == 64
    for track in report["tracks"]:
        assert {"track_id", "identity", "score", "top_k", "first_frame", "last_frame", "frames",
                "best_quality"} <= track.keys()
        assert track["last_frame"] - track["first_frame"] + 1 >= track["frames"] >= 3
    assert len(report["frames"]) == clip.frames
    assert [f["index"] for f in report["frames"]] == list(range(clip.frames))
    faces = [face for frame in report["frames"] for face in frame["faces"]]
    assert {"track_id", "box", "quality", "alpha", "identity", "recognized"} <= faces[0].keys()
    stats = report["stats"]
    assert stats["faces"] == len(faces) and stats["recognized"] == sum(f["recognized"] for f in faces)
    assert stats["selection_saving"] > 0.7  # three people, 75 frames: a handful of recognizer runs each
    assert set(stats["stage_ms_per_frame"]) >= {"decode", "detect", "iqa", "recognize"}
    # The end table and summary line.
    assert "identity" in result.output and "quality-aware selection" in result.output


def test_annotated_video_has_every_frame(cli_run, setup):
    _, report, out = cli_run
    _, _, clip = setup
    with av.open(str(out / "a.mp4")) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height) == (clip.width, clip.height)
    assert frames == clip.frames and report["annotated_video"] == str(out / "a.mp4")


def test_python_api_frame_by_frame(setup):
    models, gallery, clip = setup
    with av.open(str(clip.path)) as container:
        images = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    middle = clip.frames // 2
    visible = sum(1 for t in clip.tracks if t.box_at(middle) is not None)
    with Pipeline.from_dir(models, gallery) as pipeline:
        per_frame = [pipeline.process(image) for image in images]
        tracks = pipeline.tracks(min_frames=3)
        assert sorted(t.identity for t in tracks) == sorted(clip.identities)
        kept = {t.track_id for t in tracks}
        faces = [f for f in per_frame[middle] if f.track_id in kept]  # short false-positive tracks aside
        assert {f.identity for f in faces} <= set(clip.identities) and len(faces) == visible
        assert 0 < pipeline.stats.recognized < pipeline.stats.faces
    # selection "all": the recognizer on every crop, no saving.
    with Pipeline.from_dir(models, gallery, config=PipelineConfig(selection="all")) as pipeline:
        for image in images[:6]:
            faces = pipeline.process(image)
        assert pipeline.stats.recognized == pipeline.stats.faces > 0 and pipeline.stats.selection_saving == 0.0
        assert all(f.recognized for f in faces)


def test_damaged_and_truncated_clips_still_name_people(setup, tmp_path):
    models, gallery, clip = setup
    from test_runtime_sources import damaged_copy

    data = clip.path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.7)])
    for name, path in (("damaged", damaged_copy(clip, tmp_path)), ("cut", tmp_path / "cut.mp4")):
        result = run(path, "--gallery", gallery, "--models", models, "--json", tmp_path / f"{name}.json",
                     "--no-frames")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["status"] == "complete" and report["frames"] == []
        named = {t["identity"] for t in report["tracks"]} & set(clip.identities)
        assert len(named) >= 2, report["tracks"]
        if name == "damaged":
            assert report["source_stats"]["broken_packets"] > 0 and "broken packets" in result.output
        else:
            assert report["stats"]["frames"] < clip.frames


def test_bad_inputs_exit_non_zero_only_when_nothing_was_processed(setup, tmp_path):
    models, gallery, clip = setup
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    result = run(text, "--gallery", gallery, "--models", models, "--json", tmp_path / "a.json")
    assert result.exit_code == 2 and "is not a video" in result.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["status"] == "error" and "is not a video" in report["error"]

    # An MP4 cut before its index (moov atom at the end, as an interrupted recording leaves it).
    plain = rs.synth_clip("plain", count=1, seconds=1.0, faststart=False, face_px=(30, 40))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(plain.path.read_bytes()[:-2000])
    result = run(cut, "--gallery", gallery, "--models", models, "--json", tmp_path / "b.json")
    assert result.exit_code == 2 and "error:" in result.output
    assert json.loads((tmp_path / "b.json").read_text())["status"] == "error"

    result = run(clip.path, "--gallery", gallery, "--models", tmp_path, "--json", tmp_path / "c.json")
    assert result.exit_code == 2 and "no manifest.json" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["status"] == "error"


def test_wrong_gallery_is_refused_with_the_reason(setup, tmp_path):
    models, gallery, clip = setup
    from petal_runtime.gallery import Gallery, gallery_dtype

    wide = Gallery(np.zeros(1, gallery_dtype(512)), {"models_sha256": "0" * 64})
    wide.entries["name"] = ["x"]
    wide.save(tmp_path / "wide.npy")
    result = run(clip.path, "--gallery", tmp_path / "wide.npy", "--models", models, "--json", tmp_path / "w.json")
    assert result.exit_code == 2 and "512-d embeddings but the models produce 128-d" in result.output
    assert json.loads((tmp_path / "w.json").read_text())["status"] == "error"


def test_clip_without_faces(setup, tmp_path):
    models, gallery, _ = setup
    empty = rs.synth_clip("empty", people_spec="none", seconds=1.0)
    result = run(empty.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["tracks"] == [] and report["stats"]["frames"] == empty.frames and report["stats"]["faces"] == 0
    assert "(no face tracks)" in result.output


def test_interrupted_run_writes_results_so_far(setup, tmp_path, monkeypatch):
    models, gallery, clip = setup
    original = Pipeline.run

    def interrupted(self, source, keep_images=False):
        inner = original(self, source, keep_images)
        try:
            for i, result in enumerate(inner):
                if i == 10:
                    raise KeyboardInterrupt
                yield result
        finally:
            inner.close()

    monkeypatch.setattr(Pipeline, "run", interrupted)
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "i.json")
    assert result.exit_code == 130
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["status"] == "interrupted" and len(report["frames"]) == 10


class _LiveSource(Source):
    """A camera-like source that produces frames faster than the pipeline takes them."""

    live = True

    def __init__(self, image, count):
        super().__init__("fake-camera")
        self.image, self.count = image, count

    def frames(self):
        for i in range(self.count):
            if self._closed.is_set():
                break
            self.stats.frames += 1
            yield Frame(i, i / 25, self.image)


def test_slow_consumer_on_a_live_source_gets_the_newest_frames(setup):
    """A camera does not wait: when the consumer is slower than the source, the oldest waiting frames
    are dropped so what is delivered stays the latest, in order, and every dropped frame is counted."""
    import time

    models, gallery, clip = setup
    with av.open(str(clip.path)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="bgr24")
    produced = 200
    config = PipelineConfig(queue_size=2)
    with Pipeline.from_dir(models, gallery, config=config) as pipeline:
        indices = []
        for result in pipeline.run(_LiveSource(image, produced)):
            indices.append(result.index)
            time.sleep(0.01)  # a slow consumer
        stats = pipeline.stats
    assert stats.frames_read == produced and stats.frames == len(indices)
    assert indices == sorted(set(indices))  # in order, none twice
    # Dropped frames are exactly the ones not delivered, and counted.
    assert stats.dropped_frames == produced - len(indices) > 0
    # The newest frames win: the last queue_size frames the camera produced are never dropped
    # (drop-newest would deliver the first frames and lose these).
    assert indices[-config.queue_size:] == list(range(produced - config.queue_size, produced))


def test_small_faces_down_to_ten_pixels_are_tracked(setup):
    models, gallery, _ = setup
    tiny = rs.synth_clip("tiny", count=2, seconds=1.6, face_px=(10, 14), noise_sigma=(1.0, 2.0), crf=20)
    config = PipelineConfig(min_face=10, detect_every=1)
    assert config.scale() > 1.0  # YuNet runs on an upscaled frame
    with Pipeline.from_dir(models, gallery, config=config) as pipeline:
        results = list(pipeline.run(str(tiny.path)))
        tracks = pipeline.tracks(min_frames=10)
    seen = sum(1 for r in results for _ in r.faces)
    truth = sum(len(t.boxes) for t in tiny.tracks)
    assert seen >= 0.8 * truth and len(tracks) == 2


def test_config_errors_are_user_errors():
    with pytest.raises(PetalError, match="min_face"):
        PipelineConfig(min_face=4)
    with pytest.raises(PetalError, match="selection"):
        PipelineConfig(selection="some")
    with pytest.raises(PetalError, match="drop"):
        PipelineConfig(drop="sometimes")


def test_console_entry_point_prints_one_line_and_writes_the_report(setup, tmp_path):
    """The real entry point (as the petal-run script calls it): no traceback, exit 2, report written."""
    import subprocess
    import sys

    models, gallery, _ = setup
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    code = "import sys; from petal_runtime.cli import run_main; sys.argv[0] = 'petal-run'; run_main()"
    result = subprocess.run([sys.executable, "-c", code, str(text), "--gallery", str(gallery), "--models", str(models),
                             "--json", str(tmp_path / "r.json")], cwd=rs.REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "error"


def test_report_stays_valid_json_with_nan():
    from petal_runtime.cli import _finite

    assert _finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None], "c": "x"}


def test_track_table_columns_line_up_for_decomposed_names():
    """Names from macOS file names come decomposed (o + combining circumflex); columns must not shift."""
    import unicodedata

    from petal_runtime.cli import _track_table

    row = {"track_id": 1, "score": 0.77, "frames": 87, "first_frame": 8, "last_frame": 94, "best_quality": 0.75}
    composed = _track_table([{**row, "identity": "Jerônimo Goergen"}]).splitlines()[2]
    decomposed = _track_table([{**row, "identity": unicodedata.normalize("NFD", "Jerônimo Goergen")}]).splitlines()[2]
    assert decomposed == composed
