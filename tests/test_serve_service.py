"""petal-serve on real encoded clips (LFW faces walking through an H.264 scene; runtime_support):
several sources at once through one batching worker, events, a webhook that fails its first calls,
/metrics scraped and parsed, the gallery swapped while running, a slow sink that must not stall
recognition, a port in use, SIGTERM. Loopback only; every loop is bounded; everything stops itself."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.errors import PetalError
from petal_runtime.gallery import Gallery
from petal_runtime.serve import ServeConfig, Service


@pytest.fixture(scope="module")
def setup(shared_faces):
    from conftest import require_models

    require_models()
    models = rs.exported_models()
    return models, rs.lfw_gallery(models), rs.lfw_clip()


def config(models, gallery, sources, **sections) -> ServeConfig:
    data = {"service": {"models": str(models), "gallery": str(gallery), "max_wait_ms": 50.0, "drain_s": 5.0,
                        **sections.pop("service", {})},
            "http": {"port": 0, **sections.pop("http", {})},
            "sinks": sections.pop("sinks", {}),
            "source": sources}
    return ServeConfig.from_dict(data)


class Endpoint:
    """A webhook receiver on 127.0.0.1: answers 503 to its first `fail` calls; with `hold`, answers nothing
    until `gate` is set (at most 60 s)."""

    def __init__(self, fail: int = 0, hold: bool = False) -> None:
        self.calls, self.events, self.fail, self.hold = 0, [], fail, hold
        self.gate = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.calls += 1
                    failing = outer.calls <= outer.fail
                if outer.hold:
                    outer.gate.wait(60)
                if not failing:
                    outer.events.append(json.loads(body))
                self.send_response(503 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text format -> {name: {labels: value}}; every sample line must parse, every family typed."""
    out: dict[str, dict[str, float]] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, line
        out.setdefault(name, {})[labels] = float(value)
    return out


def events_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def three_sources(setup, tmp_path_factory):
    """Three sources of the clip at once; stdout, a rotating file and a webhook that fails its first 2 calls."""
    models, gallery, clip = setup
    out = tmp_path_factory.mktemp("serve")
    endpoint = Endpoint(fail=2)
    sources = [{"name": f"cam{i}", "url": str(clip.path)} for i in range(3)]
    cfg = config(models, gallery, sources, service={"thumbnails": str(out / "thumbs")},
                 sinks={"file": {"path": str(out / "events.jsonl"), "max_bytes": 4000, "backups": 50},
                        "webhook": {"url": endpoint.url, "retries": 4, "backoff_s": 0.05}})
    stdout = io.StringIO()
    scraped = []
    try:
        with Service(cfg, stdout=stdout) as service:
            service.start()
            url = service.http.url
            scraped.append(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())
            assert service.wait(timeout=120), "the three file sources did not end"
            time.sleep(0.3)
            metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
            sources = json.loads(urllib.request.urlopen(url + "/sources", timeout=10).read())
            health = json.loads(urllib.request.urlopen(url + "/healthz", timeout=10).read())
            service.stop()
            final_metrics = service.registry.render()
    finally:
        endpoint.close()
    return {"clip": clip, "stdout": events_of(stdout.getvalue()), "metrics": metrics, "first": scraped[0],
            "sources": sources, "health": health, "endpoint": endpoint, "out": out, "final": final_metrics}


def test_every_source_names_every_walker(three_sources):
    clip, events = three_sources["clip"], three_sources["stdout"]
    assert {e["source"] for e in events} == {"cam0", "cam1", "cam2"}
    for cam in ("cam0", "cam1", "cam2"):
        mine = [e for e in events if e["source"] == cam]
        named = {e["identity"] for e in mine if e["type"] == "identified"}
        assert named == set(clip.identities), (cam, named)
        started = {e["track_id"] for e in mine if e["type"] == "track_started"}
        ended = {e["track_id"] for e in mine if e["type"] == "track_ended"}
        assert started == ended and len(started) >= len(clip.identities)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


def test_event_format(three_sources):
    events = three_sources["stdout"]
    version = three_sources["sources"]["gallery"]["version"]
    identified = [e for e in events if e["type"] == "identified"]
    for e in identified:
        assert {"source", "track_id", "identity", "score", "far", "threshold", "cohort", "rule", "decision_quality",
                "quality", "frame", "frame_time", "time", "gallery_version", "previous_identity", "top_k",
                "latency_ms"} <= e.keys()
        assert e["gallery_version"] == version and len(version) == 12
        assert e["score"] >= e["threshold"] and e["top_k"][0]["name"] == e["identity"]
        assert e["previous_identity"] == "unknown" and 0 <= e["quality"] <= 1.5
        assert os.path.isfile(e["thumbnail"]) and e["thumbnail"].endswith(".jpg")
    ended = [e for e in events if e["type"] == "track_ended"]
    assert all(e["frames"] >= 3 and e["last_frame"] >= e["first_frame"] for e in ended)


def test_file_sink_rotates_and_keeps_every_event(three_sources):
    out, events = three_sources["out"], three_sources["stdout"]
    files = sorted(out.glob("events.jsonl*"))
    assert len(files) > 2 and all(f.stat().st_size <= 4000 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(e["seq"] for e in lines) == [e["seq"] for e in events]


def test_webhook_retries_until_delivered(three_sources):
    endpoint, events = three_sources["endpoint"], three_sources["stdout"]
    assert sorted(e["seq"] for e in endpoint.events) == [e["seq"] for e in events]
    assert endpoint.calls == len(events) + 2  # the two refused calls were retried
    final = parse_metrics(three_sources["final"])
    assert final["petal_sink_delivered_total"]['{sink="webhook"}'] == len(events)
    assert final["petal_sink_dropped_total"]['{sink="webhook"}'] == 0


def test_metrics_parse_and_count(three_sources):
    clip = three_sources["clip"]
    parse_metrics(three_sources["first"])
    metrics = parse_metrics(three_sources["metrics"])
    for cam in ("cam0", "cam1", "cam2"):
        key = f'{{source="{cam}"}}'
        assert metrics["petal_source_frames_total"][key] == clip.frames
        assert metrics["petal_source_dropped_frames_total"][key] == 0
        assert metrics["petal_recognizer_calls_saved_total"][key] > metrics["petal_recognizer_crops_total"][key]
    events = three_sources["stdout"]
    assert sum(metrics["petal_events_total"].values()) == len(events)
    # One worker served all three: some calls carried more than one source's crops.
    requests = metrics["petal_inference_batch_requests_sum"]['{model="iqa"}']
    calls = metrics["petal_inference_batch_requests_count"]['{model="iqa"}']
    assert requests > calls
    assert {"petal_inference_seconds_bucket", "petal_stage_seconds_total", "petal_source_fps",
            "petal_sink_queue_depth", "petal_gallery_identities", "petal_event_latency_seconds_count"} <= metrics.keys()


def test_sources_and_health(three_sources):
    sources, health = three_sources["sources"], three_sources["health"]
    assert health["status"] == "ok" and health["sources"] == 3
    assert [s["name"] for s in sources["sources"]] == ["cam0", "cam1", "cam2"]
    assert all(s["state"] == "ended" and s["error"] is None for s in sources["sources"])
    assert sources["gallery"]["identities"] == 10


def _gallery_without(gallery_path, name: str, target):
    gallery = Gallery.load(gallery_path)
    gallery.remove([name])
    gallery.save(target)
    return gallery


def test_gallery_swapped_while_running(setup, tmp_path):
    """A live-paced source; the gallery first lacks one walker, then the full one is written over it (the
    walker is named, with the new version), then one for other models (refused, the full one stays)."""
    models, full_path, clip = setup
    missing = clip.identities[0]
    path = tmp_path / "gallery.npy"
    _gallery_without(full_path, missing, path)
    logs = []
    cfg = config(models, path, [{"name": "live", "url": str(clip.path), "realtime": True, "loop": True,
                                 "max_frames": 200}],
                 service={"gallery_poll_s": 0.2}, http={"enabled": False})
    stdout = io.StringIO()
    with Service(cfg, stdout=stdout, log=logs.append) as service:
        first = service.gallery_state.version
        service.start()
        deadline = time.monotonic() + 60
        while "identified" not in stdout.getvalue() and time.monotonic() < deadline:
            time.sleep(0.1)
        Gallery.load(full_path).save(path)
        while service.gallery_state.version == first and time.monotonic() < deadline:
            time.sleep(0.1)
        second = service.gallery_state.version
        assert second != first, logs
        other = Gallery.load(full_path)
        other.meta["models_sha256"] = "0" * 64
        other.save(path)
        while not any("refused" in line for line in logs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.gallery_state.version == second and len(service.gallery_state.gallery) == 10
        assert service.wait(timeout=90)
        metrics = parse_metrics(service.metrics_text())
    events = events_of(stdout.getvalue())
    assert metrics["petal_gallery_reloads_total"] == {'{result="ok"}': 1.0, '{result="refused"}': 1.0}
    assert any("other models" in line for line in logs)
    before = [e for e in events if e["gallery_version"] == first]
    after = [e for e in events if e["gallery_version"] == second]
    assert before and after
    assert all(e["identity"] != missing for e in before)
    assert any(e["identity"] == missing and e["type"] in ("identified", "identity_changed") for e in after)


def test_slow_sink_does_not_stall_recognition(setup):
    """A webhook that does not answer, with room for 2 events: both sources are analysed to the end and
    stdout gets every event while the webhook has delivered nothing; the oldest events drop, counted."""
    models, gallery, clip = setup
    endpoint = Endpoint(hold=True)
    cfg = config(models, gallery, [{"name": "a", "url": str(clip.path)}, {"name": "b", "url": str(clip.path)}],
                 service={"drain_s": 2.0}, http={"enabled": False},
                 sinks={"webhook": {"url": endpoint.url, "queue_size": 2, "timeout_s": 30.0, "retries": 0}})
    stdout = io.StringIO()
    try:
        with Service(cfg, stdout=stdout) as service:
            service.start()
            assert service.wait(timeout=180)
            webhook = next(s for s in service.sinks if s.name == "webhook")
            printer = next(s for s in service.sinks if s.name == "stdout")
            deadline = time.monotonic() + 30  # stdout has its own queue: let it catch up with the webhook's
            while (printer.depth or printer.delivered < webhook.dropped + webhook.depth + 1) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            status = service.sources_status()
            metrics = parse_metrics(service.metrics_text())
            events = events_of(stdout.getvalue())
            assert all(s["frames"] == clip.frames for s in status["sources"])
            assert len(events) >= 12 and webhook.delivered == 0
            assert webhook.dropped == len(events) - 3  # two queued, one in flight
            assert metrics["petal_sink_dropped_total"]['{sink="webhook"}'] == webhook.dropped
            endpoint.gate.set()  # the endpoint answers again: what is held is delivered at shutdown
            service.stop()
    finally:
        endpoint.gate.set()
        endpoint.close()
    assert webhook.delivered == 3 and len(endpoint.events) == 3
    # The one in flight (taken when the sender was free: an early event, whichever the thread woke to),
    # then the two newest; everything between was dropped, oldest first.
    delivered = [e["seq"] for e in endpoint.events]
    assert delivered[1:] == [e["seq"] for e in events[-2:]]
    assert delivered[0] in [e["seq"] for e in events[:-2]]


def test_port_in_use_is_one_line(setup):
    models, gallery, clip = setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = config(models, gallery, [{"name": "a", "url": str(clip.path)}], http={"port": port})
        with pytest.raises(PetalError) as info:
            Service(cfg)
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in str(info.value)


def test_unreachable_stream_is_refused_before_start(setup):
    models, gallery, _ = setup
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    cfg = config(models, gallery, [{"name": "gate", "url": f"rtsp://127.0.0.1:{port}/s", "connect_retries": 0}])
    with pytest.raises(PetalError) as info:
        Service(cfg)
    assert str(info.value).startswith("source gate: could not open rtsp://127.0.0.1")


def test_sigterm_flushes_and_exits_zero(setup, tmp_path):
    models, gallery, clip = setup
    (tmp_path / "serve.toml").write_text(
        f'[service]\nmodels = "{models}"\ngallery = "{gallery}"\n[http]\nenabled = false\n'
        f'[[source]]\nname = "loop"\nurl = "{clip.path}"\nrealtime = true\nloop = true\n')
    code = "import sys; from petal_runtime.serve.cli import main; sys.argv = ['petal-serve', sys.argv[1]]; main()"
    err_file = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "serve.toml")], cwd=rs.REPO,
                            stdout=subprocess.PIPE, stderr=err_file, text=True)
    killer = threading.Timer(150, proc.kill)  # whatever happens, the child ends
    killer.start()
    lines = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until the first identification
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if '"identified"' in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()  # the same buffered reader: no line is lost between the two reads
        proc.wait(timeout=60)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
        err_file.close()
    err = (tmp_path / "stderr.txt").read_text()
    events = events_of("".join(lines) + rest)
    assert proc.returncode == 0, err
    assert any(e["type"] == "identified" for e in events)
    started = {e["track_id"] for e in events if e["type"] == "track_started"}
    ended = {e["track_id"] for e in events if e["type"] == "track_ended"}
    assert started and started == ended, [(e["type"], e["track_id"], e["seq"]) for e in events]
    assert np.all(np.diff([e["seq"] for e in events]) == 1)


# ----------------------------------------------------------------------------- FAR in events


def _outsiders(count: int = 20):
    """`count` LFW people who are not in LFW10, one photo each (calibration faces; cached)."""
    import shutil

    lfw10 = {p.name for p in (rs.SHARED_FACES / "lfw10").iterdir()}
    people = sorted(p for p in (rs.SHARED_FACES / "lfw").iterdir() if p.is_dir() and p.name not in lfw10)
    picks = np.random.default_rng(1).permutation(len(people))[:count]

    def build(out):
        for i in picks:
            photo = sorted(people[i].glob("*.jpg"))[0]
            (out / people[i].name).mkdir()
            shutil.copy(photo, out / people[i].name / photo.name)

    return rs._atomic_dir(rs.CACHE / f"serve-outsiders-{count}", build)


def test_identified_events_carry_the_far_and_the_threshold_for_their_quality(setup, tmp_path, shared_faces,
                                                                             monkeypatch):
    """A gallery calibrated on 20 LFW outsiders (160 impostor crops at the 8 quality levels, in 4 quality
    bins of 40 here instead of 150 to keep it fast): every identification says the FAR it was made at
    and the calibration's threshold for its quality."""
    import shutil

    from petal_runtime.models import Models
    from petal_runtime.openset import FarCalibration, calibrate_gallery, calibration_path

    from_scores = FarCalibration.from_scores.__func__
    monkeypatch.setattr(FarCalibration, "from_scores", classmethod(
        lambda cls, qualities, scores, meta=None: from_scores(cls, qualities, scores, meta, min_per_bin=40)))

    if not (shared_faces / "lfw").is_dir():
        pytest.skip(f"the whole LFW is not at {shared_faces / 'lfw'}")
    models, gallery_path, clip = setup
    path = tmp_path / "gallery.npy"
    for suffix in (".npy", ".npy.json"):
        shutil.copy(gallery_path.with_name("gallery" + suffix), tmp_path / ("gallery" + suffix))
    with Models(models) as m:
        calibration = calibrate_gallery(m, Gallery.load(path, m.fingerprint), [_outsiders(20)], limit=20,
                                        with_gallery_photos=False)
    calibration.save(calibration_path(path))
    assert len(calibration.bins) >= 4
    far = 0.05
    cfg = config(models, path, [{"name": "cam", "url": str(clip.path)}], service={"far": far},
                 http={"enabled": False})
    stdout = io.StringIO()
    with Service(cfg, stdout=stdout) as service:
        assert service.gallery_state.rule.rule == "far"
        service.start()
        assert service.wait(timeout=120)
    identified = [e for e in events_of(stdout.getvalue()) if e["type"] == "identified"]
    assert identified and {e["identity"] for e in identified} <= set(clip.identities)
    for e in identified:
        assert e["rule"] == "far" and e["far"] == far
        # The calibrated value for its quality above the track's mean cosine over the gallery (cohort).
        expected = calibration.threshold(e["decision_quality"], far) + e["cohort"]
        assert abs(e["threshold"] - expected) < 1e-3, (e, expected)
        assert e["score"] >= e["threshold"]
    per_bin = [t for t, _ in calibration.bin_thresholds(far)]
    assert all(min(per_bin) - 2e-4 <= e["threshold"] - e["cohort"] <= max(per_bin) + 2e-4 for e in identified)

