"""A live MPEG-TS stream over HTTP for the tests, in its own process: the clip's H.264 packets copied (not
re-encoded) into MPEG-TS and sent at the clip's own pace, looped, to every client that GETs any path; what
`ffmpeg -re -stream_loop -1 -i CLIP -c copy -f mpegts -listen 1 http://127.0.0.1:PORT` serves, with PyAV
(a runtime dependency) instead of the ffmpeg program, which a clean machine may not have.

    python tests/stream_server.py CLIP PORT

Prints `listening` once it accepts connections; runs until killed (a camera that goes away).
"""
from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av


def stream(clip: str, out) -> None:
    """The clip's video packets into MPEG-TS on `out`, paced by their timestamps, the clip looped."""
    start = time.monotonic()
    offset = 0  # ticks of the input's time base already sent (the loops before this one)
    with av.open(out, "w", format="mpegts", buffer_size=4096, options={"flush_packets": "1"}) as dst:
        target = None
        while True:
            with av.open(clip) as src:
                source = src.streams.video[0]
                if target is None:
                    target = dst.add_stream_from_template(source)
                base, first, last = source.time_base, None, None
                for packet in src.demux(source):
                    if packet.dts is None:
                        continue
                    first = packet.dts if first is None else first
                    last = packet.dts + (packet.duration or 0)
                    due = start + float((packet.dts - first + offset) * base)
                    if due > time.monotonic():
                        time.sleep(due - time.monotonic())
                    packet.dts += offset
                    if packet.pts is not None:
                        packet.pts += offset
                    packet.stream = target
                    dst.mux(packet)
                offset += last - first  # the next loop's timestamps follow on from this one's


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        try:
            stream(self.server.clip, self.wfile)
        except (OSError, av.error.FFmpegError):
            pass  # the client went away

    def log_message(self, *args):
        pass


def main() -> None:
    clip, port = sys.argv[1], int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # SO_REUSEADDR: a restart gets the port back
    server.daemon_threads = True
    server.clip = clip
    print("listening", flush=True)
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    main()
