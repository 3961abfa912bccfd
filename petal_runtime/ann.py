"""An optional approximate-nearest-neighbour (ANN) index for galleries of hundreds of thousands of people.

Exact search is the default and stays right for most galleries: one matrix-vector product over the
cached [N, D] matrix and an O(N) `argpartition` (about 0.2 ms at 10k identities, 7 ms at 100k). From
about `ANN_MIN_IDENTITIES` (200,000) identities up, exact search costs tens to hundreds of
milliseconds per query, and an HNSW graph (usearch, the `ann` extra: `pip install 'petal[ann]'`) finds
the candidates instead:

    petal-gallery index gallery.npy        # writes gallery.ann.usearch and gallery.ann.json beside it

The index only proposes candidates: every candidate is re-scored with the true cosine against the
gallery's own float32 matrix, so the scores, and the ranking among the candidates, are exact; only
an identity the graph never proposes can be missed (recall, measured by benchmarks/gallery_search.py).

`GALLERY.ann.json` names the sha256 of the gallery's .npy it was built from (the gallery's
`entries_sha256`), the metric, the usearch parameters and the sha256 of `GALLERY.ann.usearch`. An
index built for another version of the gallery (a person added or removed since) is stale:
`Gallery.load(path, index="ann")` refuses it with the command that rebuilds it; `index="auto"`
(the default) says so in a warning and searches exactly. The runtime works without usearch: only
asking for an index needs it.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import PetalError
from .files import atomic_path, atomic_write_text, first_line, read_json, sha256_file
from .schema import from_json

ANN_FORMAT = 1
ANN_MIN_IDENTITIES = 200_000  # below this exact search is fast enough (benchmarks/gallery_search.py)
INDEX_SUFFIX = ".ann.usearch"
META_SUFFIX = ".ann.json"
METRIC = "ip"  # gallery rows are unit vectors: inner product = cosine, the exact search's own score
DTYPES = ("f32", "f16", "i8")
INDEX_MODES = ("auto", "exact", "ann")
# Defaults tuned on 128-d random unit vectors (the hard case: no structure for the graph to use) with
# queries at cosine 0.5-0.7 to their gallery row; see the README's ANN section for the measurements.
DEFAULT_CONNECTIVITY = 32
DEFAULT_EXPANSION_ADD = 64
DEFAULT_EXPANSION_SEARCH = 1024  # recall first: 0.965 at 1M random rows, still 3x faster than exact there
DEFAULT_CANDIDATES = 32  # candidates re-scored exactly per search (at least top_k)
DEFAULT_DTYPE = "f16"  # the graph's own copy of the vectors; candidates are re-scored in float32 anyway
_ADD_CHUNK = 20_000  # rows per add() call: progress, and Ctrl-C is seen between chunks


def index_path(gallery_path: str | Path) -> Path:
    """gallery.npy -> gallery.ann.usearch (beside it)."""
    gallery_path = Path(gallery_path)
    return gallery_path.with_name(gallery_path.stem + INDEX_SUFFIX)


def index_meta_path(gallery_path: str | Path) -> Path:
    """gallery.npy -> gallery.ann.json (beside it)."""
    gallery_path = Path(gallery_path)
    return gallery_path.with_name(gallery_path.stem + META_SUFFIX)


def index_command(gallery_path: str | Path | None) -> str:
    return f"petal-gallery index {gallery_path or 'GALLERY.npy'}"


def usearch_index_class():
    """usearch's Index class, or a one-line PetalError that says how to install it."""
    try:
        from usearch.index import Index
    except ImportError:
        raise PetalError("the ANN gallery index needs usearch, which is not installed: "
                         "pip install 'petal[ann]' (or load the gallery with index='exact')") from None
    return Index


def _usearch_version() -> str:
    try:
        import usearch

        return str(getattr(usearch, "__version__", "?"))
    except ImportError:  # pragma: no cover - only called once usearch imported
        return "?"


@dataclass
class AnnMeta:
    """The schema of GALLERY.ann.json."""

    entries_sha256: str  # the gallery .npy this index was built from
    index_sha256: str
    identities: int
    embedding_size: int
    format: int = ANN_FORMAT
    gallery: str = ""  # the gallery's file name when built (for messages)
    index_file: str = ""
    index_bytes: int = 0
    metric: str = METRIC
    dtype: str = DEFAULT_DTYPE
    connectivity: int = DEFAULT_CONNECTIVITY
    expansion_add: int = DEFAULT_EXPANSION_ADD
    expansion_search: int = DEFAULT_EXPANSION_SEARCH
    candidates: int = DEFAULT_CANDIDATES
    usearch: str = ""
    build_seconds: float = 0.0


class AnnIndex:
    """A usearch HNSW graph over one gallery's rows (keys = row numbers), bound to that gallery's entries.

    `candidates(query, count)` -> row numbers the graph finds nearest to `query`; the gallery re-scores
    them exactly. Safe to call from several threads (searches take turns on one lock).
    """

    def __init__(self, index, meta: AnnMeta, entries: np.ndarray | None = None, path: Path | None = None) -> None:
        self.index = index
        self.meta = meta
        self.entries = entries  # the Gallery.entries array it was checked against; any other is not searched
        self.path = path
        self.candidate_count = max(1, int(meta.candidates))
        self._lock = threading.Lock()
        self.expansion_search = int(meta.expansion_search)

    @property
    def expansion_search(self) -> int:
        return int(self.index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        if int(value) < 1:
            raise PetalError(f"expansion_search must be at least 1, got {value}")
        self.index.expansion_search = int(value)

    def __len__(self) -> int:
        return len(self.index)

    def candidates(self, query: np.ndarray, count: int | None = None) -> np.ndarray:
        """Row numbers (int64, ascending) of up to `count` (default: the index's candidates) nearest rows."""
        count = max(1, int(count or self.candidate_count))
        vector = np.ascontiguousarray(query, np.float32).reshape(-1)
        with self._lock:
            found = self.index.search(vector, count, threads=1)
        keys = np.asarray(found.keys, np.int64).reshape(-1)
        keys = keys[(keys >= 0) & (keys < len(self.index))]
        return np.unique(keys)


def _check_mode(index: str) -> str:
    if index not in INDEX_MODES:
        raise PetalError(f"index must be one of {', '.join(INDEX_MODES)}, not {index!r}")
    return index


def build_index(gallery, gallery_path: str | Path | None = None, connectivity: int = DEFAULT_CONNECTIVITY,
                expansion_add: int = DEFAULT_EXPANSION_ADD, expansion_search: int = DEFAULT_EXPANSION_SEARCH,
                dtype: str = DEFAULT_DTYPE, candidates: int = DEFAULT_CANDIDATES, threads: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> AnnIndex:
    """Build the HNSW index of a saved gallery and write GALLERY.ann.usearch and GALLERY.ann.json beside it.

    The pair is written atomically (temporary names renamed into place) under the gallery's exclusive
    lock, so a reader sees the old pair or the new one. Returns the index, bound to `gallery.entries`.
    """
    from .gallery import gallery_lock

    Index = usearch_index_class()
    gallery_path = Path(gallery_path or gallery.path or "")
    digest = gallery.meta.get("entries_sha256")
    if not gallery_path.name or not isinstance(digest, str):
        raise PetalError("an ANN index is built for a saved gallery (a .npy with its .json): save it first")
    for name, value, low in (("connectivity", connectivity, 2), ("expansion_add", expansion_add, 1),
                             ("expansion_search", expansion_search, 1), ("candidates", candidates, 1)):
        if int(value) < low:
            raise PetalError(f"{name} must be at least {low}, got {value}")
    if dtype not in DTYPES:
        raise PetalError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if len(gallery) == 0:
        raise PetalError(f"{gallery_path} holds no identities: nothing to index")
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, int(threads))
    matrix = gallery.embeddings
    index = Index(ndim=gallery.dim, metric=METRIC, dtype=dtype, connectivity=int(connectivity),
                  expansion_add=int(expansion_add), expansion_search=int(expansion_search))
    start = time.perf_counter()
    n = len(matrix)
    for lo in range(0, n, _ADD_CHUNK):
        hi = min(n, lo + _ADD_CHUNK)
        index.add(np.arange(lo, hi, dtype=np.uint64), matrix[lo:hi], threads=threads)
        if progress:
            progress(hi, n)
    seconds = time.perf_counter() - start
    target, meta_file = index_path(gallery_path), index_meta_path(gallery_path)
    try:
        with gallery_lock(gallery_path, exclusive=True):
            with atomic_path(target) as tmp:
                index.save(str(tmp))
                index_sha = sha256_file(tmp)
                index_bytes = tmp.stat().st_size
            meta = AnnMeta(entries_sha256=digest, index_sha256=index_sha, identities=n, embedding_size=gallery.dim,
                           gallery=gallery_path.name, index_file=target.name, index_bytes=index_bytes,
                           dtype=dtype, connectivity=int(connectivity), expansion_add=int(expansion_add),
                           expansion_search=int(expansion_search), candidates=int(candidates),
                           usearch=_usearch_version(), build_seconds=round(seconds, 2))
            atomic_write_text(meta_file, json.dumps(asdict(meta), indent=2, sort_keys=True))
    except OSError as exc:
        raise PetalError(f"cannot write the ANN index {target} ({exc.strerror or exc})") from None
    return AnnIndex(index, meta, gallery.entries, target)


def _read_index(gallery, gallery_path: Path) -> AnnIndex:
    """The index beside `gallery_path`, checked against the loaded gallery; PetalError when it cannot be used."""
    from .models import _file_sha256  # the digest cache shared with the model files: a restart does not rehash

    Index = usearch_index_class()
    meta_file, target = index_meta_path(gallery_path), index_path(gallery_path)
    rebuild = f"rebuild it with: {index_command(gallery_path)}"
    data = read_json(meta_file, f"no ANN index beside {gallery_path} ({meta_file.name} is missing); "
                                f"build one with: {index_command(gallery_path)}",
                     f"{meta_file} is not valid JSON ({{error}}); {rebuild}")
    meta = from_json(AnnMeta, data, str(meta_file))
    if meta.format != ANN_FORMAT or meta.metric != METRIC or meta.dtype not in DTYPES:
        raise PetalError(f"{meta_file} is an index of another kind (format {meta.format}, metric {meta.metric}, "
                         f"dtype {meta.dtype}); {rebuild}")
    if meta.entries_sha256 != gallery.meta.get("entries_sha256"):
        raise PetalError(f"{target.name} is stale: it was built for another version of {gallery_path.name} "
                         f"(sha256 {meta.entries_sha256[:12]}..., the gallery is now "
                         f"{str(gallery.meta.get('entries_sha256'))[:12]}...); {rebuild}")
    if meta.identities != len(gallery) or meta.embedding_size != gallery.dim:
        raise PetalError(f"{meta_file} describes {meta.identities} {meta.embedding_size}-d rows but the gallery "
                         f"holds {len(gallery)} {gallery.dim}-d ones; {rebuild}")
    if not target.is_file():
        raise PetalError(f"{target} is missing (its {meta_file.name} is there); {rebuild}")
    if _file_sha256(target) != meta.index_sha256:
        raise PetalError(f"{target} is damaged or was replaced (its sha256 is not the one {meta_file.name} "
                         f"names); {rebuild}")
    try:
        index = Index.restore(str(target), view=True)  # memory-mapped: loads at once, pages in as searched
    except Exception as exc:  # usearch raises RuntimeError/ValueError on a file it cannot read
        raise PetalError(f"{target} cannot be read by usearch ({first_line(exc, 100)}); {rebuild}") from None
    if index is None or len(index) != len(gallery) or int(index.ndim) != gallery.dim:
        raise PetalError(f"{target} does not hold {len(gallery)} {gallery.dim}-d rows; {rebuild}")
    return AnnIndex(index, meta, gallery.entries, target)


def load_index(gallery, gallery_path: str | Path, index: str = "auto") -> AnnIndex | None:
    """The index to search `gallery` with, as `index` asks:

    - "exact": None (the index is not read even where one exists);
    - "ann": the index beside the gallery, or a PetalError that says why not and what rebuilds it;
    - "auto": the index where one is beside the gallery and fits it; a stale or unreadable one, or
      usearch missing, is a PetalWarning and None (exact search); no index at all is None, silently.
    """
    gallery_path = Path(gallery_path)
    if _check_mode(index) == "exact":
        return None
    if index == "auto" and not index_meta_path(gallery_path).is_file():
        return None
    try:
        return _read_index(gallery, gallery_path)
    except PetalError as exc:
        if index == "ann":
            raise
        from .openset import PetalWarning

        warnings.warn(f"{exc}; searching {gallery_path.name} exactly meanwhile", PetalWarning, stacklevel=3)
        return None


__all__ = ["ANN_MIN_IDENTITIES", "AnnIndex", "AnnMeta", "INDEX_MODES", "build_index", "index_command",
           "index_meta_path", "index_path", "load_index", "usearch_index_class"]
