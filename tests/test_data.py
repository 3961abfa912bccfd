"""Dataset layouts (identity folders, TinyFace, arcface_torch RecordIO) and the degrading Dataset."""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from petal_runtime.errors import PetalError
from petal_train.data import (RECORDIO_MAGIC, DegradedFaces, IRHeader, RecordIOFaces, RecordIOFile, detect_layout,
                              frame_record, load_tinyface_test, load_training_data, pack_record, unpack_record,
                              write_recordio)


def _write_tree(root: Path, faces, identities: int, per_identity: int, size: int | None = None) -> Path:
    """Aligned crops of real faces as root/person_<label>/<k>.png (optionally shrunk to `size` px).

    Folder names are not the people's: LFW10's are evaluation identities, which never train."""
    for label in range(identities):
        for k, i in enumerate(np.flatnonzero(faces.labels == label)[:per_identity]):
            image = faces.images[i] if size is None else cv2.resize(faces.images[i], (size, size),
                                                                   interpolation=cv2.INTER_AREA)
            path = root / f"person_{label}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


# ------------------------------------------------------------------------------------------ layouts


def test_layout_is_told_from_the_folder_structure(tmp_path):
    (tmp_path / "ids" / "alice").mkdir(parents=True)
    (tmp_path / "tiny" / "Training_Set").mkdir(parents=True)
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "train.rec").write_bytes(b"")
    assert detect_layout("portraits") == "portraits"
    assert detect_layout(tmp_path / "ids") == "folders"
    assert detect_layout(tmp_path / "tiny") == "tinyface"
    assert detect_layout(tmp_path / "rec") == "recordio"
    assert detect_layout(tmp_path / "rec" / "train.rec") == "recordio"
    with pytest.raises(PetalError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_identity_folders_load_aligned_with_a_seeded_identity_holdout(lfw_faces, tmp_path):
    root = _write_tree(tmp_path / "ids", lfw_faces, identities=5, per_identity=2)
    (root / "person_0" / "broken.jpg").write_bytes(b"not a jpeg")
    data = load_training_data(root, holdout_fraction=0.4, seed=3)
    again = load_training_data(root, holdout_fraction=0.4, seed=3)
    assert data.layout == "folders" and data.skipped.reasons["undecodable"] == 1
    assert len(data.holdout) == 2 and data.holdout == again.holdout
    assert set(data.names) | set(data.holdout) == {f"person_{label}" for label in range(5)}
    assert data.num_classes == 3 and sorted(set(data.labels.tolist())) == [0, 1, 2] and len(data) == 6
    assert data.images.shape == (6, 112, 112, 3) and data.images.dtype == np.uint8
    # Already aligned 112x112 crops pass through unchanged (PNG is lossless).
    first = lfw_faces.images[np.flatnonzero(lfw_faces.labels == int(data.names[0].split("_")[1]))[0]]
    assert np.array_equal(data.images[0], first)


def test_an_empty_dataset_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(PetalError, match="holds no images"):
        load_training_data(tmp_path / "empty")
    with pytest.raises(PetalError, match="holdout"):
        load_training_data(tmp_path / "empty", holdout_fraction=1.0)


# ------------------------------------------------------------------------------------------ TinyFace


def test_tinyface_layout_follows_adafaces_protocol(lfw_faces, tmp_path):
    root = tmp_path / "tinyface"
    _write_tree(root / "Training_Set", lfw_faces, identities=2, per_identity=2, size=24)
    test = root / "Testing_Set"
    for name in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (test / name).mkdir(parents=True)
    for label in (2, 3):
        picks = np.flatnonzero(lfw_faces.labels == label)
        cv2.imwrite(str(test / "Gallery_Match" / f"{label}_1.png"), lfw_faces.images[picks[0]][:, :, ::-1])
        for k in (1, 2):  # tiny probes (24 px): YuNet may miss them, then the crop is resized whole
            small = cv2.resize(lfw_faces.images[picks[k]], (24, 24), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(test / "Probe" / f"{label}_{k + 1}.png"), small[:, :, ::-1])
    distractor = lfw_faces.images[np.flatnonzero(lfw_faces.labels == 4)[0]]
    cv2.imwrite(str(test / "Gallery_Distractor" / "d_1.png"), distractor[:, :, ::-1])

    split = load_tinyface_test(root)
    assert sorted(split.probe.labels.tolist()) == [2, 2, 3, 3]
    assert sorted(split.gallery.labels.tolist()) == [-100, 2, 3]
    assert split.probe.images.shape == (4, 112, 112, 3)
    train = load_training_data(root)
    assert train.layout == "tinyface" and train.num_classes == 2 and train.images.shape == (4, 112, 112, 3)


def test_tinyface_without_its_test_folders_says_what_is_missing(tmp_path):
    (tmp_path / "Testing_Set" / "Probe").mkdir(parents=True)
    with pytest.raises(PetalError, match="Gallery_Match"):
        load_tinyface_test(tmp_path)


# ------------------------------------------------------------------------------------------ RecordIO


def _frame(payload: bytes, cflag: int = 0) -> bytes:
    """One dmlc RecordIO frame, written out by hand from the format description."""
    return struct.pack("<II", RECORDIO_MAGIC, (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def test_recordio_written_as_mxnet_does_is_read_without_mxnet(lfw_faces, tmp_path):
    """arcface_torch layout: record 0 is a header (flag 2, label = [first key past the images, ...]),
    then one record per image with a scalar label; one image payload contains the magic word at a
    4-aligned position, which the writer splits into two frames (cflag 1, then 3)."""
    faces = [lfw_faces.images[np.flatnonzero(lfw_faces.labels == k)[0]] for k in range(3)]
    payloads = {0: struct.pack("<IfQQ", 2, 0.0, 0, 0) + np.array([4, 7], np.float32).tobytes()}
    for key, (face, label) in enumerate(zip(faces, (5, 9, 5)), start=1):
        payloads[key] = struct.pack("<IfQQ", 0, float(label), key, 0) + _jpeg(face)
    # Record 3 carries a tail after the JPEG, at an aligned offset, holding the magic word.
    tail_at = -len(payloads[3]) % 4 + 4
    payloads[3] += b"\0" * tail_at + struct.pack("<I", RECORDIO_MAGIC) + b"end!"
    split_at = len(payloads[3]) - 8
    rec, idx = bytearray(), []
    for key, payload in payloads.items():
        idx.append(f"{key}\t{len(rec)}")
        if key == 3:
            rec += _frame(payload[:split_at], cflag=1) + _frame(payload[split_at + 4:], cflag=3)
        else:
            rec += _frame(payload)
    folder = tmp_path / "faces_emore"
    folder.mkdir()
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("\n".join(idx) + "\n")

    store = RecordIOFile(folder / "train.rec")
    assert store.read(3) == payloads[3]  # parts joined with the magic put back
    assert frame_record(payloads[3]) == _frame(payloads[3][:split_at], 1) + _frame(payloads[3][split_at + 4:], 3)
    header, image = unpack_record(store.read(1))
    assert header == IRHeader(0, 5.0, 1, 0) and image == _jpeg(faces[0])
    assert store.header(0) == IRHeader(2, (4.0, 7.0), 0, 0)

    data = load_training_data(folder)
    assert data.layout == "recordio" and len(data) == 3 and data.names == ["5", "9"]
    assert data.labels.tolist() == [0, 1, 0]
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(_jpeg(faces[1]), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(data.images[1], decoded)


def test_write_recordio_round_trips_and_a_broken_image_is_replaced_by_the_same_identity(lfw_faces, tmp_path):
    faces = [lfw_faces.images[i] for i in np.flatnonzero(lfw_faces.labels == 0)[:2]]
    records = [(0, pack_record(IRHeader(0, (4.0, 5.0), 0, 0), b""))]
    records += [(1, pack_record(IRHeader(0, 0.0, 1, 0), _jpeg(faces[0]))),
                (2, pack_record(IRHeader(0, 0.0, 2, 0), b"\xff\xd8 not really a jpeg")),
                (3, pack_record(IRHeader(0, 0.0, 3, 0), _jpeg(faces[1])))]
    write_recordio(tmp_path / "train.rec", records)
    assert (tmp_path / "train.idx").read_text().startswith("0\t0\n")
    source = RecordIOFaces(tmp_path)
    assert len(source) == 3 and source.labels.tolist() == [0, 0, 0]
    assert np.array_equal(source[1], source[2])  # record 2 does not decode: record 3 stands in
    assert source.skipped.reasons["undecodable"] == 1
    (tmp_path / "train.rec").write_bytes(b"\0" * 64)
    with pytest.raises(PetalError, match="magic"):
        RecordIOFaces(tmp_path)


# ------------------------------------------------------------------------------------------ Dataset


def test_degraded_faces_depend_only_on_seed_epoch_and_index(lfw_faces):
    images, labels = lfw_faces.images[:40], lfw_faces.labels[:40]
    dataset = DegradedFaces(images, labels, seed=7, p_clean=0.3)
    image, label = dataset[5]
    assert image.dtype == torch.float32 and image.shape == (3, 112, 112)
    assert 0 <= float(image.min()) and float(image.max()) <= 255 and label == int(labels[5])
    other = DegradedFaces(images, labels, seed=7, p_clean=0.3)
    _ = [other[i] for i in (9, 3, 1)]  # access order and history do not matter
    assert torch.equal(other[5][0], image)
    before = [dataset[i][0] for i in range(20)]
    dataset.set_epoch(1)
    assert sum(not torch.equal(dataset[i][0], before[i]) for i in range(20)) >= 12  # a new draw per epoch
    clean = DegradedFaces(images, labels, seed=7, p_clean=1.0, flip=False)
    assert np.array_equal(clean[5][0].numpy().transpose(1, 2, 0), images[5])


def test_about_p_clean_of_the_samples_stay_undegraded(lfw_faces):
    images = lfw_faces.images[:50]
    dataset = DegradedFaces(images, lfw_faces.labels[:50], seed=0, p_clean=0.3)
    untouched = 0
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(images)):
            sample = dataset.sample(i)
            untouched += np.array_equal(sample, images[i]) or np.array_equal(sample, images[i][:, ::-1])
    assert 0.2 < untouched / 200 < 0.4
