"""One schema per JSON file a user can point PETAL at, taken from the dataclass that file holds.

    manifest = from_json(Manifest, json.loads(text), "exported/manifest.json")

The dataclass's field annotations are the schema (`str`, `int`, `float`, `bool`, `list[float]`,
`dict[str, str]`, `dict[str, Any]`, `X | None`): a field without a default is required, unknown keys
are ignored (a newer writer may add some), and anything else (`[]`, `null`, a string where a number
belongs, NaN) is one PetalError naming the file and the field, never a TypeError later.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from .errors import PetalError

T = TypeVar("T")


def kind_of(value: Any) -> str:
    """How JSON would call `value` (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_value(value: Any, annotation: str, where: str) -> Any:
    """`value` checked against a field annotation (as a string); returns it (ints widened for floats)."""
    annotation = annotation.replace(" ", "")
    if annotation.endswith("|None"):
        return None if value is None else check_value(value, annotation[:-len("|None")], where)
    wanted = None
    if annotation == "str":
        ok = isinstance(value, str)
        wanted = "a string"
    elif annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "an integer"
    elif annotation == "float":
        ok = _number(value)
        wanted = "a finite number"
        value = float(value) if ok else value
    elif annotation == "bool":
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif annotation == "list[float]":
        ok = isinstance(value, list) and all(_number(v) for v in value)
        wanted = "a list of numbers"
        value = [float(v) for v in value] if ok else value
    elif annotation == "dict[str,str]":
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        wanted = "an object of strings"
    elif annotation.startswith("dict["):
        ok = isinstance(value, dict)
        wanted = "an object"
    elif annotation.startswith("list["):
        ok = isinstance(value, list)
        wanted = "a list"
    else:  # an annotation this module does not know: taken as it is
        ok = True
    if not ok:
        raise PetalError(f"{where} should be {wanted}, found {kind_of(value)}")
    return value


def from_json(cls: type[T], data: Any, source: str) -> T:
    """An instance of the dataclass `cls` from decoded JSON, every field checked (see the module doc)."""
    if not isinstance(data, dict):
        raise PetalError(f"{source} is not valid: expected a JSON object, found {kind_of(data)}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    missing = [name for name, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and name not in data]  # type: ignore[misc]
    if missing:
        raise PetalError(f"{source} is not valid: it lacks {', '.join(missing)}")
    values = {}
    for name, value in data.items():
        if name in known:
            annotation = known[name].type if isinstance(known[name].type, str) else known[name].type.__name__
            values[name] = check_value(value, annotation, f"{source}: {name}")
    return cls(**values)


__all__ = ["check_value", "from_json", "kind_of"]
