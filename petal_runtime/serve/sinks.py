"""Where events go: JSON lines on stdout, a size-rotated JSON-lines file, an HTTP webhook.

Every sink has its own bounded queue and thread, so a slow or dead sink never stalls recognition or
the other sinks: `offer()` never blocks; when the queue is full the oldest event is dropped and
counted (`dropped`). `close(drain_s)` lets the sink deliver what it holds for up to `drain_s` seconds.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TextIO

from ..errors import PetalError
from ..files import check_writable, first_line


class Sink:
    name = "sink"

    def __init__(self, queue_size: int) -> None:
        self.queue: collections.deque = collections.deque()
        self.queue_size = queue_size
        self.cond = threading.Condition()
        self.dropped = 0  # events that did not fit in the queue (the oldest went)
        self.delivered = 0
        self.failed = 0  # events given up on after every retry
        self._closing = False
        self._stop = threading.Event()  # ends retries and waits at once (the drain time is over)
        self._busy = False
        self.thread = threading.Thread(target=self._loop, name=f"petal-sink-{self.name}", daemon=True)

    def start(self) -> "Sink":
        self.thread.start()
        return self

    def offer(self, event: dict) -> None:
        with self.cond:
            if self._closing:
                return
            if len(self.queue) >= self.queue_size:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(event)
            self.cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self.queue)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self._closing:
                    self.cond.wait(0.5)
                if not self.queue:
                    return  # closing and drained
                event = self.queue.popleft()
                self._busy = True
            try:
                ok = self.deliver(event)
            except Exception as exc:  # a sink's own failure is counted and logged, never raised
                ok = False
                self.log(f"{self.name}: {first_line(exc)}")
            with self.cond:
                self._busy = False
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
                self.cond.notify_all()
            if self._stop.is_set():
                with self.cond:
                    self.failed += len(self.queue)
                    self.queue.clear()
                return

    def deliver(self, event: dict) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self, drain_s: float = 5.0) -> None:
        """Deliver what is queued for up to `drain_s` seconds, then give up on the rest (counted failed)."""
        deadline = time.monotonic() + drain_s
        with self.cond:
            self._closing = True
            self.cond.notify_all()
            while (self.queue or self._busy) and time.monotonic() < deadline and self.thread.is_alive():
                self.cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        self._stop.set()
        self.thread.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        with self.cond:  # what is still queued is given up on (an event in flight ends within timeout_s)
            self.failed += len(self.queue)
            self.queue.clear()
        if not self.thread.is_alive():
            self.finish()

    def finish(self) -> None:
        """Release what the sink holds (files), after the last delivery."""


class StreamSink(Sink):
    """JSON lines on a text stream (stdout by default), flushed per event."""

    name = "stdout"

    def __init__(self, queue_size: int = 10000, stream: TextIO | None = None) -> None:
        super().__init__(queue_size)
        self.stream = stream

    def deliver(self, event: dict) -> bool:
        stream = self.stream or sys.stdout
        stream.write(json.dumps(event, separators=(",", ":")) + "\n")
        stream.flush()
        return True


class RotatingFileSink(Sink):
    """JSON lines appended to PATH; when a line would take it past `max_bytes`, PATH becomes PATH.1 (the
    older ones PATH.2 ... PATH.`backups`, the oldest removed) and a new PATH starts. Each line is written
    whole with one write() and flushed; the rotation is a rename."""

    name = "file"

    def __init__(self, path: str | Path, max_bytes: int = 50_000_000, backups: int = 5, queue_size: int = 10000):
        super().__init__(queue_size)
        self.path = Path(path)
        check_writable(self.path, "event file")
        self.max_bytes, self.backups = max_bytes, backups
        self.handle = open(self.path, "a", encoding="utf-8")
        self.size = self.handle.tell()

    def deliver(self, event: dict) -> bool:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        if self.size and self.size + len(line.encode()) > self.max_bytes:
            self._rotate()
        self.handle.write(line)
        self.handle.flush()
        self.size += len(line.encode())
        return True

    def _rotate(self) -> None:
        self.handle.close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.handle = open(self.path, "a", encoding="utf-8")
        self.size = 0

    def finish(self) -> None:
        self.handle.close()


class WebhookSink(Sink):
    """Each event POSTed as JSON; a failure (connection refused, timeout, HTTP 5xx or 429) is retried
    `retries` times with back-off doubling from `backoff_s` up to `max_backoff_s`; other 4xx answers are
    not retried (the endpoint refuses the event itself). While retrying, new events queue up to
    `queue_size`, then the oldest drop and `dropped` counts them."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, queue_size: int = 1000, headers: dict | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        super().__init__(queue_size)
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.attempts = 0
        self.retried = 0
        if log is not None:
            self.log = log  # type: ignore[method-assign]
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for webhooks

    def deliver(self, event: dict) -> bool:
        body = json.dumps(event, separators=(",", ":")).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                if self._stop.wait(delay):
                    return False
                delay = min(self.max_backoff_s, delay * 2)
            self.attempts += 1
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    response.read()
                return True
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    self.log(f"webhook {self.url}: HTTP {exc.code}, event not accepted")
                    return False
                reason = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = first_line(getattr(exc, "reason", exc), 100)
            if attempt == self.retries:
                self.log(f"webhook {self.url}: {reason}; event dropped after {self.retries + 1} attempts")
        return False


def build_sinks(config) -> list[Sink]:
    """The sinks a SinksSection asks for, not yet started."""
    sinks: list[Sink] = []
    if config.stdout.enabled:
        sinks.append(StreamSink(config.stdout.queue_size))
    if config.file.path:
        try:
            sinks.append(RotatingFileSink(config.file.path, config.file.max_bytes, config.file.backups,
                                          config.file.queue_size))
        except OSError as exc:
            raise PetalError(f"cannot open the event file {config.file.path} ({exc.strerror or exc})") from None
    w = config.webhook
    if w.url:
        sinks.append(WebhookSink(w.url, w.timeout_s, w.retries, w.backoff_s, w.max_backoff_s, w.queue_size,
                                 w.headers))
    return sinks
