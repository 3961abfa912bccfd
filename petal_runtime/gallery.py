"""The gallery of known people: a structured numpy array without pickle, tied to the models that built it.

`g.npy` holds one row per identity: `name` (unicode), `embedding` (float32 [D], L2-normalised mean of
that person's image embeddings) and `count` (images averaged). It is written with
`allow_pickle=False` and read back the same way. `g.npy.json` beside it records the models'
fingerprint (sha256 of the recognizer and IQA graphs) and the sha256 of the `.npy` it belongs to
(`entries_sha256`); a gallery is refused by models with another fingerprint or embedding size, since
its embeddings would not be comparable, and a `.json` beside a `.npy` it was not written with is refused.

The pair changes as one unit: writers hold an exclusive lock (flock on the gallery's folder) across
read-modify-write (`Gallery.locked`), readers a shared one, so concurrent `petal-gallery add` runs
never lose an update and a reader never sees a new `.npy` with an old `.json`.

Search is exact by default. A gallery of hundreds of thousands of people can be given an ANN index
(`petal-gallery index`, petal_runtime/ann.py), which `Gallery.load(path, index="auto")` picks up when it
fits the gallery: the index proposes candidates and they are re-scored exactly, so the results have the
same types and exact scores.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .contract import to_model_input
from .errors import PetalError
from .files import atomic_path, atomic_write_text, first_line, read_json
from .images import IMAGE_SUFFIXES, read_image
from .images import FaceAligner as ImageFaceAligner
from .schema import from_json

NAME_LENGTH = 128
GALLERY_FORMAT = 2  # 2: the .json names the sha256 of its .npy (entries_sha256)
MAX_DIM = 65536
UNKNOWN = "unknown"


def gallery_dtype(dim: int) -> np.dtype:
    return np.dtype([("name", f"<U{NAME_LENGTH}"), ("embedding", "<f4", (int(dim),)), ("count", "<i4")])


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


@dataclass
class GalleryMeta:
    """The schema of g.npy.json (other keys are kept as they are)."""

    models_sha256: str
    entries_sha256: str
    format: int = GALLERY_FORMAT
    embedding_size: int = 0
    identities: int = 0
    recognizer_sha256: str = ""
    iqa_sha256: str = ""
    backbone: str = ""
    built_from: str = ""
    models_dir: str = ""


_LOCKS: dict[str, tuple[threading.RLock, list[int]]] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def gallery_lock(path: str | Path, exclusive: bool = True) -> Iterator[None]:
    """flock on the gallery's folder: exclusive for writers, shared for readers; re-entrant in a process.

    Where the folder cannot be opened or locked (another OS, a file system without locks), the
    content binding (entries_sha256) still refuses a mismatched pair.
    """
    folder = str(Path(path).resolve().parent)
    with _LOCKS_GUARD:
        lock, state = _LOCKS.setdefault(folder, (threading.RLock(), [0, -1]))
    with lock:  # threads of this process take turns; the flock is held once per process
        state[0] += 1
        try:
            if state[0] == 1:
                state[1] = _flock(folder, exclusive)
            yield
        finally:
            state[0] -= 1
            if state[0] == 0 and state[1] >= 0:
                os.close(state[1])  # closing the descriptor releases the flock
                state[1] = -1


def _flock(folder: str, exclusive: bool) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _read_entries(data: bytes, path: Path) -> np.ndarray:
    """The structured array in .npy bytes, checked before anything is allocated (no pickle)."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    not_gallery = f"{path} is not a PETAL gallery (a .npy structured array without pickle)"
    try:
        version = fmt.read_magic(buf)
        reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, _, dtype = reader(buf)
    except Exception as exc:  # numpy's header parser raises many types on hostile bytes (tokenize, ast, ...)
        raise PetalError(f"{not_gallery}: {first_line(exc, 120)}") from None
    if dtype.hasobject:
        raise PetalError(f"{not_gallery}: it holds Python objects, which would need pickle")
    names = dtype.names or ()
    if len(shape) != 1 or not {"name", "embedding", "count"} <= set(names):
        raise PetalError(f"{path} is not a PETAL gallery: expected fields name, embedding, count, "
                         f"found {list(names) or dtype.str}")
    name_t, emb_t, count_t = dtype["name"], dtype["embedding"], dtype["count"]
    emb_shape = emb_t.shape
    if len(emb_shape) != 1:
        raise PetalError(f"{path}: embedding field has shape {emb_shape}, expected one dimension")
    if not 1 <= emb_shape[0] <= MAX_DIM or emb_t.base.kind != "f" or name_t.kind != "U" or count_t.kind not in "iu":
        raise PetalError(f"{path} is not a PETAL gallery: fields name {name_t.str}, embedding {emb_t.str}, "
                         f"count {count_t.str} (expected unicode, 1-{MAX_DIM} floats, an integer)")
    if name_t.itemsize // 4 > NAME_LENGTH:
        raise PetalError(f"{path}: names of up to {name_t.itemsize // 4} characters, at most {NAME_LENGTH} allowed")
    offset = buf.tell()
    if shape[0] * dtype.itemsize != len(data) - offset:
        raise PetalError(f"{path} is truncated or damaged: its header promises {shape[0]} entries "
                         f"({shape[0] * dtype.itemsize} bytes), the file holds {len(data) - offset}")
    entries = np.frombuffer(data, dtype, shape[0], offset).astype(gallery_dtype(emb_shape[0]))
    if not np.isfinite(entries["embedding"]).all():
        raise PetalError(f"{path} is damaged: it holds NaN or infinite embeddings")
    return entries


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest of `scores` [N], best first (ties: lower index first). argpartition
    finds them in O(N); only those k are sorted, not the whole gallery."""
    k = max(1, min(int(k), len(scores)))
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


@dataclass
class Match:
    identity: str  # a gallery name, or "unknown" below the open-set threshold
    score: float  # cosine to the best gallery entry
    top_k: list[tuple[str, float]]  # best first

    def to_dict(self) -> dict:
        return {"identity": self.identity, "score": round(float(self.score), 4),
                "top_k": [{"name": n, "score": round(float(s), 4)} for n, s in self.top_k]}


@dataclass
class Gallery:
    entries: np.ndarray  # structured, gallery_dtype(D)
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    ann: object | None = field(default=None, repr=False, compare=False)  # ann.AnnIndex bound to `entries`
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # --- construction
    @classmethod
    def empty(cls, fingerprint) -> "Gallery":
        """An empty gallery for models with this fingerprint (models.Fingerprint)."""
        meta = {"format": GALLERY_FORMAT, **fingerprint.to_dict()}
        return cls(np.zeros(0, gallery_dtype(fingerprint.embedding_size)), meta)

    @property
    def dim(self) -> int:
        return int(self.entries.dtype["embedding"].shape[0])

    def _cached(self, what: str, build):
        """`build()` once per `entries` array: add() and remove() assign a new one, which drops the cache
        (entries edited in place would not be seen: assign a new array instead)."""
        cache = self._cache
        if cache.get("entries") is not self.entries:
            cache.clear()
            cache["entries"] = self.entries
        if what not in cache:
            cache[what] = build()
        return cache[what]

    @property
    def names(self) -> list[str]:
        """The identities in entry order (cached: read it, do not modify it)."""
        return self._cached("names", lambda: [str(n) for n in self.entries["name"]])

    @property
    def embeddings(self) -> np.ndarray:
        """[N, D] float32, C-contiguous and read-only (cached), so every search runs on one dense matrix
        instead of a strided view into the structured entries."""
        def build() -> np.ndarray:
            matrix = np.ascontiguousarray(self.entries["embedding"], np.float32).reshape(len(self.entries), self.dim)
            matrix.flags.writeable = False
            return matrix

        return self._cached("embeddings", build)

    @property
    def mean_embedding(self) -> np.ndarray:
        """[D] float64, the mean of the rows (cached): a query's mean cosine over the whole gallery is one
        dot product with it, whatever the gallery's size (the open-set rule's cohort term)."""
        return self._cached("mean_embedding", lambda: self.embeddings.astype(np.float64).mean(axis=0)
                            if len(self) else np.zeros(self.dim))

    def cohort_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Each query's mean cosine over every entry [M]."""
        return _normalise(self._queries(embeddings, "queries")).astype(np.float64) @ self.mean_embedding

    def __len__(self) -> int:
        return len(self.entries)

    # --- persistence
    @classmethod
    def load(cls, path: str | Path, fingerprint=None, index: str = "auto") -> "Gallery":
        """Read g.npy (no pickle) and its .json; check them against `fingerprint` where given.

        `index`: "auto" (default) searches with the ANN index beside the gallery (g.ann.usearch, made by
        `petal-gallery index`) where there is one that fits this gallery, else exactly (a stale or
        unreadable index, or usearch missing, is a PetalWarning); "exact" never reads an index; "ann"
        requires one (PetalError naming the command that builds it, or `pip install 'petal[ann]'`).
        """
        from .ann import _check_mode, load_index

        path = Path(path)
        if _check_mode(index) != "exact":
            with gallery_lock(path, exclusive=False):  # the gallery and its index pair are read as one unit
                gallery = cls.load(path, fingerprint, "exact")
                gallery.ann = load_index(gallery, path, index)
            return gallery
        with gallery_lock(path, exclusive=False):
            if not path.is_file():
                raise PetalError(f"gallery {path} not found (petal-gallery build makes one)")
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise PetalError(f"cannot read {path} ({exc.strerror or exc})") from None
            entries = _read_entries(data, path)
            mpath = meta_path(path)
            meta = read_json(mpath, f"{mpath} is missing: without it the models {path.name} was built with are "
                                    "unknown; rebuild the gallery with petal-gallery build",
                             f"{mpath} is not valid JSON; rebuild the gallery with petal-gallery build")
        if isinstance(meta, dict) and "entries_sha256" not in meta and "models_sha256" in meta:
            raise PetalError(f"{mpath} was written by an older petal-gallery (it does not name the .npy it belongs "
                             "to); rebuild the gallery with petal-gallery build")
        from_json(GalleryMeta, meta, str(mpath))
        digest = hashlib.sha256(data).hexdigest()
        if meta["entries_sha256"] != digest:
            raise PetalError(f"{mpath} does not belong to {path.name} (it was written with a .npy of sha256 "
                             f"{meta['entries_sha256'][:12]}..., this one is {digest[:12]}...); rebuild the gallery "
                             "or put back the pair that was written together")
        gallery = cls(entries, meta, path)
        if fingerprint is not None:
            gallery.check(fingerprint)
        return gallery

    @property
    def index(self):
        """The ANN index searches use (ann.AnnIndex), or None for exact search. An index only serves the
        entries it was built for: after add() or remove() the gallery searches exactly."""
        ann = self.ann
        return ann if ann is not None and getattr(ann, "entries", None) is self.entries else None

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: str | Path, fingerprint=None) -> Iterator["Gallery"]:
        """Read-modify-write under an exclusive lock: the gallery at `path`, saved back if the block succeeds.

            with Gallery.locked("g.npy", models.fingerprint) as gallery:
                gallery.add("Jane", embeddings)
        """
        with gallery_lock(path, exclusive=True):
            gallery = cls.load(path, fingerprint, index="exact")  # an edit makes any index stale anyway
            yield gallery
            gallery.save(path)

    def check(self, fingerprint) -> None:
        """Refuse a gallery whose embeddings these models cannot be compared with."""
        where = str(self.path) if self.path else "the gallery"
        if self.dim != fingerprint.embedding_size:
            raise PetalError(f"{where} holds {self.dim}-d embeddings but the models produce "
                             f"{fingerprint.embedding_size}-d ones; build the gallery with these models")
        theirs = self.meta.get("models_sha256")
        if theirs != fingerprint.models_sha256:
            raise PetalError(f"{where} was built with other models (sha256 {str(theirs)[:12]}..., these are "
                             f"{fingerprint.models_sha256[:12]}...); rebuild it with petal-gallery build --models")

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.path or "")
        if not path.name:
            raise PetalError("no path to save the gallery to")
        if path.suffix != ".npy":
            raise PetalError(f"gallery files end in .npy (numpy would append it): {path}")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(self.entries), allow_pickle=False)
        data = buffer.getvalue()
        meta = {**self.meta, "format": GALLERY_FORMAT, "identities": len(self), "embedding_size": self.dim,
                "entries_sha256": hashlib.sha256(data).hexdigest()}
        try:
            with gallery_lock(path, exclusive=True):  # readers see the old pair or the new one
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
                atomic_write_text(meta_path(path), json.dumps(meta, indent=2, sort_keys=True))
        except OSError as exc:
            raise PetalError(f"cannot write the gallery {path} ({exc.strerror or exc})") from None
        self.meta = meta
        self.path = path
        return path

    # --- editing
    def add(self, name: str, embeddings: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add a person from per-image embeddings [n, D]; an existing name is merged (count-weighted)."""
        name = str(name).strip()
        if not name:
            raise PetalError("an identity needs a non-empty name")
        if len(name) > NAME_LENGTH:
            raise PetalError(f"identity name longer than {NAME_LENGTH} characters: {name[:40]}...")
        if name == UNKNOWN:
            raise PetalError(f"{UNKNOWN!r} is reserved for faces that match nobody")
        embeddings = self._queries(embeddings, f"embeddings for {name}")
        if len(embeddings) == 0:
            raise PetalError(f"no usable face for {name}")
        w = np.ones(len(embeddings), np.float32) if weights is None else np.asarray(weights, np.float32)
        if w.shape != (len(embeddings),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise PetalError(f"weights for {name} must be {len(embeddings)} finite non-negative numbers, "
                             f"not all zero (got shape {w.shape})")
        total = (_normalise(embeddings) * w[:, None]).sum(0)
        count = len(embeddings)
        existing = np.flatnonzero(self.entries["name"] == name)
        if len(existing):
            row = self.entries[existing[0]]
            total = total / max(float(w.sum()), 1e-12) * count + row["embedding"] * row["count"]
            count += int(row["count"])
            self.entries = np.delete(self.entries, existing)
        new = np.zeros(1, self.entries.dtype)
        new["name"], new["embedding"], new["count"] = name, _normalise(total), count
        self.entries = np.concatenate([self.entries, new])
        order = np.argsort(self.entries["name"], kind="stable")
        self.entries = self.entries[order]

    def remove(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        missing = [n for n in names if n not in set(self.names)]
        if missing:
            raise PetalError(f"not in the gallery: {', '.join(missing)}")
        self.entries = self.entries[~np.isin(self.entries["name"], names)]
        return names

    # --- matching
    def _queries(self, embeddings, what: str) -> np.ndarray:
        """Embeddings [n, D] (or one [D]) as float32 [n, D]; any other shape, a non-finite value or a
        zero vector is a PetalError that says what was expected."""
        try:
            x = np.asarray(embeddings, np.float32)
        except (TypeError, ValueError) as exc:
            raise PetalError(f"{what}: expected numbers [n, {self.dim}], got {type(embeddings).__name__} "
                             f"({first_line(exc, 80)})") from None
        if x.ndim == 1 and x.shape[0] == self.dim:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise PetalError(f"{what}: expected shape [n, {self.dim}] or [{self.dim}] for this {self.dim}-d gallery, "
                             f"got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise PetalError(f"{what}: embeddings hold NaN or infinite values")
        if len(x) and np.linalg.norm(x, axis=1).min() < 1e-6:
            raise PetalError(f"{what}: a zero embedding has no direction to compare")
        return x

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine of each query [M, D] to each entry -> [M, len(gallery)]."""
        return _normalise(self._queries(embeddings, "queries")) @ self.embeddings.T

    def rank(self, embeddings: np.ndarray, weights: np.ndarray | None = None,
             top_k: int = 5) -> list[tuple[str, float]]:
        """The `top_k` identities by `weights @ cosines` of the queries [n, D] (weights: one per query,
        default 1/n each), best first, as (name, score). Exact over the whole gallery, or with the ANN
        index over its candidates for the weighted query, re-scored exactly (the same scores)."""
        if len(self) == 0:
            return []
        queries = _normalise(self._queries(embeddings, "queries"))
        if len(queries) == 0:
            return []
        if weights is None:
            weights = np.full(len(queries), 1.0 / len(queries))
        weights = np.asarray(weights, np.float64).reshape(-1)
        if weights.shape != (len(queries),) or not np.isfinite(weights).all():
            raise PetalError(f"rank(): expected {len(queries)} finite weights, got shape {list(weights.shape)}")
        names, ann = self.names, self.index
        rows = None
        if ann is not None:
            query = (weights @ queries.astype(np.float64)).astype(np.float32)
            if np.linalg.norm(query) > 1e-6:
                rows = ann.candidates(query, max(int(top_k), ann.candidate_count))
        if rows is None or len(rows) == 0:
            scores = queries @ self.embeddings.T
            mean = scores[0] if len(queries) == 1 and weights[0] == 1.0 else weights @ scores.astype(np.float64)
            return [(names[i], float(mean[i])) for i in top_k_indices(mean, top_k)]
        scores = queries @ self.embeddings[rows].T  # the true cosines of the candidates (rows ascending)
        mean = scores[0] if len(queries) == 1 and weights[0] == 1.0 else weights @ scores.astype(np.float64)
        return [(names[rows[i]], float(mean[i])) for i in top_k_indices(mean, top_k)]

    def identify(self, embedding: np.ndarray, threshold: float, top_k: int = 5) -> Match:
        if len(self) == 0:
            return Match(UNKNOWN, float("nan"), [])
        query = self._queries(embedding, "identify()")
        if len(query) != 1:
            raise PetalError(f"identify() takes one embedding [{self.dim}], got {len(query)}; use scores() for many")
        ranked = self.rank(query, top_k=top_k)
        best_name, best = ranked[0]
        return Match(best_name if best >= threshold else UNKNOWN, best, ranked)


# ----------------------------------------------------------------------------- building from images


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise PetalError(f"{p} not found")
    return found


def identity_folders(root: str | Path) -> dict[str, list[Path]]:
    """root/<identity>/<images>; images directly under root are an error (they name nobody)."""
    root = Path(root)
    if not root.is_dir():
        raise PetalError(f"{root} is not a folder (expected {root}/<identity>/<images>)")
    folders = {d.name: image_files([d]) for d in sorted(root.iterdir()) if d.is_dir()}
    folders = {k: v for k, v in folders.items() if v}
    if not folders:
        raise PetalError(f"{root} holds no identity folders with images (expected {root}/<identity>/<images>)")
    return folders


@dataclass
class EmbedReport:
    used: int = 0
    unreadable: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)


def embed_images(models, paths: Sequence[Path], aligner: ImageFaceAligner | None = None,
                 report: EmbedReport | None = None) -> np.ndarray:
    """Embeddings [n, D] of the faces in `paths` (IQA -> alpha -> recognizer, as for video crops)."""
    aligner = aligner or ImageFaceAligner()
    report = report if report is not None else EmbedReport()
    faces = []
    for path in paths:
        image = read_image(path)
        if image is None:
            report.unreadable.append(str(path))
            continue
        face = aligner(image)
        if face is None:
            report.no_face.append(str(path))
            continue
        faces.append(face)
    if not faces:
        return np.zeros((0, models.embedding_size), np.float32)
    report.used += len(faces)
    return models.embed_gated(to_model_input(np.stack(faces)))


def build_gallery(models, root: str | Path, progress=None) -> tuple[Gallery, EmbedReport]:
    """A gallery with one entry per identity folder under `root`."""
    gallery = Gallery.empty(models.fingerprint)
    gallery.meta["built_from"] = str(root)
    report = EmbedReport()
    aligner = ImageFaceAligner()
    folders = identity_folders(root)
    for name, paths in folders.items():
        embeddings = embed_images(models, paths, aligner, report)
        if len(embeddings):
            gallery.add(name, embeddings)
        if progress:
            progress(name, len(embeddings))
    if len(gallery) == 0:
        raise PetalError(f"no face found in any image under {root} ({len(report.no_face)} without a face, "
                         f"{len(report.unreadable)} unreadable)")
    return gallery, report
