"""Frame sources on real encoded video: damaged and truncated files, non-videos, HTTP streams that drop
and come back, image folders, and the bounded queues' drop policy."""
from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.errors import PetalError
from petal_runtime.pipeline import _BoundedQueue
from petal_runtime.sources import (ImageFolderSource, StreamSource, VideoFileSource, open_source)


@pytest.fixture(scope="module")
def clip(shared_faces):
    from conftest import require_models

    require_models()
    return rs.lfw_clip()


def damaged_copy(clip, tmp_path, name="damaged.mp4", seed=0):
    data = bytearray(clip.path.read_bytes())
    rng = np.random.default_rng(seed)
    for pos in np.linspace(len(data) * 0.3, len(data) * 0.8, 6).astype(int):
        data[pos:pos + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_clean_file_decodes_every_frame(clip):
    with VideoFileSource(clip.path) as source:
        frames = list(source)
        assert source.total_frames == clip.frames and source.fps == 25 and source.size == (640, 360)
    assert [f.index for f in frames] == list(range(clip.frames))
    assert frames[0].image.shape == (360, 640, 3) and frames[0].image.dtype == np.uint8
    assert source.stats.broken_packets == 0


def test_damaged_file_is_decoded_past_and_counted(clip, tmp_path):
    with open_source(damaged_copy(clip, tmp_path)) as source:
        frames = list(source)
    assert source.stats.broken_packets > 0
    assert len(frames) >= clip.frames * 0.7  # H.264 recovers at the next key frame


def test_truncated_file_yields_the_frames_before_the_cut(clip, tmp_path):
    data = clip.path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with open_source(cut) as source:
        frames = list(source)
    assert 0.3 * clip.frames < len(frames) < clip.frames


def test_not_a_video_and_missing_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(PetalError, match="notes.mp4 is not a video this runtime can read"):
        open_source(text)
    with pytest.raises(PetalError, match="not found"):
        open_source(tmp_path / "absent.mp4")
    with pytest.raises(PetalError, match="unsupported stream scheme"):
        open_source("gopher://example/clip")


def test_image_folder_counts_unreadable_images(clip, tmp_path):
    with open_source(clip.path) as source:
        for frame in source:
            if frame.index < 5:
                cv2.imwrite(str(tmp_path / f"{frame.index:04d}.jpg"), frame.image)
    (tmp_path / "0002b.jpg").write_bytes(b"broken")
    source = open_source(tmp_path)
    assert isinstance(source, ImageFolderSource)
    frames = list(source)
    assert len(frames) == 5 and source.stats.unreadable_images == 1


class _DroppingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; the first request of each file is cut off after `cut` bytes (a dropped stream)."""

    requests: list[str] = []
    cut = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.cut and type(self).requests.count(self.path) == 1:
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: self.cut])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_server(clip, tmp_path):
    # An MPEG-TS copy: like a live stream it can be read from any point, so a dropped connection
    # still delivers the frames before the drop.
    import av

    ts = tmp_path / "live.ts"
    with av.open(str(clip.path)) as src, av.open(str(ts), "w", format="mpegts") as dst:
        stream_in = src.streams.video[0]
        stream_out = dst.add_stream_from_template(stream_in)
        for packet in src.demux(stream_in):
            if packet.dts is None:
                continue
            packet.stream = stream_out
            dst.mux(packet)
    handler = type("Handler", (_DroppingHandler,), {"requests": []})
    handler.cut = ts.stat().st_size // 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_http_stream_reconnects_after_a_drop(http_server, clip):
    base, handler = http_server
    sleeps = []
    source = open_source(f"{base}/live.ts", max_retries=2, sleep=sleeps.append)
    assert isinstance(source, StreamSource) and source.live
    frames = []
    for frame in source:
        frames.append(frame)
        if len(frames) > 3 * clip.frames:
            break
    source.close()
    # First connection delivers about half the clip and drops; the reconnect gets the whole stream;
    # when that ends the server is asked again, and so on until the retries give out.
    assert source.stats.reconnects >= 2
    assert len(handler.requests) >= 2
    assert len(frames) > clip.frames
    assert [f.index for f in frames] == list(range(len(frames)))


def test_stream_back_off_doubles_and_gives_up():
    attempts, sleeps = [], []

    def opener():
        attempts.append(time.monotonic())
        raise OSError("connection refused")

    with pytest.raises(PetalError, match="could not open rtsp://camera/1: connection refused"):
        StreamSource("rtsp://camera/1", opener=opener, max_retries=4, backoff=(0.5, 3.0), sleep=sleeps.append)
    assert len(attempts) == 5 and sleeps == [0.5, 1.0, 2.0, 3.0]


def test_bounded_queue_policies():
    stop = threading.Event()
    oldest = _BoundedQueue(3, "drop-oldest")
    for i in range(10):
        assert oldest.put(i, stop)
    assert oldest.peek_all() == [7, 8, 9] and oldest.dropped == 7
    newest = _BoundedQueue(3, "drop-newest")
    for i in range(10):
        newest.put(i, stop)
    assert newest.peek_all() == [0, 1, 2] and newest.dropped == 7
    block = _BoundedQueue(2, "block")
    block.put(1, stop)
    block.put(2, stop)
    stop.set()
    assert block.put(3, stop) is False and block.peek_all() == [1, 2]  # a stopped producer gives up
    assert block.get(stop) == 1


def test_stream_that_ends_for_good_stops_after_retries(clip):
    import av

    opened, sleeps = [], []

    def opener():
        opened.append(1)
        if len(opened) == 1:
            return av.open(str(clip.path))
        raise OSError("no route to host")

    source = StreamSource("rtsp://camera/2", opener=opener, max_retries=3, sleep=sleeps.append)
    frames = list(source)
    assert len(frames) == clip.frames
    assert source.stats.reconnects == 1 and len(opened) == 5 and sleeps == [0.5, 1.0, 2.0]
