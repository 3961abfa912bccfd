"""User-facing errors: the CLIs print these as one line and exit non-zero, never a traceback."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PetalError(Exception):
    """A mistake the user can fix (bad path, wrong model, corrupt file). Message is one line."""

    exit_code = 2


class InternalError(RuntimeError):
    """A bug in PETAL itself (a broken invariant, an API used out of order), not something the user can fix:
    never caught as a PetalError, so its traceback reaches whoever reports it."""


class FeedError(PetalError, ValueError):
    """Inputs handed to a runner that do not fit its graph (names, dtype, shape, batch): the caller's mistake."""


class ModelsMissingError(PetalError):
    """Model files are absent from the cache; the message names the command that fetches them."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached a command: unwind like Ctrl-C (finally blocks run, temporary files go,
    reports are written with status interrupted), then exit 128 + the signal (130, 143).

    A BaseException that is not a KeyboardInterrupt, so click passes it through instead of printing
    "Aborted!" and exiting 1, and `except Exception` does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


INTERRUPTS = (KeyboardInterrupt, Interrupted)


def interrupt_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C (KeyboardInterrupt or SIGINT), 143 for SIGTERM."""
    return exc.exit_code if isinstance(exc, Interrupted) else 130


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise Interrupted; the first one
    only: a second signal while the first unwinds is ignored, so the report still gets written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


EXIT_GRACE_SECONDS = 0.8


def _exit(code) -> None:
    """sys.exit(code) once helper threads have ended. One still inside native code after a short grace
    (a stream connection or read that ends only at its timeout) is not waited for, nor is anything after
    a signal: flush and leave at once (os._exit), since interpreter shutdown under such a thread can
    crash (PyAV's interrupt callback takes the GIL), and the command's results are already written."""
    signalled = code in (130, 143)
    deadline = time.monotonic() + (0.0 if signalled else EXIT_GRACE_SECONDS)
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    lingering = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if not lingering and not signalled:  # after a signal, a thread may still be starting
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code or 0))


def exit_on_user_error(func: F) -> F:
    """Wrap a CLI entry point: PetalError becomes `error: ...` on stderr and a non-zero exit; SIGINT and
    SIGTERM unwind the command (see Interrupted) and exit 130 and 143."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with signals_interrupt():
                result = func(*args, **kwargs)
        except PetalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            _exit(exc.exit_code)
        except INTERRUPTS as exc:
            print("interrupted", file=sys.stderr)
            _exit(interrupt_exit_code(exc))
        except SystemExit as exc:  # click's standalone mode ends every command this way
            _exit(exc.code)
        return result

    return wrapper  # type: ignore[return-value]
