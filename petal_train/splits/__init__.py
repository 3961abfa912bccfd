"""The one identity split of LFW: evaluation identities never reach training.

`lfw_eval.txt` (beside this file) lists the evaluation identities, fixed once and committed:
the 10 `lfw10` identities plus 390 identities drawn from the LFW identities with two or more
images, in the order of sha256("petal-lfw-eval-v1:" + name) (see `choose_evaluation_identities`,
which rebuilds the list from a folder). Everything else in LFW (1,270 identities with two or more
images and the 4,069 with one) is the training part.

`lfw_dev.txt` lists the development identities: the next 200 identities with two or more images
in the same order (`choose_development_identities`). They sit inside the training part; a run
that drops them (`--drop-dev-identities`) leaves faces on which release choices (such as the
adapter scale) are made without looking at the evaluation part.

The trainer refuses any training set that holds an evaluation identity, whatever --data is given
(names are compared after folding case, accents, spaces and underscores), unless it is told to drop
them (`--drop-eval-identities`), in which case they are removed before anything else happens.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from petal_runtime.errors import PetalError

EVAL_LIST = Path(__file__).with_name("lfw_eval.txt")
DEV_LIST = Path(__file__).with_name("lfw_dev.txt")
SPLIT_SALT = "petal-lfw-eval-v1:"
LFW10 = ("Ariel_Sharon", "Arnold_Schwarzenegger", "Colin_Powell", "Donald_Rumsfeld", "George_W_Bush",
         "Gerhard_Schroeder", "Hugo_Chavez", "Jacques_Chirac", "Tony_Blair", "Vladimir_Putin")
EVAL_IDENTITIES = 400
DEV_IDENTITIES = 200
DROP_FLAG = "--drop-eval-identities"


def fold_name(name: str) -> str:
    """A name as compared across datasets: no accents, lower case, runs of space/_/- as one `_`."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[\s_\-.]+", "_", plain.strip().lower()).strip("_")


def _read_list(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


@lru_cache(maxsize=1)
def evaluation_identities() -> tuple[str, ...]:
    """The committed evaluation identities (LFW folder names), in list order."""
    return _read_list(EVAL_LIST)


@lru_cache(maxsize=1)
def development_identities() -> tuple[str, ...]:
    """The committed development identities (LFW folder names, disjoint from the evaluation ones)."""
    return _read_list(DEV_LIST)


def _split_key(name: str) -> str:
    return hashlib.sha256((SPLIT_SALT + name).encode()).hexdigest()


def choose_evaluation_identities(image_counts: dict[str, int], count: int = EVAL_IDENTITIES) -> list[str]:
    """How lfw_eval.txt was made: lfw10, then identities with >= 2 images in sha256 order."""
    others = _ranked_others(image_counts)
    return list(LFW10) + others[:count - len(LFW10)]


def _ranked_others(image_counts: dict[str, int]) -> list[str]:
    return sorted((n for n, c in image_counts.items() if c >= 2 and n not in LFW10), key=_split_key)


def choose_development_identities(image_counts: dict[str, int], count: int = DEV_IDENTITIES) -> list[str]:
    """How lfw_dev.txt was made: the next `count` identities after the evaluation ones, same order."""
    skip = EVAL_IDENTITIES - len(LFW10)
    return _ranked_others(image_counts)[skip:skip + count]


def overlap(names: Iterable[str], held: Iterable[str] | None = None) -> list[str]:
    """The names of `names` that are in `held` (default: the evaluation identities), as given, sorted."""
    folded = {fold_name(n) for n in (evaluation_identities() if held is None else held)}
    return sorted(n for n in names if fold_name(n) in folded)


def check_no_evaluation_identities(names: Sequence[str], source: str) -> None:
    """Refuse a training set holding evaluation identities, naming them."""
    found = overlap(names)
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise PetalError(f"{source} holds {len(found)} evaluation identit{'y' if len(found) == 1 else 'ies'} "
                         f"({shown}); they must never train. Pass {DROP_FLAG} to train on the rest")
