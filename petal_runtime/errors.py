"""User-facing errors: the CLIs print these as one line and exit non-zero, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PetalError(Exception):
    """A mistake the user can fix (bad path, wrong model, corrupt file). Message is one line."""

    exit_code = 2


class ModelsMissingError(PetalError):
    """Model files are absent from the cache; the message names the command that fetches them."""


def exit_on_user_error(func: F) -> F:
    """Wrap a CLI entry point so PetalError becomes `error: ...` on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PetalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
