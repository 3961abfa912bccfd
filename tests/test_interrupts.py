"""Ctrl-C and SIGTERM on the real console entry points: the command stops promptly, writes what it
promised (petal-run's report, status interrupted), removes its temporary files and exits 130 for
SIGINT, 143 for SIGTERM; a stream server that accepts and never answers cannot hold it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runtime_support as rs
from petal_runtime.errors import PetalError

RUN = "import sys; from petal_runtime.cli import run_main; sys.argv[0] = 'petal-run'; run_main()"
EXPORT = "import sys; from petal_export.cli import main; sys.argv[0] = 'petal-export'; main()"


@pytest.fixture(scope="module")
def setup(shared_faces):
    from conftest import require_models

    require_models()
    models = rs.exported_models()
    return models, rs.lfw_gallery(models), rs.lfw_clip()


STARTED: list[subprocess.Popen] = []


def start(code: str, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=rs.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(condition, timeout: float = 240.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


class SilentServer:
    """Accepts TCP connections and never says a word (an RTSP server that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_hung_stream_connection_within_a_second(setup, tmp_path, sig, code):
    models, gallery, _ = setup
    server = SilentServer()
    try:
        proc = start(RUN, f"rtsp://127.0.0.1:{server.port}/live", "--gallery", gallery, "--models", models,
                     "--json", tmp_path / "r.json")
        wait_for(lambda: server.connections, proc=proc)  # models loaded, now stuck in the RTSP handshake
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        server.close()
    assert proc.returncode == code, err
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert "Traceback" not in err and "interrupted" in err
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "interrupted"


def test_each_retry_against_a_closed_port_is_printed(setup, tmp_path):
    from petal_runtime.sources import StreamSource

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens here now
    lines: list[str] = []
    with pytest.raises(PetalError, match=f"could not open rtsp://127.0.0.1:{port}/x"):
        StreamSource(f"rtsp://127.0.0.1:{port}/x", max_retries=2, backoff=(0.01, 0.01), log=lines.append)
    assert len(lines) == 2 and "retry 1 of 2" in lines[0] and "retry 2 of 2" in lines[1]
    assert all(f"rtsp://127.0.0.1:{port}/x: " in line for line in lines)

    models, gallery, _ = setup
    proc = start(RUN, f"rtsp://127.0.0.1:{port}/x", "--gallery", gallery, "--models", models, "--json",
                 tmp_path / "r.json")
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True)
    reader.start()
    wait_for(lambda: any("retry 2 of 8" in line for line in seen), proc=proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # during the back-off sleep
    proc.wait(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - sent < 1.0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_writes_the_report_and_leaves_no_temporary_files(setup, tmp_path, sig, code):
    models, gallery, clip = setup
    report, log = tmp_path / "r.json", tmp_path / "r.frames.jsonl"
    proc = start(RUN, clip.path, "--gallery", gallery, "--models", models, "--json", report,
                 "--annotate", tmp_path / "a.mp4")
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, proc=proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Aborted!" not in err and err.strip().splitlines()[-1] == "interrupted"
    data = json.loads(report.read_text())
    assert data["status"] == "interrupted" and 3 <= len(data["frames"]) < clip.frames
    assert len(data["frames"]) == len(log.read_text().splitlines())
    assert temporary_files(tmp_path) == []
    assert (tmp_path / "a.mp4").stat().st_size > 0  # the frames so far, as a finished file


@pytest.mark.slow
def test_sigterm_stops_an_export_and_removes_its_temporary_files(tmp_path):
    """SIGTERM once the export has begun writing (its first temporary file is there): exit 143, no
    temporary file left, and the output folder it created is gone again."""
    pytest.importorskip("torch")
    out = tmp_path / "exported"
    proc = start(EXPORT, "default", "--out", out)
    try:
        wait_for(lambda: out.is_dir() and any(p.name.endswith(".tmp") for p in out.iterdir()), timeout=600, proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "Aborted!" not in err and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert not out.exists() or (temporary_files(out) == [] and not (out / "manifest.json").exists())
