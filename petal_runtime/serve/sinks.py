"""Where events go: JSON lines on stdout, a size-rotated JSON-lines file, an HTTP webhook, an MQTT broker.

Every sink has its own bounded queue and thread, so a slow or dead sink never stalls recognition or
the other sinks: `offer()` never blocks; when the queue is full the oldest event is dropped and
counted (`dropped`). `close(drain_s)` lets the sink deliver what it holds for up to `drain_s` seconds.
"""
from __future__ import annotations

import collections
import json
import os
import socket
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
        """Release what the sink holds (files, connections), after the last delivery."""

    def status(self) -> dict:
        return {"name": self.name, "queue": self.depth, "delivered": self.delivered, "dropped": self.dropped,
                "failed": self.failed}


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


def _paho():
    """paho-mqtt's client module, or a one-line PetalError that says how to install it."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise PetalError("the MQTT sink needs paho-mqtt, which is not installed: pip install 'petal[mqtt]'") from None
    return mqtt


class MqttSink(Sink):
    """Each event published as JSON to `topic` (a template: `{source}` and `{type}` are the event's) at
    `qos`, through paho-mqtt. paho's network thread holds the connection and, when it is lost or refused,
    reconnects with back-off doubling from `backoff_s` up to `max_backoff_s`. One event at a time is
    handed to paho and waited for (written at qos 0, acknowledged at 1, completed at 2); an event at qos
    1 or 2 whose acknowledgement the lost connection took is sent again once reconnected (at qos 1 the
    subscriber may then get it twice). While the broker is away, new events queue up to `queue_size`,
    then the oldest drop and `dropped` counts them. A host name that does not resolve is refused at
    once; a broker that does not answer is retried, as when it goes away later."""

    name = "mqtt"

    def __init__(self, host: str, port: int = 1883, topic: str = "petal/{source}/{type}", qos: int = 1,
                 retain: bool = False, client_id: str = "", username: str = "", password: str = "",
                 keepalive_s: int = 30, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 queue_size: int = 1000, log: Callable[[str], None] | None = None) -> None:
        super().__init__(queue_size)
        mqtt = self._mqtt = _paho()
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise PetalError(f"MQTT broker {host}:{port}: cannot resolve the host ({exc.strerror or exc})") from None
        self.host, self.port, self.topic, self.qos, self.retain = host, port, topic, qos, retain
        self.keepalive_s = keepalive_s
        self.where = f"mqtt {host}:{port}"
        if log is not None:
            self.log = log  # type: ignore[method-assign]
        self.connects = 0  # connections the broker accepted: the first and each reconnection
        self.connect_failures = 0  # attempts that failed (refused, unreachable, or CONNACK refused)
        self.connected = threading.Event()
        self._failing = False  # one log line per outage, not one per attempt
        self._acked: set[int] = set()  # message ids paho reports published
        self._ack = threading.Condition()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username:
            client.username_pw_set(username, password or None)
        client.reconnect_delay_set(backoff_s, max_backoff_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client
        self._looping = False

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    def start(self) -> "MqttSink":
        self.client.connect_async(self.host, self.port, self.keepalive_s)
        self.client.loop_start()  # paho's thread: connects, reconnects with back-off, sends, receives acks
        self._looping = True
        return super().start()

    # --- paho's callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.connect_failures += 1
            self._note_failure(f"the broker refused the connection ({reason_code})")
            return
        self.connects += 1
        if self._failing or self.connects > 1:
            self.log(f"{self.where}: connected again")
        self._failing = False
        self.connected.set()

    def _on_connect_fail(self, client, userdata) -> None:
        self.connect_failures += 1
        self._note_failure("cannot connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._closing:
            self._note_failure(f"connection lost ({reason_code})")

    def _note_failure(self, what: str) -> None:
        if not self._failing:
            self._failing = True
            self.log(f"{self.where}: {what}; reconnecting with back-off, events queue up to {self.queue_size}")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack:
            self._acked.add(mid)
            self._ack.notify_all()

    # --- the sink's thread
    def deliver(self, event: dict) -> bool:
        mqtt = self._mqtt
        payload = json.dumps(event, separators=(",", ":"))
        topic = self.topic.format(source=event.get("source", ""), type=event.get("type", ""))
        while True:
            while not self.connected.is_set():
                if self._stop.wait(0.05):
                    return False
            info = self.client.publish(topic, payload, qos=self.qos, retain=self.retain)
            if info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos == 0:
                continue  # not sent (the connection went just now): wait for the next one
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN at qos 1-2: paho holds it
                self.log(f"{self.where}: publish failed ({mqtt.error_string(info.rc)}), event dropped")
                return False
            if self._sent(info):
                return True
            if self._stop.is_set():
                return False
            # else a qos 0 packet the lost connection never sent: publish it again

    def _sent(self, info) -> bool:
        """Wait until paho reports `info` published: True; False when stopped, or for a qos 0 packet
        that the lost connection dropped unsent."""
        lost = self._mqtt.MQTT_ERR_CONN_LOST
        with self._ack:
            while info.mid not in self._acked:
                if self._stop.is_set() or (self.qos == 0 and info.rc == lost):
                    return False
                self._ack.wait(0.05)
            self._acked.discard(info.mid)
            return True

    def finish(self) -> None:
        if self._looping:
            self.client.disconnect()
            self.client.loop_stop()
            self._looping = False

    def status(self) -> dict:
        return {**super().status(), "connected": self.connected.is_set(), "reconnects": self.reconnects,
                "connect_failures": self.connect_failures}


def build_sinks(config, log: Callable[[str], None] | None = None) -> list[Sink]:
    """The sinks a SinksSection asks for, not yet started; `log` gets their one-line reports."""
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
                                 w.headers, log=log))
    m = config.mqtt
    if m.host:
        sinks.append(MqttSink(m.host, m.port, m.topic, m.qos, m.retain, m.client_id, m.username, m.password,
                              m.keepalive_s, m.backoff_s, m.max_backoff_s, m.queue_size, log=log))
    return sinks
