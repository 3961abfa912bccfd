"""petal-serve's configuration: a TOML file (read with the standard library) into one dataclass per section.

Every option and its default is defined once, here, as a dataclass field; the TOML keys are the field
names. Anything the dataclasses do not know (a misspelt key, a section that does not exist), a value
of the wrong type or out of range, two sources of one name: a one-line PetalError naming it, before
any model is loaded or source opened. `EXAMPLE_CONFIG` is what `petal-serve --example-config` prints;
a test keeps it loadable.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PetalError
from ..openset import check_far
from ..sources import STREAM_SCHEMES

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ServiceSection:
    models: str = ""  # a petal-export output folder (required)
    gallery: str = ""  # gallery .npy (required); its .far.json beside it sets the FAR thresholds
    backend: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads for the one inference worker (0: its default)
    far: float | None = None  # false-alarm target (None: 1 % where the gallery is calibrated, else a fixed 0.3)
    threshold: float | None = None  # a fixed cosine instead of the FAR rule
    top_k: int = 5
    max_batch: int = 32  # crops per IQA / recognizer call, all sources together
    max_wait_ms: float = 20.0  # how long the inference worker waits for other sources' crops
    min_track_frames: int = 3  # a track is announced (track_started) once seen in this many frames
    thumbnails: str = ""  # folder for a face thumbnail per identified event ("" for none)
    gallery_poll_s: float = 1.0  # how often the gallery file is checked for a change (0: only SIGHUP)
    stop_when_sources_end: bool = True  # exit once every source has ended (files); live sources never end
    drain_s: float = 5.0  # at shutdown, how long sinks get to deliver what they hold

    def check(self) -> None:
        for name in ("models", "gallery"):
            if not getattr(self, name):
                what = "a petal-export folder" if name == "models" else "a gallery .npy"
                raise PetalError(f"[service] {name} is required ({what})")
        if self.far is not None:
            try:
                check_far(self.far)
            except PetalError:
                raise PetalError(f"[service] far must lie strictly between 0 and 1, got {self.far:g}") from None
        _positive("service", self, "top_k", "max_batch", "min_track_frames")
        _non_negative("service", self, "threads", "max_wait_ms", "gallery_poll_s", "drain_s")


@dataclass
class HttpSection:
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback by default: /metrics and /sources are not for the whole network
    port: int = 8321  # 0: any free port (the chosen one is printed)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise PetalError(f"[http] port must be 0-65535, got {self.port}")
        if not self.host:
            raise PetalError("[http] host must not be empty")


@dataclass
class SourceSection:
    name: str = ""  # unique; appears in every event and metric
    url: str = ""  # a video file, image folder, rtsp://..., camera:N or /dev/videoN
    realtime: bool = False  # pace a file at its frame rate and drop frames when behind, like a camera
    loop: bool = False  # start a file again at its end (demos and soak tests)
    max_frames: int = 0  # stop after this many frames (0: no limit)
    min_face: int = 16
    detect_every: int = 4
    selection: str = "best"
    per_track: int = 3
    queue_size: int = 2  # frames between stages: small keeps event latency low on a busy machine
    connect_retries: int = 3  # attempts before a live source is refused at startup
    reconnect_backoff_s: list[float] = field(default_factory=lambda: [0.5, 30.0])  # first and longest wait

    def check(self) -> None:
        where = f"[[source]] {self.name or '(no name)'}"
        if not SOURCE_NAME.match(self.name):
            raise PetalError(f"{where}: name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                             "or digit)")
        if not self.url:
            raise PetalError(f"{where}: url is required")
        if not self.live:
            path = Path(self.url[len("file://"):] if self.url.startswith("file://") else self.url)
            if not path.exists():
                raise PetalError(f"{where}: {path} not found (a video file, a folder of images, a stream URL or "
                                 "camera:N)")
        _positive(where, self, "min_face", "detect_every", "per_track", "queue_size")
        _non_negative(where, self, "max_frames", "connect_retries")
        if self.selection not in ("best", "all"):
            raise PetalError(f"{where}: selection must be best or all, got {self.selection!r}")
        backoff = self.reconnect_backoff_s
        if len(backoff) != 2 or not 0 < backoff[0] <= backoff[1]:
            raise PetalError(f"{where}: reconnect_backoff_s must be [first, longest] seconds, 0 < first <= longest")

    @property
    def live(self) -> bool:
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        return scheme in STREAM_SCHEMES or self.url.startswith(("camera:", "/dev/video"))


@dataclass
class StdoutSink:
    enabled: bool = True  # JSON lines on stdout
    queue_size: int = 10000

    def check(self) -> None:
        _positive("[sinks.stdout]", self, "queue_size")


@dataclass
class FileSink:
    path: str = ""  # JSON lines, appended; "" for none
    max_bytes: int = 50_000_000  # rotated to PATH.1 (PATH.2, ...) when it would grow past this
    backups: int = 5
    queue_size: int = 10000

    def check(self) -> None:
        _positive("[sinks.file]", self, "max_bytes", "queue_size")
        _non_negative("[sinks.file]", self, "backups")


@dataclass
class WebhookSink:
    url: str = ""  # events POSTed one by one as JSON; "" for none
    timeout_s: float = 5.0
    retries: int = 5  # further attempts per event, with back-off doubling from backoff_s
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    queue_size: int = 1000  # events held while the endpoint is slow or down; the oldest drop beyond it
    headers: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.url and not re.match(r"^https?://", self.url):
            raise PetalError(f"[sinks.webhook] url must be http:// or https://, got {self.url!r}")
        _positive("[sinks.webhook]", self, "timeout_s", "backoff_s", "max_backoff_s", "queue_size")
        _non_negative("[sinks.webhook]", self, "retries")


TOPIC_FIELDS = ("source", "type")  # what an MQTT topic template may name


@dataclass
class MqttSink:
    host: str = ""  # the broker's host name or address; "" for none (needs the mqtt extra: paho-mqtt)
    port: int = 1883
    topic: str = "petal/{source}/{type}"  # per event; {source} and {type} are filled in
    qos: int = 1  # 0: at most once, 1: at least once, 2: exactly once
    retain: bool = False
    client_id: str = ""  # "" for a random one
    username: str = ""
    password: str = ""
    keepalive_s: int = 30
    backoff_s: float = 0.5  # wait before reconnecting, doubling up to max_backoff_s
    max_backoff_s: float = 30.0
    queue_size: int = 1000  # events held while the broker is away; the oldest drop beyond it

    def check(self) -> None:
        where = "[sinks.mqtt]"
        if not 1 <= self.port <= 65535:
            raise PetalError(f"{where} port must be 1-65535, got {self.port}")
        if self.qos not in (0, 1, 2):
            raise PetalError(f"{where} qos must be 0, 1 or 2, got {self.qos}")
        _positive(where, self, "keepalive_s", "backoff_s", "max_backoff_s", "queue_size")
        if self.backoff_s > self.max_backoff_s:
            raise PetalError(f"{where} backoff_s must not be above max_backoff_s")
        try:
            topic = self.topic.format(**{name: "x" for name in TOPIC_FIELDS})
        except (KeyError, IndexError, ValueError) as exc:
            raise PetalError(f"{where} topic {self.topic!r} is not a template of {{source}} and {{type}} "
                             f"({type(exc).__name__}: {exc})") from None
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise PetalError(f"{where} topic must be a non-empty MQTT topic without + or #, got {self.topic!r}")


@dataclass
class SinksSection:
    stdout: StdoutSink = field(default_factory=StdoutSink)
    file: FileSink = field(default_factory=FileSink)
    webhook: WebhookSink = field(default_factory=WebhookSink)
    mqtt: MqttSink = field(default_factory=MqttSink)

    def check(self) -> None:
        for sink in (self.stdout, self.file, self.webhook, self.mqtt):
            sink.check()


@dataclass
class ServeConfig:
    service: ServiceSection = field(default_factory=ServiceSection)
    http: HttpSection = field(default_factory=HttpSection)
    sinks: SinksSection = field(default_factory=SinksSection)
    source: list[SourceSection] = field(default_factory=list)
    path: Path | None = field(default=None, metadata={"toml": False})  # where it was read from

    def check(self) -> "ServeConfig":
        self.service.check()
        self.http.check()
        self.sinks.check()
        if not self.source:
            raise PetalError("the config names no source (add a [[source]] table with name and url)")
        seen: set[str] = set()
        for source in self.source:
            source.check()
            if source.name in seen:
                raise PetalError(f"[[source]] name {source.name!r} is used twice; source names must be unique")
            seen.add(source.name)
        return self

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> "ServeConfig":
        """A checked config from parsed TOML; relative paths are taken from `base` (the file's folder)."""
        config = _build(cls, data, "")
        if base is not None:
            _resolve_paths(config, base)
        return config.check()

    @classmethod
    def load(cls, path: str | Path) -> "ServeConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PetalError(f"config {path} not found (petal-serve --example-config prints one)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PetalError(f"cannot read config {path} ({getattr(exc, 'strerror', None) or exc})") from None
        toml = _toml()
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise PetalError(f"{path} is not valid TOML: {str(exc).splitlines()[0]}") from None
        try:
            config = cls.from_dict(data, path.parent)
        except PetalError as exc:
            raise PetalError(f"{path}: {exc}") from None
        config.path = path
        return config


def _toml():
    """tomllib (Python 3.11+), or tomli, the same parser as a package, on 3.10."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise PetalError("reading the config needs Python 3.11+ (tomllib) or `pip install tomli`") from None
    return tomllib


def _positive(where: str, obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise PetalError(f"{_bracket(where)} {name} must be positive, got {getattr(obj, name)}")


def _non_negative(where: str, obj, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise PetalError(f"{_bracket(where)} {name} must not be negative, got {getattr(obj, name)}")


def _bracket(where: str) -> str:
    return where if where.startswith("[") else f"[{where}]"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """`value` as the annotated type `tp`, or a PetalError that names `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except PetalError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PetalError(f"{where} must be a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise PetalError(f"{where} must be a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise PetalError(f"{where} must be a table, got {type(value).__name__}")
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise PetalError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PetalError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PetalError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PetalError(f"{where} must be a string, got {value!r}")
        return value
    raise PetalError(f"{where}: unsupported option type {_type_name(tp)}")  # pragma: no cover - a bug here


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise PetalError(f"unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        if name == "source" and cls is ServeConfig:
            if not isinstance(value, list):
                raise PetalError("source must be an array of tables ([[source]])")
            values[name] = [_build(SourceSection, v, f"source.{v.get('name', i) if isinstance(v, dict) else i}")
                            if isinstance(v, dict) else _coerce(v, SourceSection, f"source[{i}]")
                            for i, v in enumerate(value)]
            continue
        values[name] = _coerce(value, hints[name], where)
    return cls(**values)


def _resolve_paths(config: ServeConfig, base: Path) -> None:
    def resolve(text: str) -> str:
        return str(base / text) if text and not Path(text).is_absolute() else text

    config.service.models = resolve(config.service.models)
    config.service.gallery = resolve(config.service.gallery)
    config.service.thumbnails = resolve(config.service.thumbnails)
    config.sinks.file.path = resolve(config.sinks.file.path)
    for source in config.source:
        if not source.live and "://" not in source.url:
            source.url = resolve(source.url)


EXAMPLE_CONFIG = '''\
# petal-serve configuration (TOML). Every key is optional unless marked required; the values shown
# are the defaults. Relative paths are taken from this file's folder. Unknown keys are refused.

[service]
models = "exported"               # required: a petal-export output folder
gallery = "gallery.npy"           # required: petal-gallery build output; reloaded when it changes or on SIGHUP
# backend = "auto"                # auto, onnxruntime, onnxruntime-gpu, tensorrt
# threads = 0                     # ONNX Runtime threads for the inference worker (0: its default)
# far = 0.01                      # false-alarm target (needs gallery.far.json: petal-gallery calibrate);
#                                 # unset: 0.01 where the gallery is calibrated, else the cosine 0.3
# threshold = 0.35                # a fixed cosine instead of the FAR rule
# top_k = 5
# max_batch = 32                  # crops per IQA / recognizer call, all sources together
# max_wait_ms = 20.0              # longest wait for other sources' crops before a batch runs
# min_track_frames = 3            # frames before a track is announced (track_started)
# thumbnails = "thumbs"           # a JPEG of the face per identified event ("" for none)
# gallery_poll_s = 1.0            # gallery change check interval (0: only on SIGHUP)
# stop_when_sources_end = true    # exit once every source has ended (files; live sources reconnect)
# drain_s = 5.0                   # at shutdown, time the sinks get to deliver what they hold

[http]                            # /healthz, /metrics (Prometheus text), /sources (JSON)
# enabled = true
# host = "127.0.0.1"
# port = 8321                     # 0: any free port

[sinks.stdout]                    # events as JSON lines on stdout
# enabled = true
# queue_size = 10000

[sinks.file]                      # events as JSON lines in a size-rotated file
# path = "events.jsonl"           # "" for none
# max_bytes = 50000000            # then events.jsonl.1, .2, ...
# backups = 5
# queue_size = 10000

[sinks.webhook]                   # each event POSTed as JSON
# url = "http://127.0.0.1:9000/events"   # "" for none
# timeout_s = 5.0
# retries = 5                     # per event, back-off doubling from backoff_s up to max_backoff_s
# backoff_s = 0.5
# max_backoff_s = 30.0
# queue_size = 1000               # held while the endpoint is down; beyond it the oldest drop (counted)
# headers = { Authorization = "Bearer ..." }

[sinks.mqtt]                      # each event published as JSON (pip install 'petal[mqtt]': paho-mqtt)
# host = "127.0.0.1"              # the broker; "" for none
# port = 1883
# topic = "petal/{source}/{type}" # {source} and {type} are filled in per event
# qos = 1                         # 0 at most once, 1 at least once, 2 exactly once
# retain = false
# client_id = ""                  # "" for a random one
# username = ""
# password = ""
# keepalive_s = 30
# backoff_s = 0.5                 # reconnect wait, doubling up to max_backoff_s
# max_backoff_s = 30.0
# queue_size = 1000               # held while the broker is away; beyond it the oldest drop (counted)

[[source]]
name = "door"                     # required, unique: letters, digits, _ . -
url = "door.mp4"                  # required: a file, an image folder, rtsp://..., camera:0, /dev/video0
# realtime = false                # pace a file at its frame rate, dropping frames when behind
# loop = false                    # start a file again at its end
# max_frames = 0                  # stop after this many frames (0: no limit)
# min_face = 16                   # smallest face (px) to detect
# detect_every = 4                # full-frame detection every N frames, tracking in between
# selection = "best"              # best: the recognizer on each track's best crops; all: on every crop
# per_track = 3
# queue_size = 2                  # frames held between stages (more: smoother, but later events)
# connect_retries = 3             # a live source that does not answer after these is refused at startup
# reconnect_backoff_s = [0.5, 30.0]

# [[source]]
# name = "gate"
# url = "rtsp://192.0.2.10:554/stream1"
'''
