"""TensorRT optimisation profiles: the batch range MIN:OPT:MAX and the input shapes it gives each graph.
One definition for the exporter's engines and the runtime's ONNX Runtime TensorRT provider."""
from __future__ import annotations

from .contract import ALPHA_INPUT, IMAGE_INPUT
from .errors import PetalError

DEFAULT_BATCH = (1, 8, 32)


def _not_three(what: str, got) -> PetalError:
    return PetalError(f"{what} wants MIN:OPT:MAX (three integers, e.g. 1:8:32), got {got!r}")


def check_batch(batch, what: str = "batch") -> tuple[int, int, int]:
    """`batch` as (MIN, OPT, MAX) with 1 <= MIN <= OPT <= MAX; PetalError naming `what` otherwise."""
    values = tuple(batch) if isinstance(batch, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(b, int) and not isinstance(b, bool) for b in values):
        raise _not_three(what, batch)
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise PetalError(f"{what} {lo}:{opt}:{hi}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parse_batch(text: str, what: str = "--batch") -> tuple[int, int, int]:
    """"MIN:OPT:MAX" -> (MIN, OPT, MAX), checked as check_batch does."""
    try:
        values = tuple(int(p) for p in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise _not_three(what, text)
    return check_batch(values, what)


def format_batch(batch) -> str:
    return ":".join(str(b) for b in batch)


def profile_shapes(graph: str, face_size: int, batch=DEFAULT_BATCH) -> dict[str, tuple]:
    """{input: (min, opt, max)}: the recognizer at the face size, the IQA from half to twice it."""
    lo, opt, hi = check_batch(batch or DEFAULT_BATCH)
    if graph == "recognizer":
        image = lambda n, s=face_size: (n, 3, s, s)  # noqa: E731
        return {IMAGE_INPUT: (image(lo), image(opt), image(hi)), ALPHA_INPUT: ((lo, 1), (opt, 1), (hi, 1))}
    small = min(face_size, max(16, face_size // 2))
    return {IMAGE_INPUT: ((lo, 3, small, small), (opt, 3, face_size, face_size),
                          (hi, 3, 2 * face_size, 2 * face_size))}
