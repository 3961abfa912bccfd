"""Clients of a Triton Inference Server, created lazily from a URL (tritonclient, HTTP or gRPC).

    http://host:8000, https://host:8443, host:8000   -> tritonclient.http
    grpc://host:8001, grpcs://host:8443              -> tritonclient.grpc

A server that does not answer, or stops answering, is one PetalError that names the URL
(`TritonUnreachable`); every other failure the server reports is a PetalError with its message.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ...errors import PetalError
from ...files import first_line

INSTALL_HINT = "tritonclient is not installed: pip install 'petal[triton]' (tritonclient[http,grpc])"
CONNECT_TIMEOUT_S = 10.0  # how long a server that does not answer takes to be reported
NETWORK_TIMEOUT_S = 120.0  # one inference (a full batch on a busy CPU server)
SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}


class TritonUnreachable(PetalError):
    """The server at the URL does not answer (refused, reset, timed out, unknown host)."""


@dataclass(frozen=True)
class TritonUrl:
    text: str  # as given
    protocol: str  # "http" or "grpc"
    ssl: bool
    address: str  # host:port, what tritonclient takes

    @classmethod
    def parse(cls, url: str) -> "TritonUrl":
        text = str(url).strip()
        if not text:
            raise PetalError("empty Triton URL (give --triton-url http://HOST:8000 or grpc://HOST:8001)")
        split = urlsplit(text if "://" in text else f"http://{text}")
        if split.scheme not in SCHEMES:
            raise PetalError(f"Triton URL {text} has scheme {split.scheme!r}; use one of "
                             f"{', '.join(s + '://' for s in SCHEMES)}")
        if not split.hostname or split.path not in ("", "/") or split.query:
            raise PetalError(f"Triton URL {text} should be SCHEME://HOST:PORT, nothing more")
        try:
            port = split.port
        except ValueError:
            raise PetalError(f"Triton URL {text} has no valid port") from None
        protocol, ssl = SCHEMES[split.scheme]
        if port is None:
            port = 8001 if protocol == "grpc" else 8000
        host = f"[{split.hostname}]" if ":" in split.hostname else split.hostname
        return cls(text, protocol, ssl, f"{host}:{port}")


def tritonclient_missing() -> str | None:
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def _client_module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise PetalError(INSTALL_HINT) from None
    return module


def is_unreachable(exc: BaseException) -> bool:
    """True for the failures of a server that is down, restarting or not there at all."""
    if isinstance(exc, (ConnectionError, socket.timeout, socket.gaierror, TimeoutError, EOFError)):
        return True
    if isinstance(exc, OSError):
        return True  # connection refused/reset/unreachable from the HTTP client's sockets
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("unavailable", "connection refused", "failed to connect", "deadline exceeded",
                                   "connection reset", "broken pipe", "socket closed", "connect failed"))


def describe_failure(url: "TritonUrl", exc: BaseException, doing: str) -> PetalError:
    """The PetalError for `exc` raised while `doing` (e.g. 'running petal_recognizer')."""
    message = first_line(exc, 200) or type(exc).__name__
    if is_unreachable(exc):
        return TritonUnreachable(f"Triton server at {url.text} does not answer ({message}) while {doing}")
    return PetalError(f"Triton server at {url.text} failed {doing}: {message}")


class ClientFromUrl:
    """Callable that returns a new tritonclient InferenceServerClient for `url`, once the server is live.

    One client per thread (tritonclient's HTTP client is not thread-safe): the runner calls this again in
    each thread and after a failed connection.
    """

    def __init__(self, url: str | TritonUrl, connect_timeout: float = CONNECT_TIMEOUT_S,
                 network_timeout: float = NETWORK_TIMEOUT_S) -> None:
        self.url = url if isinstance(url, TritonUrl) else TritonUrl.parse(url)
        self.connect_timeout = connect_timeout
        self.network_timeout = network_timeout

    @property
    def protocol(self) -> str:
        return self.url.protocol

    def module(self):
        return _client_module(self.url.protocol)

    def __call__(self) -> Any:
        module = self.module()
        try:
            if self.url.protocol == "grpc":
                client = module.InferenceServerClient(self.url.address, ssl=self.url.ssl)
            else:
                client = module.InferenceServerClient(self.url.address, ssl=self.url.ssl,
                                                      connection_timeout=self.connect_timeout,
                                                      network_timeout=self.network_timeout)
        except Exception as exc:  # tritonclient raises its own exception types
            raise describe_failure(self.url, exc, "connecting") from None
        try:
            live = client.is_server_live(**self.timeout_kwargs())
        except Exception as exc:
            _close(client)
            raise describe_failure(self.url, exc, "checking that it is live") from None
        if not live:
            _close(client)
            raise TritonUnreachable(f"Triton server at {self.url.text} answers but is not live")
        return client

    def timeout_kwargs(self) -> dict:
        """Per-call deadline where the protocol takes one (gRPC's client_timeout, in seconds)."""
        return {"client_timeout": self.connect_timeout} if self.url.protocol == "grpc" else {}

    def as_json(self) -> dict:
        """Keyword arguments that make gRPC answer metadata and configs as JSON dicts, as HTTP does."""
        return {"as_json": True} if self.url.protocol == "grpc" else {}


def _close(client: Any) -> None:
    try:
        client.close()
    except Exception:  # closing a broken client must not hide why it broke
        pass


def close_client(client: Any) -> None:
    _close(client)


__all__ = ["CONNECT_TIMEOUT_S", "ClientFromUrl", "INSTALL_HINT", "NETWORK_TIMEOUT_S", "TritonUnreachable",
           "TritonUrl", "close_client", "describe_failure", "is_unreachable", "tritonclient_missing"]
