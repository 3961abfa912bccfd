"""Every reader a user can point at a file, fed 1,000 mutated copies of a good file each (hypothesis):
the manifest, a gallery's .npy and its .json, both calibration readers, an adapter checkpoint and a
TensorRT engine header. A reader either returns a well-typed value or raises PetalError (a one-line
message); any other exception is a traceback a user would see. No reader may change a file on disk.

Mutations: byte flips, overwrites, insertions, deletions and truncation (biased to the header, where
the structure lives), and for JSON also structural ones (a field given any JSON value, a field
removed, the whole document replaced by another JSON value). The parsers are fuzzed directly on small
files in a temporary folder, so each test takes seconds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petal_runtime.errors import PetalError

EXAMPLES = 1000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@st.composite
def byte_mutations(draw, data: bytes, hot: int = 64) -> bytes:
    """1-4 byte-level edits of `data`, half of them inside its first `hot` bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        size = max(len(out), 1)
        where = draw(st.one_of(st.integers(0, min(hot, size) - 1), st.integers(0, size - 1)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip" and out:
            out[where % len(out)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[where % len(out)] = draw(st.integers(0, 255))
        elif op == "insert":
            out[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[where:where + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[where:]
    return bytes(out)


@st.composite
def json_mutations(draw, document: dict) -> bytes:
    """A structural change of a JSON object (and sometimes byte edits on top), as bytes."""
    doc = json.loads(json.dumps(document))
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "replace", "bytes"]))
    if kind == "set":
        doc[draw(st.sampled_from(sorted(doc)) | st.text(max_size=8))] = draw(JSON_VALUES)
    elif kind == "delete" and doc:
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif kind == "replace":
        doc = draw(JSON_VALUES)
    text = json.dumps(doc, indent=1).encode()
    if kind == "bytes" or draw(st.booleans()):
        return draw(byte_mutations(text, hot=len(text)))
    return text


_FOLDERS: dict[str, Path] = {}


def fresh(factory, name: str) -> Path:
    """One folder per reader, emptied for each example (pytest's numbered folders slow down by the thousand)."""
    if name not in _FOLDERS:
        _FOLDERS[name] = factory.mktemp(name)
    folder = _FOLDERS[name]
    for path in folder.iterdir():
        path.unlink()
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def read_and_check(folder: Path, read):
    """read() may return or raise PetalError; the folder must be exactly as it was."""
    before = snapshot(folder)
    try:
        return read()
    except PetalError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None
    finally:
        assert snapshot(folder) == before


# ----------------------------------------------------------------------------- manifest


def good_manifest() -> dict:
    from petal_runtime.contract import Manifest

    return json.loads(Manifest(backbone="sface", embedding_size=128, norm_mean=127.5, norm_std=128.0,
                               iqa_threshold=0.735,
                               files={"recognizer.onnx": "a" * 64, "iqa.onnx": "b" * 64}).to_json())


@FUZZ
@given(data=st.data())
def test_manifest_reader(tmp_path_factory, data):
    from petal_runtime.contract import Manifest

    folder = fresh(tmp_path_factory, "manifest")
    text = json.dumps(good_manifest(), indent=2).encode()
    mutated = data.draw(st.one_of(json_mutations(good_manifest()), byte_mutations(text, hot=len(text))))
    (folder / "manifest.json").write_bytes(mutated)
    manifest = read_and_check(folder, lambda: Manifest.load(folder))
    if manifest is not None:  # whatever loads is well typed
        assert isinstance(manifest.embedding_size, int) and manifest.embedding_size >= 1
        assert isinstance(manifest.iqa_threshold, float) and math.isfinite(manifest.iqa_threshold)
        assert isinstance(manifest.alpha_clip, bool) and isinstance(manifest.backbone, str)
        assert all(isinstance(v, str) for v in manifest.files.values())


# ----------------------------------------------------------------------------- gallery .npy and .json


@pytest.fixture(scope="module")
def gallery_pair(tmp_path_factory):
    from petal_runtime.gallery import Gallery, gallery_dtype, meta_path

    entries = np.zeros(3, gallery_dtype(16))
    entries["name"] = ["Ann", "Bob", "Cy"]
    entries["embedding"] = np.eye(3, 16)
    entries["count"] = [1, 2, 3]
    path = tmp_path_factory.mktemp("good") / "g.npy"
    Gallery(entries, {"models_sha256": "c" * 64, "backbone": "sface"}).save(path)
    return path.read_bytes(), json.loads(meta_path(path).read_text())


@pytest.mark.parametrize("part", ["npy", "json"])
@FUZZ
@given(data=st.data())
def test_gallery_reader(tmp_path_factory, gallery_pair, part, data):
    """The .npy mutated (and named by its .json, so the reader has to judge the .npy itself), or the .json."""
    import hashlib

    from petal_runtime.gallery import Gallery, meta_path

    npy, meta = gallery_pair
    folder = fresh(tmp_path_factory, "npy" if part == "npy" else "meta")
    path = folder / "g.npy"
    if part == "npy":
        npy = data.draw(byte_mutations(npy, hot=128))
        meta_bytes = json.dumps({**meta, "entries_sha256": hashlib.sha256(npy).hexdigest()}).encode()
    else:
        meta_bytes = data.draw(json_mutations(meta))
    path.write_bytes(npy)
    meta_path(path).write_bytes(meta_bytes)
    gallery = read_and_check(folder, lambda: Gallery.load(path))
    if gallery is not None:
        assert gallery.entries.ndim == 1 and gallery.embeddings.shape == (len(gallery), gallery.dim)
        assert np.isfinite(gallery.embeddings).all()
        if part == "json":
            assert isinstance(gallery.meta["models_sha256"], str) and len(gallery) == 3


# ----------------------------------------------------------------------------- calibration JSON


GOOD_CALIBRATION = {"threshold": 0.736, "mean": 0.558, "std": 0.178, "sample": 1000, "distinct_faces": 487,
                    "seed": 0, "degraded": True, "degradation": "default", "iqa_sha256": "d" * 64,
                    "data": "portraits", "date": "2025-01-01"}


@FUZZ
@given(data=st.data())
def test_calibration_readers(tmp_path_factory, data):
    pytest.importorskip("torch")
    from petal_train.calibrate import Calibration
    from petal_train.fit import read_calibration

    folder = fresh(tmp_path_factory, "calibration")
    path = folder / "t.json"
    text = json.dumps(GOOD_CALIBRATION).encode()
    path.write_bytes(data.draw(st.one_of(json_mutations(GOOD_CALIBRATION), byte_mutations(text, hot=len(text)))))
    read_and_check(folder, lambda: Calibration.load(path))
    read_and_check(folder, lambda: read_calibration(path))


# ----------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A real (tiny) adapter checkpoint file: two adapter tensors, the usual fields."""
    torch = pytest.importorskip("torch")
    from petal_train.checkpoint import AdapterCheckpoint
    from petal_train.lora import LoRAConfig

    ckpt = AdapterCheckpoint(backbone="sface", base_sha256="e" * 64, lora=LoRAConfig(rank=2),
                             adapters={"conv.trainable_lora_down.weight": torch.ones(2, 3),
                                       "conv.trainable_lora_up.weight": torch.zeros(3, 2)},
                             iqa_sha256="f" * 64, iqa_threshold=0.7, training={"epochs": 1})
    path = ckpt.save(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    return path.read_bytes(), ckpt.to_dict()


@st.composite
def checkpoint_mutations(draw, good: tuple[bytes, dict]) -> bytes:
    """Byte edits of the file, or a well-formed torch file whose content has the wrong structure."""
    import io

    import torch

    raw, content = good
    if draw(st.booleans()):
        return draw(byte_mutations(raw, hot=len(raw)))
    doc = dict(content)
    key = draw(st.sampled_from(sorted(doc)))
    nested = isinstance(doc[key], dict) and doc[key] and draw(st.booleans())
    value = draw(JSON_VALUES | st.just(torch.zeros(2)))
    if nested:
        doc[key] = {**doc[key], draw(st.sampled_from(sorted(doc[key]))): value}
    elif draw(st.booleans()):
        doc[key] = value
    else:
        del doc[key]
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_checkpoint_reader(tmp_path_factory, small_checkpoint, data):
    pytest.importorskip("torch")
    from petal_train.checkpoint import AdapterCheckpoint, load_checkpoint

    folder = fresh(tmp_path_factory, "ckpt")
    path = folder / "ckpt.pt"
    path.write_bytes(data.draw(checkpoint_mutations(small_checkpoint)))
    ckpt = read_and_check(folder, lambda: load_checkpoint(path))
    if ckpt is not None:
        assert isinstance(ckpt, AdapterCheckpoint) and isinstance(ckpt.backbone, str)
        assert isinstance(ckpt.lora.rank, int) and isinstance(ckpt.iqa_threshold, float)


# ----------------------------------------------------------------------------- engine header


def good_engine() -> bytes:
    from petal_runtime.backends.trt.loader import EngineHeader

    header = EngineHeader("10.9.0", "NVIDIA H200", "9.0", extra={"precision": "fp16", "graph": "recognizer"})
    return header.to_bytes() + bytes(range(256)) * 4  # the engine itself is opaque to the reader


@FUZZ
@given(data=st.data())
def test_engine_header_reader(tmp_path_factory, data):
    from petal_runtime.backends.trt.loader import EngineHeader, read_engine_file, read_engine_header

    folder = fresh(tmp_path_factory, "engine")
    path = folder / "recognizer.fp16.engine"
    raw = good_engine()
    header_end = raw.index(b"}") + 1
    if data.draw(st.booleans()):
        body = json.loads(raw[12:header_end])
        text = data.draw(json_mutations(body))
        raw = raw[:8] + len(text).to_bytes(4, "little") + text + raw[header_end:]
    else:
        raw = data.draw(byte_mutations(raw, hot=header_end))
    path.write_bytes(raw)
    for read in (lambda: read_engine_header(path), lambda: read_engine_file(path)[0]):
        header = read_and_check(folder, read)
        if header is not None:
            assert isinstance(header, EngineHeader) and isinstance(header.format, int)
            assert all(isinstance(v, str) for v in (header.tensorrt_version, header.gpu, header.compute_capability))
