"""Frame sources: video files, camera devices, RTSP/HTTP streams (all through PyAV) and image folders.

    with open_source("clip.mp4") as source:
        for frame in source:          # Frame(index, time, image): BGR uint8
            ...

Damaged input is decoded past, not given up on: a packet the decoder rejects is counted in
`source.stats.broken_packets` and decoding goes on with the next one (H.264 recovers at the next
key frame); a truncated file yields the frames before the cut (an MP4 whose index, the moov atom,
was never written cannot be decoded at all, and says so). Live streams open with timeouts, in a
helper thread so that Ctrl-C, SIGTERM or `stop()` end a hung connection attempt at once; they
reconnect with exponential back-off when they drop (`stats.reconnects`), print each retry, and give up
after `max_retries` consecutive failures. `limit` stops any source after that many frames.
"""
from __future__ import annotations

import abc
import itertools
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import PetalError
from .files import first_line
from .images import IMAGE_SUFFIXES, read_image

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
MAX_CONSECUTIVE_ERRORS = 200  # a file this broken in a row is not worth reading on


@dataclass
class Frame:
    index: int  # position in the source (frames dropped later keep their gaps)
    time: float | None  # seconds from the start, where the source knows it
    image: np.ndarray  # BGR uint8 [H, W, 3]


@dataclass
class SourceStats:
    frames: int = 0
    broken_packets: int = 0  # packets the demuxer or decoder rejected, or flagged corrupt
    corrupt_frames: int = 0  # frames the decoder produced but flagged as damaged
    unreadable_images: int = 0
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)  # first few messages, for the report

    def note(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "broken_packets": self.broken_packets, "corrupt_frames": self.corrupt_frames,
                "unreadable_images": self.unreadable_images, "reconnects": self.reconnects, "errors": list(self.errors)}


class Source(abc.ABC):
    live = False  # live sources drop frames rather than fall behind

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = SourceStats()
        self.fps: float | None = None
        self.total_frames: int | None = None
        self.size: tuple[int, int] | None = None  # width, height
        self.limit: int | None = None  # stop after this many frames (petal-run --max-frames)
        self._closed = threading.Event()

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]: ...

    def __iter__(self) -> Iterator[Frame]:
        if self.limit is None:
            return self.frames()
        if self.limit < 1:
            raise PetalError(f"a frame limit must be at least 1, got {self.limit}")
        return itertools.islice(self.frames(), self.limit)

    def stop(self) -> None:
        """Ask the iteration to end at the next frame; safe from any thread (close() is the owner's)."""
        self._closed.set()

    def close(self) -> None:
        self._closed.set()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"name": self.name, "kind": type(self).__name__, "live": self.live, "fps": self.fps,
                "total_frames": self.total_frames, "size": list(self.size) if self.size else None}


def _av():
    import av

    return av


class _PyAVReader:
    """Demux and decode one opened container's first video stream, past broken packets."""

    def __init__(self, container, stats: SourceStats) -> None:
        av = _av()
        self.av = av
        self.container = container
        if not container.streams.video:
            raise PetalError(f"{container.name} has no video stream")
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads inside FFmpeg, GIL released
        self.stats = stats
        # Held while FFmpeg reads or decodes: close() from another thread must not free the container
        # under a read in progress; it leaves the closing to the reading thread instead.
        self._busy = threading.Lock()
        self._close_later = False
        self._closed = False

    def frames(self, first_index: int, closed: threading.Event) -> Iterator[tuple[int, float | None, np.ndarray]]:
        av = self.av
        index = first_index
        errors_in_row = 0
        demux = self.container.demux(self.stream)
        while not closed.is_set() and not self._closed:
            try:
                with self._busy:
                    packet = next(demux)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except av.error.FFmpegError as exc:
                errors_in_row = self._broken("demux", exc, errors_in_row)
                if errors_in_row > MAX_CONSECUTIVE_ERRORS:
                    break
                demux = self.container.demux(self.stream)  # a failed generator is finished; resume
                continue
            if packet.is_corrupt:
                self.stats.broken_packets += 1
            try:
                with self._busy:
                    decoded = packet.decode() if not self._closed else []
            except av.error.FFmpegError as exc:
                errors_in_row = self._broken("decode", exc, errors_in_row)
                if errors_in_row > MAX_CONSECUTIVE_ERRORS:
                    break
                continue
            errors_in_row = 0
            for frame in decoded:
                yield index, frame.time, self._to_bgr(frame)
                index += 1
        if not closed.is_set() and not self._closed:  # the decoder holds back a few frames until flushed
            try:
                with self._busy:
                    flushed = self.stream.codec_context.decode(None)
                for frame in flushed:
                    yield index, frame.time, self._to_bgr(frame)
                    index += 1
            except av.error.FFmpegError as exc:
                self.stats.note(f"flush: {first_line(exc, 200)}")
        if self._close_later:
            self._close_now()

    def _broken(self, stage: str, exc: BaseException, errors_in_row: int) -> int:
        """A packet that failed to demux or decode: counted and noted; returns the errors in a row."""
        self.stats.broken_packets += 1
        self.stats.note(f"{stage}: {first_line(exc, 200)}")
        return errors_in_row + 1

    def _to_bgr(self, frame) -> np.ndarray:
        if frame.is_corrupt:
            self.stats.corrupt_frames += 1
        return frame.to_ndarray(format="bgr24")

    def close(self) -> None:
        """Close the container; if another thread is inside a read, that thread closes it when the read
        returns (a read ends within the source's timeout)."""
        if self._busy.acquire(timeout=0.5):
            try:
                self._close_now()
            finally:
                self._busy.release()
        else:
            self._close_later = True

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.container.close()
        except Exception:  # pragma: no cover - closing a broken container
            pass


def _open_container(target: str, options: dict | None = None, format: str | None = None, timeout: float | None = None):
    av = _av()
    kwargs = {"options": options or {}, "metadata_errors": "ignore"}
    if format:
        kwargs["format"] = format
    if timeout:
        kwargs["timeout"] = timeout
    return av.open(target, **kwargs)


class VideoFileSource(Source):
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        super().__init__(str(path))
        if not path.is_file():
            raise PetalError(f"video file {path} not found")
        av = _av()
        try:
            container = _open_container(str(path))
        except av.error.FFmpegError as exc:
            if _mp4_without_index(path):
                raise PetalError(f"{path} is an MP4 cut before its index was written (no moov atom, as an "
                                 "interrupted recording leaves it): its frames cannot be decoded without it; "
                                 "record with faststart or to .ts/.mkv, or repair it with a tool such as "
                                 "untrunc and a good file from the same camera") from None
            raise PetalError(f"{path} is not a video this runtime can read ({first_line(exc, 200)})") from None
        try:
            self._reader = _PyAVReader(container, self.stats)
        except PetalError:
            container.close()
            raise
        stream = self._reader.stream
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.total_frames = int(stream.frames) or None
        if self.total_frames is None and self.fps and container.duration:
            self.total_frames = int(round(container.duration / 1e6 * self.fps))
        self.size = (stream.codec_context.width, stream.codec_context.height)

    def frames(self) -> Iterator[Frame]:
        for index, t, image in self._reader.frames(0, self._closed):
            self.stats.frames += 1
            yield Frame(index, t, image)
        if self.stats.frames == 0 and self.stats.broken_packets:
            self.stats.note("no frame could be decoded")

    def close(self) -> None:
        super().close()
        self._reader.close()


def _mp4_without_index(path: Path) -> bool:
    """An ISO-BMFF file (ftyp first) whose top-level boxes hold media data but no moov."""
    boxes = set()
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            offset = 0
            while offset + 8 <= size and len(boxes) < 64:
                handle.seek(offset)
                head = handle.read(16)
                length, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if length == 1 and len(head) >= 16:
                    length = int.from_bytes(head[8:16], "big")
                elif length == 0:
                    length = size - offset
                boxes.add(kind)
                if length < 8:
                    break
                offset += length
    except OSError:
        return False
    return b"ftyp" in boxes and b"moov" not in boxes


class StreamSource(Source):
    """A live stream (RTSP, HTTP, ...) or camera device through PyAV, reconnecting with back-off.

    `opener` (for tests and unusual devices) is a callable returning an opened PyAV container.
    """

    live = True

    def __init__(self, url: str, format: str | None = None, options: dict | None = None,
                 max_retries: int | None = 8, backoff: tuple[float, float] = (0.5, 30.0),
                 timeout: float = 10.0, opener: Callable[[], object] | None = None,
                 sleep: Callable[[float], None] | None = None, log: Callable[[str], None] | None = None) -> None:
        super().__init__(url)
        self.url = url
        self.format = format
        self.options = dict(options or {})
        if url.startswith(("rtsp://", "rtsps://")):
            self.options.setdefault("rtsp_transport", "tcp")
        self.max_retries = max_retries
        self.backoff = backoff
        self.timeout = timeout
        self._opener = opener or (lambda: _open_container(self.url, self.options, self.format, self.timeout))
        self._sleep = sleep or self._closed.wait  # stop() ends a back-off at once
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._reader = self._connect(first=True)

    def _open(self):
        """The opener's container, opened in a helper thread: this thread waits in short steps, so a
        signal (Ctrl-C, SIGTERM) or stop() ends the wait at once; the helper ends within the timeout and
        closes what it opened if nobody waits for it any more."""
        box: dict = {}

        def target() -> None:
            if self._closed.is_set():  # stopped (or interrupted) before this attempt began
                return
            try:
                box["container"] = self._opener()
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc
            if self._closed.is_set() and "container" in box:
                box.pop("container").close()

        helper = threading.Thread(target=target, name="petal-connect", daemon=True)
        try:
            helper.start()
            while helper.is_alive():
                helper.join(0.05)
                if self._closed.is_set():
                    return None
        except BaseException:
            self._closed.set()
            raise
        if "error" in box:
            raise box["error"]
        return box.get("container")

    def _connect(self, first: bool = False) -> _PyAVReader | None:
        try:
            return self._connect_attempts(first)
        except BaseException:  # Ctrl-C, SIGTERM: no further attempt may start
            self._closed.set()
            raise

    def _connect_attempts(self, first: bool) -> _PyAVReader | None:
        av = _av()
        attempt = 0
        delay = self.backoff[0]
        while not self._closed.is_set():
            try:
                container = self._open()
                if container is None:
                    return None
                reader = _PyAVReader(container, self.stats)
                if self.size is None:
                    ctx = reader.stream.codec_context
                    self.size = (ctx.width, ctx.height)
                    rate = reader.stream.average_rate or reader.stream.guessed_rate
                    self.fps = float(rate) if rate else None
                return reader
            except (av.error.FFmpegError, OSError, PetalError) as exc:
                attempt += 1
                self.stats.note(f"connect: {first_line(exc, 200)}")
                if self.max_retries is not None and attempt > self.max_retries:
                    if first:
                        raise PetalError(f"could not open {self.url}: {first_line(exc, 200)}") from None
                    return None
                tries = f" of {self.max_retries}" if self.max_retries is not None else ""
                self._log(f"{self.url}: {first_line(exc, 200)}; retry {attempt}{tries} in {delay:g} s")
                self._sleep(delay)
                delay = min(self.backoff[1], delay * 2)
        return None

    def frames(self) -> Iterator[Frame]:
        index = 0
        empty_in_row = 0
        reader = self._reader
        while reader is not None and not self._closed.is_set():
            av = _av()
            got = 0
            try:
                for _, t, image in reader.frames(index, self._closed):
                    self.stats.frames += 1
                    yield Frame(index, t, image)
                    index += 1
                    got += 1
            except (av.error.FFmpegError, OSError) as exc:
                self.stats.note(f"stream: {first_line(exc, 200)}")
            reader.close()
            if self._closed.is_set():
                break
            # The stream ended or dropped: a live source comes back, so reconnect. Connections that
            # deliver nothing count as failures, so a dead server is not hammered in a loop.
            empty_in_row = 0 if got else empty_in_row + 1
            if self.max_retries is not None and empty_in_row > self.max_retries:
                self.stats.note("stream gave no frames after reconnecting; giving up")
                break
            if empty_in_row:
                self._sleep(min(self.backoff[1], self.backoff[0] * 2 ** (empty_in_row - 1)))
            self.stats.reconnects += 1
            reader = self._reader = self._connect()

    def close(self) -> None:
        super().close()
        if self._reader is not None:
            self._reader.close()


def camera_format() -> str:
    if sys.platform.startswith("linux"):
        return "v4l2"
    if sys.platform == "darwin":
        return "avfoundation"
    return "dshow"


class CameraSource(StreamSource):
    """A local camera: /dev/videoN on Linux (v4l2), an index elsewhere (avfoundation, dshow)."""

    def __init__(self, device: str | int, **kwargs) -> None:
        if isinstance(device, int) or str(device).isdigit():
            index = int(device)
            target = f"/dev/video{index}" if sys.platform.startswith("linux") else (
                str(index) if sys.platform == "darwin" else f"video={index}")
        else:
            target = str(device)
        kwargs.setdefault("max_retries", 3)
        super().__init__(target, format=camera_format(), **kwargs)


class ImageFolderSource(Source):
    """Every image in a folder (sorted by name) as one frame; unreadable files are counted and skipped."""

    def __init__(self, folder: str | Path, fps: float | None = None) -> None:
        folder = Path(folder)
        super().__init__(str(folder))
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise PetalError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.total_frames = len(self.paths)
        self.fps = fps

    def frames(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            if self._closed.is_set():
                break
            image = read_image(path)
            if image is None:
                self.stats.unreadable_images += 1
                self.stats.note(f"unreadable image {path.name}")
                continue
            if self.size is None:
                self.size = (image.shape[1], image.shape[0])
            self.stats.frames += 1
            yield Frame(index, index / self.fps if self.fps else None, image)


_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


def open_source(spec: str | int | Path, **options) -> Source:
    """A source from what the user typed: a file, a folder of images, a URL, a camera.

    Cameras: an integer, `camera:N`, or a /dev/video* path.
    """
    if isinstance(spec, int):
        return CameraSource(spec, **options)
    text = str(spec)
    match = _SCHEME.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme == "file":
            return open_source(text[len("file://"):])
        if scheme not in STREAM_SCHEMES:
            raise PetalError(f"unsupported stream scheme {scheme}:// (supported: {', '.join(STREAM_SCHEMES)})")
        return StreamSource(text, **options)
    if text.startswith("camera:"):
        return CameraSource(text.split(":", 1)[1], **options)
    if text.startswith("/dev/video"):
        return CameraSource(text, **options)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, **options)
    if not path.exists():
        raise PetalError(f"{path} not found (a video file, a folder of images, a stream URL or camera:N)")
    return VideoFileSource(path)
