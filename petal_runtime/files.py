"""Atomic writes and hashing: every file a command writes appears complete or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import PetalError


def read_json(path: str | Path, missing: str, invalid: str) -> Any:
    """The JSON in `path`; a missing file raises PetalError(missing), an undecodable one
    PetalError(invalid) with `{error}` in it replaced by the decoder's message."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PetalError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PetalError(invalid.replace("{error}", str(exc))) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
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
