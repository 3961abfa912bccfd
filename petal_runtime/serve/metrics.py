"""A small metrics registry written out in the Prometheus text exposition format (version 0.0.4).

No dependency: counters, gauges and histograms with labels, thread-safe, rendered by `render()`.
Gauges that are read rather than set (queue depths, fps) are callbacks evaluated at scrape time.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple[str, ...]:
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels) -> None:
        """For counters kept elsewhere (a source's own frame count): the running total as it is now."""
        with self._lock:
            self.values[self._key(labels)] = float(value)

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def __init__(self, *args, read: Callable[[], dict[tuple, float]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read = read  # called at scrape time: label values -> value

    def set(self, value: float, **labels) -> None:
        self.set_total(value, **labels)

    def lines(self) -> list[str]:
        if self.read is not None:
            try:
                items = sorted(self.read().items())
            except Exception:  # a scrape never fails because one gauge could not be read
                items = []
            return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]
        return super().lines()


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.values: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            state = self.values.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            if index < len(self.buckets):
                state[index] += 1
            state[-2] += value
            state[-1] += 1

    def lines(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self.values.items())
        for key, state in items:
            running = 0
            for bound, count in zip(self.buckets, state):
                running += count
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {state[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(state[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {state[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric):
        self.metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return self.add(Counter(name, help, labels))

    def gauge(self, name: str, help: str, labels: Iterable[str] = (), read=None) -> Gauge:
        return self.add(Gauge(name, help, labels, read=read))

    def histogram(self, name: str, help: str, labels: Iterable[str] = (), buckets=LATENCY_BUCKETS) -> Histogram:
        return self.add(Histogram(name, help, labels, buckets))

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"
