"""Reading torch files that come from outside: safely (weights_only) and as one-line errors."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from petal_runtime.errors import PetalError
from petal_runtime.files import first_line

# What torch's unpickler raises on a damaged or foreign file (a text file gives IndexError, a pickle cut
# inside a number struct.error).
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError,
               IndexError, KeyError, TypeError, struct.error)


def load_torch_file(path: str | Path, kind: str, readable_as: str) -> Any:
    """torch.load(weights_only=True) of `path`; a missing or damaged file is a PetalError.

    `kind` names the file in the missing-file message ("checkpoint"), `readable_as` in the damaged one
    ("PETAL checkpoint"): "{kind} {path} does not exist", "{path} is not a readable {readable_as} (why)".
    """
    path = Path(path)
    if not path.is_file():
        raise PetalError(f"{kind} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        raise PetalError(f"{path} is not a readable {readable_as} ({first_line(exc, 120)})") from None
