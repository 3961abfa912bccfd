"""A live source that is cut and comes back. petal-serve reads the LFW clip as two live MPEG-TS streams over
HTTP, each from its own server process (tests/stream_server.py: the clip's H.264 packets copied, paced at
its frame rate, looped). One server is killed mid-stream and started again on the same port: that source
reconnects (its counter in /metrics and /sources), frames and faces flow from it again, and the other
source is not disturbed. Loopback only; every wait is bounded; the servers are killed at the end."""
from __future__ import annotations

import io
import json
import select
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import runtime_support as rs
from petal_runtime.serve import ServeConfig, Service
from test_serve_service import events_of, parse_metrics

SERVER_SCRIPT = Path(__file__).with_name("stream_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamServer:
    """tests/stream_server.py serving `clip` on one port; kill() is the camera going away (SIGKILL),
    start() brings it back on the same port."""

    def __init__(self, clip: Path) -> None:
        self.clip, self.port = clip, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/live.ts"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), str(self.clip), str(self.port)],
                                     cwd=rs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        if not ready or self.proc.stdout.readline().strip() != "listening":
            self.proc.kill()
            raise AssertionError(f"the stream server did not start: {self.proc.stderr.read()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture(scope="module")
def setup(shared_faces):
    from conftest import require_models

    require_models()
    models = rs.exported_models()
    return models, rs.lfw_gallery(models), rs.lfw_clip()


def wait_until(condition, timeout: float, what: str, state=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what} {state()}"
        time.sleep(0.1)


def test_a_cut_stream_reconnects_and_the_other_goes_on(setup):
    models, gallery, clip = setup
    servers = []
    try:
        cut = StreamServer(clip.path)
        servers.append(cut)
        steady = StreamServer(clip.path)
        servers.append(steady)
        live = {"reconnect_backoff_s": [0.2, 1.0]}
        cfg = ServeConfig.from_dict({
            "service": {"models": str(models), "gallery": str(gallery), "max_wait_ms": 50.0, "drain_s": 2.0},
            "http": {"port": 0},
            "source": [{"name": "cut", "url": cut.url, **live}, {"name": "steady", "url": steady.url, **live}]})
        stdout = io.StringIO()
        with Service(cfg, stdout=stdout, log=lambda line: None) as service:
            service.start()
            base = service.http.url

            def sources() -> dict:
                data = json.loads(urllib.request.urlopen(base + "/sources", timeout=10).read())
                return {s["name"]: s for s in data["sources"]}

            def state() -> str:
                return json.dumps({n: {k: s[k] for k in ("state", "frames", "faces", "reconnects", "error")}
                                   for n, s in sources().items()})

            wait_until(lambda: all(s["frames"] >= 5 for s in sources().values()), 120, "frames from both", state)
            cut.kill()
            # A reader behind the stream (a busy machine) sees the cut once it has read what was sent before it.
            wait_until(lambda: sources()["cut"]["reconnects"] >= 1, 120, "the cut source to notice", state)
            down = sources()
            # While the cut server is away (its source retrying with back-off), the other source goes on.
            wait_until(lambda: sources()["steady"]["frames"] >= down["steady"]["frames"] + 10, 120,
                       "frames from the steady source while the other is down", state)
            cut.start()
            back = sources()
            wait_until(lambda: sources()["cut"]["frames"] >= back["cut"]["frames"] + 10
                       and sources()["cut"]["faces"] > back["cut"]["faces"], 120,
                       "frames and faces from the cut source again", state)
            metrics = parse_metrics(urllib.request.urlopen(base + "/metrics", timeout=10).read().decode())
            final = sources()
            service.stop()
    finally:
        for server in servers:
            server.close()
    assert metrics["petal_source_reconnects_total"]['{source="cut"}'] >= 1
    assert metrics["petal_source_reconnects_total"]['{source="steady"}'] == 0
    assert final["cut"]["state"] == final["steady"]["state"] == "running"
    assert final["cut"]["error"] is None and final["steady"]["error"] is None
    assert final["steady"]["reconnects"] == 0 and final["steady"]["frames"] > down["steady"]["frames"]
    assert metrics["petal_source_up"] == {'{source="cut"}': 1.0, '{source="steady"}': 1.0}
    events = events_of(stdout.getvalue())
    assert {e["identity"] for e in events if e["type"] == "identified"} <= set(clip.identities)
    assert any(e["source"] == "steady" and e["type"] == "identified" for e in events)
