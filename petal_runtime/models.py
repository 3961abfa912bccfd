"""An exported models folder (recognizer + IQA + manifest) behind the chosen backend.

    models = Models.from_dir("exported/", backend="auto")
    q = models.quality(faces)                  # faces: float32 [N, 3, 112, 112] RGB 0..255
    e = models.embed(faces, models.alpha(q))   # [N, D], L2-normalised

The folder is what petal-export writes: `recognizer.onnx`, `iqa.onnx`, `manifest.json` and, on GPU
machines, TensorRT engines. Every model file is checked against the sha256 manifest.json lists for it
before it is loaded; `fingerprint` (the digests actually read) identifies the models a gallery was built with.

With a server backend (`Models(None, backend="triton", url=URL)`) nothing is read from disk: the manifest and
the graphs' digests are the ones the server's model configs declare (petal-export --triton writes them), and
the fingerprint is made from them the same way.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import AUTO, choose_backend, remote_backend
from .backends.base import BackendSpec, Runner
from .contract import IQA_FILE, MANIFEST_FILE, RECOGNIZER_FILE, Manifest
from .errors import PetalError
from .files import atomic_write_text, sha256_file

DEFAULT_MAX_BATCH = 32
PRECISIONS = ("fp32", "fp16", "int8")  # the exported variants a runtime can be asked for


@dataclass(frozen=True)
class Fingerprint:
    """sha256 of the recognizer and IQA graphs, and one combined digest galleries are tied to."""

    recognizer_sha256: str
    iqa_sha256: str
    models_sha256: str
    embedding_size: int
    backbone: str

    def to_dict(self) -> dict:
        return {"models_sha256": self.models_sha256, "recognizer_sha256": self.recognizer_sha256,
                "iqa_sha256": self.iqa_sha256, "embedding_size": self.embedding_size, "backbone": self.backbone}


_SHA_CACHE: dict[tuple, str] = {}
_DIGEST_FILE = "digests.json"
_DIGEST_ENTRIES = 256


def _digest_store() -> Path:
    """$PETAL_HOME/digests.json (or ~/.cache/petal/digests.json): digests of model files already read."""
    from .model_store import cache_dir

    return cache_dir().parent / _DIGEST_FILE


def _stat_key(path: Path) -> tuple:
    # ctime and the inode change with every write or replacement (and cannot be set back by touch).
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def _load_digest_store() -> dict:
    try:
        data = json.loads(_digest_store().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_sha256(path: Path) -> str:
    """sha256 of a model file, cached by path, size, mtime, ctime and inode in memory and on disk,
    so a restarted runtime does not rehash unchanged models."""
    try:
        key = _stat_key(path)
    except OSError as exc:
        raise PetalError(f"cannot read {path} ({exc.strerror or exc})") from None
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    store = _load_digest_store()
    entry = store.get(key[0])
    if isinstance(entry, dict) and entry.get("key") == list(key[1:]) and isinstance(entry.get("sha256"), str):
        _SHA_CACHE[key] = entry["sha256"]
        return entry["sha256"]
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise PetalError(f"cannot read {path} ({exc.strerror or exc})") from None
    _SHA_CACHE[key] = digest
    store[key[0]] = {"key": list(key[1:]), "sha256": digest}
    while len(store) > _DIGEST_ENTRIES:
        store.pop(next(iter(store)))
    try:  # a cache: a read-only home only costs a rehash next time
        atomic_write_text(_digest_store(), json.dumps(store))
    except OSError:
        pass
    return digest


def verify_file(models_dir: str | Path, name: str, manifest: Manifest) -> str:
    """sha256 of `models_dir/name` as read now, checked against the digest manifest.json lists for it.

    A file the manifest does not list (a manifest written before file digests, or a file added by
    hand) cannot be checked, so it is refused: nothing unverified is loaded.
    """
    path = Path(models_dir) / name
    if not path.is_file():
        raise PetalError(f"{path} not found: {models_dir} is not a complete petal-export folder")
    expected = manifest.files.get(name)
    if expected is None:
        raise PetalError(f"{path} is not listed in {MANIFEST_FILE}, so it cannot be verified and is not loaded; "
                         "re-run petal-export to write it with its digest")
    digest = _file_sha256(path)
    if digest != expected:
        raise PetalError(f"{path} is damaged or was replaced: its sha256 {digest[:12]}... is not the "
                         f"{str(expected)[:12]}... {MANIFEST_FILE} lists; re-run petal-export")
    return digest


def fingerprint(models_dir: str | Path, manifest: Manifest | None = None) -> Fingerprint:
    """Digest of the FP32 graphs as read from disk, each verified against the manifest.

    The IQA graph is part of it because alpha, and so every embedding, depends on its output.
    """
    models_dir = Path(models_dir)
    manifest = manifest or Manifest.load(models_dir)
    digests = [verify_file(models_dir, name, manifest) for name in (RECOGNIZER_FILE, IQA_FILE)]
    return fingerprint_from_digests(digests[0], digests[1], manifest)


def fingerprint_from_digests(recognizer_sha256: str, iqa_sha256: str, manifest: Manifest) -> Fingerprint:
    """The fingerprint of graphs with these digests under this manifest (a folder's, or a server's)."""
    combined = hashlib.sha256(
        f"recognizer:{recognizer_sha256}\niqa:{iqa_sha256}\nthreshold:{manifest.iqa_threshold!r}\n"
        f"clip:{manifest.alpha_clip}\n".encode()).hexdigest()
    return Fingerprint(recognizer_sha256, iqa_sha256, combined, int(manifest.embedding_size), manifest.backbone)


class Models:
    """The recognizer and IQA of one export, from a petal-export folder or, with a remote backend
    (`url`: the triton backend), from the server that serves them."""

    def __init__(self, models_dir: str | Path | None, backend: str = AUTO, threads: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, providers: list[str] | None = None,
                 precision: str | None = None, url: str | None = None) -> None:
        if precision not in (None, *PRECISIONS):
            raise PetalError(f"precision must be fp32, fp16 or int8, got {precision!r}")
        self.precision = precision
        options = {"threads": threads, "providers": providers, "precision": precision}
        server = remote_backend(backend, url)
        if server is None:
            self._open_folder(models_dir, backend, options)
        else:
            self._open_server(server, str(url), options)
        self.max_batch = max(1, int(max_batch))
        self.embedding_size = int(self.manifest.embedding_size)
        self.recognizer_calls = 0
        self.recognizer_faces = 0
        self._lock = threading.Lock()
        try:
            self.recognizer.activate()
            self.iqa.activate()
            self._check_contract()
        except BaseException:
            self.close()
            raise

    def _open_folder(self, models_dir: str | Path | None, backend: str, options: dict) -> None:
        if models_dir is None:
            raise PetalError("no models folder given (petal-export writes one; pass --models)")
        self.dir: Path | None = Path(models_dir)
        self.source = str(self.dir)
        if not self.dir.is_dir():
            raise PetalError(f"models folder {self.dir} does not exist (petal-export writes one)")
        if not (self.dir / MANIFEST_FILE).is_file():
            raise PetalError(f"no {MANIFEST_FILE} in {self.dir}: point --models at a petal-export output folder")
        self.manifest = Manifest.load(self.dir)
        for name in (RECOGNIZER_FILE, IQA_FILE):
            if not (self.dir / name).is_file():
                raise PetalError(f"{name} missing from {self.dir}: re-run petal-export")
        self.fingerprint = fingerprint(self.dir, self.manifest)
        self.backend, self.backend_notes = choose_backend(backend, self.dir)
        self.recognizer: Runner = self.backend.create(self.dir, "recognizer", **options)
        self.iqa: Runner = self.backend.create(self.dir, "iqa", **options)
        for runner in (self.recognizer, self.iqa):  # the variant or engine each runner loads
            path = getattr(getattr(runner, "loader", None), "path", None)
            if path is not None and Path(path).parent.resolve() == self.dir.resolve():
                verify_file(self.dir, Path(path).name, self.manifest)

    def _open_server(self, spec: BackendSpec, url: str, options: dict) -> None:
        """The manifest and digests come from what the server says it serves (petal-export --triton wrote
        them into each model's config), checked as a folder's manifest is; nothing is read from disk."""
        self.dir = None
        self.source = url
        served = spec.served(url, precision=options["precision"])
        self.manifest = served.manifest
        self.fingerprint = fingerprint_from_digests(served.recognizer_sha256, served.iqa_sha256, self.manifest)
        if served.models_sha256 != self.fingerprint.models_sha256:
            raise PetalError(f"{url} declares models sha256 {served.models_sha256[:12]}..., but its manifest and "
                             f"graph digests make {self.fingerprint.models_sha256[:12]}...: its repository was "
                             "edited by hand; write it again with petal-export --triton")
        self.backend, self.backend_notes = spec, []
        self.recognizer = spec.create(None, "recognizer", url=url, **options)
        self.iqa = spec.create(None, "iqa", url=url, **options)

    @classmethod
    def from_dir(cls, models_dir: str | Path | None, **kwargs) -> "Models":
        return cls(models_dir, **kwargs)

    def _check_contract(self) -> None:
        m = self.manifest
        for runner, inputs, outputs in ((self.recognizer, {m.image_input, m.alpha_input}, {m.embedding_output}),
                                        (self.iqa, {m.image_input}, {m.quality_output})):
            have_in = {t.name for t in runner.inputs()}
            have_out = {t.name for t in runner.outputs()}
            if have_in != inputs or not outputs <= have_out:
                raise PetalError(f"{runner.name} has inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                                 f"the contract wants {sorted(inputs)} -> {sorted(outputs)}")
            meta = runner.metadata()
            if any(k.startswith("petal.contract_version") for k in meta):
                graph = Manifest.from_metadata(meta)  # raises on another contract version
                if graph.embedding_size != m.embedding_size:
                    raise PetalError(f"{runner.name} says embedding size {graph.embedding_size}, "
                                     f"manifest says {m.embedding_size}")
        out = next(t for t in self.recognizer.outputs() if t.name == m.embedding_output)
        if out.shape and out.shape[-1] is not None and out.shape[-1] != m.embedding_size:
            raise PetalError(f"{self.recognizer.name} outputs {out.shape[-1]}-d embeddings, "
                             f"manifest says {m.embedding_size}")

    def description(self) -> str:
        return self.recognizer.description()

    def alpha(self, quality: np.ndarray) -> np.ndarray:
        return np.asarray(self.manifest.alpha(np.asarray(quality, np.float32)), np.float32)

    def quality(self, faces: np.ndarray) -> np.ndarray:
        """IQA on float32 [N, 3, H, W] RGB 0..255 faces -> quality [N]."""
        if len(faces) == 0:
            return np.zeros(0, np.float32)
        parts = []
        for start in range(0, len(faces), self.max_batch):
            out = self.iqa.infer({self.manifest.image_input: faces[start:start + self.max_batch]})
            parts.append(np.asarray(out[self.manifest.quality_output], np.float32).reshape(-1))
        return np.concatenate(parts)

    def embed(self, faces: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """Recognizer on faces with per-sample alpha [N] or [N, 1] -> L2-normalised [N, D]."""
        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        alpha = np.asarray(alpha, np.float32).reshape(-1, 1)
        parts = []
        for start in range(0, len(faces), self.max_batch):
            end = start + self.max_batch
            out = self.recognizer.infer({self.manifest.image_input: faces[start:end],
                                         self.manifest.alpha_input: alpha[start:end]})
            parts.append(np.asarray(out[self.manifest.embedding_output], np.float32))
            with self._lock:
                self.recognizer_calls += 1
        embeddings = np.concatenate(parts)
        with self._lock:
            self.recognizer_faces += len(faces)
        if embeddings.shape[1] != self.embedding_size:
            raise PetalError(f"the recognizer produced {embeddings.shape[1]}-d embeddings, "
                             f"the manifest says {self.embedding_size}")
        # The contract promises L2-normalised output; renormalising costs nothing and absorbs FP16 drift.
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return embeddings / np.maximum(norms, 1e-12)

    def embed_gated(self, faces: np.ndarray) -> np.ndarray:
        """Recognizer on faces with the alpha their own IQA scores set (the gallery's and an
        evaluation's path; the pipeline scores every crop but embeds only the selected ones)."""
        return self.embed(faces, self.alpha(self.quality(faces)))

    def close(self) -> None:
        for runner in (getattr(self, "recognizer", None), getattr(self, "iqa", None)):
            if runner is not None:
                runner.deactivate()

    def __enter__(self) -> "Models":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
