"""petal-serve's MQTT sink against a real broker: amqtt's (the dev extra) in its own process on a loopback
port (tests/mqtt_broker.py), a paho-mqtt subscriber in the test, the LFW clip as the source. Events arrive
at the subscriber as the stdout sink prints them; a broker that is killed and started again costs the
events that did not fit in the sink's queue (counted in /metrics), no more, and recognition goes on."""
from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import runtime_support as rs
from petal_runtime.errors import PetalError
from petal_runtime.serve import ServeConfig, Service
from test_serve_service import events_of, parse_metrics

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install -e '.[dev]')")
pytest.importorskip("amqtt", reason="the amqtt broker is not installed (pip install -e '.[dev]')")

BROKER_SCRIPT = Path(__file__).with_name("mqtt_broker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


class Broker:
    """tests/mqtt_broker.py on one port: started, killed (SIGKILL: it goes away without a word) and started
    again on the same port. `spawn()` pays the start-up (imports) beforehand; `listen()` opens the port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.spawned: list[subprocess.Popen] = []

    def spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(BROKER_SCRIPT), str(self.port), "--wait"], cwd=rs.REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.spawned.append(proc)
        if _read_line(proc, 60) != "ready":
            raise RuntimeError(f"the amqtt broker did not start: {self._stderr(proc)}")
        return proc

    def listen(self, proc: subprocess.Popen) -> None:
        proc.stdin.write("\n")
        proc.stdin.flush()
        if _read_line(proc, 30) != "listening":
            raise RuntimeError(f"the amqtt broker did not listen on 127.0.0.1:{self.port}: {self._stderr(proc)}")
        self.proc = proc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    @staticmethod
    def _stderr(proc: subprocess.Popen) -> str:
        if proc.poll() is None:
            proc.kill()
        return " ".join(proc.stderr.read().split()[-30:]) or f"exit {proc.wait()}"

    def close(self) -> None:
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()


@pytest.fixture
def broker():
    broker = Broker()
    try:
        broker.listen(broker.spawn())
    except RuntimeError as exc:
        broker.close()
        pytest.skip(str(exc))
    yield broker
    broker.close()


class Subscriber:
    """A paho-mqtt client subscribed to petal/#: every message kept (topic, event); after a lost connection
    it reconnects within 0.2 s and subscribes again (`subscribed` is set once the broker granted it)."""

    def __init__(self, port: int, qos: int) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="petal-test-subscriber")
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("petal/#", qos=qos)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: self.subscribed.clear()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(30), "the subscriber could not subscribe"

    def seqs(self) -> list[int]:
        return [e["seq"] for _, e in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def setup(shared_faces):
    from conftest import require_models

    require_models()
    models = rs.exported_models()
    return models, rs.lfw_gallery(models), rs.lfw_clip()


def waves_clip():
    """All ten LFW10 people, two at a time in five waves over 10 s: events all along the clip and its loops
    (a looped lfw_clip gives events once: re-identification joins each loop's walkers to their first tracks)."""
    return rs.synth_clip("lfw-waves", count=10, face_px=(28, 48), seconds=10.0, concurrent=2)


def config(models, gallery, source: dict, mqtt_options: dict, **sections) -> ServeConfig:
    return ServeConfig.from_dict({
        "service": {"models": str(models), "gallery": str(gallery), "max_wait_ms": 50.0, "drain_s": 5.0},
        "http": sections.pop("http", {"enabled": False}),
        "sinks": {"mqtt": {"host": "127.0.0.1", **mqtt_options}},
        "source": [source]})


def wait_until(condition, timeout: float, what: str, state=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what} {state()}"
        time.sleep(0.05)


def test_events_arrive_at_a_subscriber(setup, broker):
    """Every event of the clip, at qos 2, on petal/<source>/<type>: the same JSON the stdout sink printed."""
    models, gallery, clip = setup
    subscriber = Subscriber(broker.port, qos=2)
    cfg = config(models, gallery, {"name": "door", "url": str(clip.path)},
                 {"port": broker.port, "qos": 2, "topic": "petal/{source}/{type}"})
    stdout = io.StringIO()
    try:
        with Service(cfg, stdout=stdout) as service:
            sink = next(s for s in service.sinks if s.name == "mqtt")
            service.start()
            assert service.wait(timeout=120), "the file source did not end"
            service.stop()
        events = events_of(stdout.getvalue())
        wait_until(lambda: len(subscriber.messages) >= len(events), 10, "the subscriber to get every event")
    finally:
        subscriber.close()
    assert {e["identity"] for e in events if e["type"] == "identified"} == set(clip.identities)
    received = sorted(subscriber.messages, key=lambda m: m[1]["seq"])
    assert [e for _, e in received] == events  # each once (qos 2), the JSON as printed
    assert [t for t, _ in received] == [f"petal/door/{e['type']}" for e in events]
    assert sink.delivered == len(events) and sink.dropped == sink.failed == 0
    assert sink.connects == 1 and sink.connect_failures == 0


def test_broker_that_goes_away_loses_at_most_the_queue(setup, broker):
    """The waves clip looped, the sink at qos 1 with room for 5 events. The broker is killed; while it is
    away recognition goes on, the sink retries with back-off and the oldest events beyond its queue drop.
    Started again, the broker gets the sink back; the subscriber misses exactly the dropped events (one run
    of consecutive ones, all from the outage), the count is in /metrics, and events flow again."""
    models, gallery, _ = setup
    clip = waves_clip()
    queue_size = 5
    subscriber = Subscriber(broker.port, qos=1)
    # Not paced: events come as fast as this machine recognizes, and every wait below counts events, not seconds.
    cfg = config(models, gallery, {"name": "cam", "url": str(clip.path), "loop": True},
                 {"port": broker.port, "qos": 1, "queue_size": queue_size, "backoff_s": 0.25, "max_backoff_s": 4.0},
                 http={"port": 0})
    stdout = io.StringIO()
    logs: list[str] = []
    try:
        with Service(cfg, stdout=stdout, log=logs.append) as service:
            sink = next(s for s in service.sinks if s.name == "mqtt")
            runner = service.runners[0]
            service.start()
            wait_until(lambda: len(subscriber.messages) >= 3, 180, "the first events at the subscriber")
            standby = broker.spawn()  # the broker that comes back, imported and waiting

            def state() -> str:
                return (f"(frames {runner.frames}, events {len(events_of(stdout.getvalue()))}, sink "
                        f"{sink.status()}, subscriber {len(subscriber.messages)})")

            assert sink.dropped == 0, f"events dropped while the broker was there {state()}"
            broker.kill()
            killed_at, frames_at_kill = time.time(), runner.frames
            events_at_kill = len(events_of(stdout.getvalue()))
            # Away long enough to overflow the queue; the sink's reconnect wait has grown to 4 s by its fourth
            # failed attempt: bring the broker back just after a failure, so the subscriber is in first.
            wait_until(lambda: sink.connect_failures >= 4
                       and len(events_of(stdout.getvalue())) >= events_at_kill + queue_size + 3, 300,
                       "the sink to fail 4 reconnects and events published while the broker is away", state)
            failures = sink.connect_failures
            wait_until(lambda: sink.connect_failures > failures, 10, "the sink's next reconnect attempt", state)
            restarted_at, frames_at_restart = time.time(), runner.frames
            broker.listen(standby)
            assert subscriber.subscribed.wait(3), "the subscriber did not come back"
            assert sink.connects == 1, "the sink reconnected before the subscriber (too slow a machine?)"

            wait_until(lambda: sink.connects == 2, 30, "the sink to reconnect", state)
            back_at = time.time()
            last_at_restart = max(e["seq"] for e in events_of(stdout.getvalue()))
            wait_until(lambda: max(subscriber.seqs()) > last_at_restart, 180, "new events at the subscriber", state)
            metrics = parse_metrics(urllib.request.urlopen(service.http.url + "/metrics", timeout=10).read().decode())
            status = service.sources_status()
            service.stop()
    finally:
        subscriber.close()
    events = events_of(stdout.getvalue())
    published = [e["seq"] for e in events]
    received = subscriber.seqs()
    missing = sorted(set(published) - set(received))
    assert set(received) <= set(published) and len(received) - len(set(received)) <= 1  # at least once
    assert 0 < len(missing) == sink.dropped, (missing, sink.dropped)
    assert missing == list(range(missing[0], missing[-1] + 1))  # the oldest of the queue, one after another
    by_seq = {e["seq"]: e for e in events}
    assert all(killed_at <= by_seq[s]["time"] <= back_at for s in missing)
    # The queue's events after the dropped ones were held and delivered once the broker was back.
    assert all(s in received for s in range(missing[-1] + 1, missing[-1] + 1 + queue_size))
    during = [e for e in events if killed_at <= e["time"] <= restarted_at]
    assert frames_at_restart > frames_at_kill and len(during) > queue_size + 1
    assert metrics["petal_sink_dropped_total"]['{sink="mqtt"}'] == sink.dropped
    assert metrics["petal_sink_reconnects_total"]['{sink="mqtt"}'] == 1
    mqtt_status = next(s for s in status["sinks"] if s["name"] == "mqtt")
    assert mqtt_status["connected"] and mqtt_status["reconnects"] == 1 and mqtt_status["dropped"] == sink.dropped
    assert status["sources"][0]["state"] == "running" and status["sources"][0]["error"] is None
    assert sum("connection lost" in line for line in logs) == 1 and any("connected again" in line for line in logs)


def test_a_broker_host_that_does_not_resolve_is_one_line(setup):
    models, gallery, clip = setup
    cfg = config(models, gallery, {"name": "door", "url": str(clip.path)}, {"host": "no-such-broker.invalid"})
    with pytest.raises(PetalError) as info:
        Service(cfg)
    assert str(info.value).startswith("MQTT broker no-such-broker.invalid:1883: cannot resolve the host")
