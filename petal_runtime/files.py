"""Atomic writes and hashing: every file a command writes appears complete or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from .errors import PetalError


def read_json(path: str | Path, missing: str, invalid: str) -> Any:
    """The JSON in `path`; a missing file raises PetalError(missing), an undecodable one
    PetalError(invalid) with `{error}` in it replaced by the decoder's message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PetalError(missing) from None
    except UnicodeDecodeError as exc:
        raise PetalError(invalid.replace("{error}", first_line(exc))) from None
    except OSError as exc:
        raise PetalError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge integers
        raise PetalError(invalid.replace("{error}", first_line(exc))) from None


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message as one line of at most `limit` characters, cut at a word boundary."""
    text = str(exc).strip()
    text = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds.

    The file gets the mode a plain open() would give it (0666 minus the umask), not mkstemp's 0600,
    so a runtime running as another user can read what the tools wrote. If the block is left by an
    exception (an error, Ctrl-C, SIGTERM through errors.Interrupted), the temporary file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, plain_file_mode())
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Refuse, before any work, an output that cannot be written: a folder, a path below a file, or a
    folder this process cannot create files in (tried, not guessed from permission bits)."""
    path = Path(path)
    if path.is_dir():
        raise PetalError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders atomic_path would create
        folder = folder.parent
    if not folder.is_dir():
        raise PetalError(f"cannot write {what} {path}: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".petal-probe-"):
            pass
    except OSError as exc:
        raise PetalError(f"cannot write {what} {path}: {folder} is not writable ({exc.strerror or exc})") from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file: the same path once resolved, or the same inode (a hard
    or symbolic link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False
