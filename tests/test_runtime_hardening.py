"""What a hostile but realistic user did to petal-run and petal-gallery (issue 11), each as the
behaviour the tools promise instead: damaged models refused, outputs readable by other users and never
written over an input, galleries that change as one unit, clean one-line errors, --max-frames meaning
N frames, per-frame results streamed to disk."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runtime_support as rs
from runtime_support import run
from petal_runtime.cli import frames_path, gallery_cli
from petal_runtime.errors import PetalError
from petal_runtime.gallery import Gallery, gallery_dtype, meta_path
from petal_runtime.models import Models, fingerprint

setup = rs.setup  # the module's models, gallery and clip (a fixture of runtime_support)


def copy_models(models, folder):
    folder.mkdir()
    for name in ("recognizer.onnx", "iqa.onnx", "manifest.json"):
        shutil.copy(models / name, folder / name)
    return folder


def copy_gallery(gallery, folder, name="g.npy"):
    target = folder / name
    shutil.copy(gallery, target)
    shutil.copy(meta_path(gallery), meta_path(target))
    return target


def umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- 1. verified models


def test_a_model_file_with_one_flipped_byte_is_refused(setup, tmp_path):
    models, gallery, clip = setup
    damaged = copy_models(models, tmp_path / "models")
    path = damaged / "recognizer.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: ONNX Runtime would load it and compute garbage
    path.write_bytes(bytes(data))
    with pytest.raises(PetalError, match="recognizer.onnx is damaged or was replaced"):
        Models(damaged)
    result = run(clip.path, "--gallery", gallery, "--models", damaged, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and "recognizer.onnx is damaged or was replaced" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "error"


def test_a_damaged_variant_is_refused_when_it_is_the_one_loaded(setup, tmp_path):
    models, _, _ = setup
    folder = copy_models(models, tmp_path / "models")
    manifest = json.loads((folder / "manifest.json").read_text())
    for graph in ("recognizer", "iqa"):  # the FP32 graphs stand in for FP16 variants
        shutil.copy(folder / f"{graph}.onnx", folder / f"{graph}.fp16.onnx")
        manifest["files"][f"{graph}.fp16.onnx"] = manifest["files"][f"{graph}.onnx"]
    manifest["files"]["iqa.fp16.onnx"] = "0" * 64  # the export recorded another file than this one
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with Models(folder):  # FP32 is loaded: the variant is not read
        pass
    with pytest.raises(PetalError, match="iqa.fp16.onnx is damaged or was replaced"):
        Models(folder, precision="fp16")


def test_a_model_file_the_manifest_does_not_list_is_refused_not_loaded(setup, tmp_path):
    """A variant dropped in by hand cannot be verified: it used to load with a warning."""
    models, _, _ = setup
    folder = copy_models(models, tmp_path / "models")
    for graph in ("recognizer", "iqa"):
        shutil.copy(folder / f"{graph}.onnx", folder / f"{graph}.fp16.onnx")  # not in manifest.json
    with Models(folder):  # FP32 is listed and loads
        pass
    with pytest.raises(PetalError, match=r"recognizer.fp16.onnx is not listed in manifest.json, so it cannot be "
                                         r"verified and is not loaded"):
        Models(folder, precision="fp16")


def test_the_gallery_fingerprint_is_the_digest_of_the_files_read(setup, tmp_path):
    """A file swapped together with its manifest entry is other models: its galleries are refused."""
    models, gallery, _ = setup
    folder = copy_models(models, tmp_path / "models")
    path = folder / "iqa.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    from petal_runtime.files import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["iqa.onnx"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fp = fingerprint(folder)
    assert fp.iqa_sha256 == sha256_file(path) != fingerprint(models).iqa_sha256
    with pytest.raises(PetalError, match="built with other models"):
        Gallery.load(gallery, fp)


def test_digests_are_cached_across_restarts_by_path_size_and_times(setup, tmp_path, monkeypatch):
    from petal_runtime import models as models_module
    from petal_runtime.files import sha256_file

    models, _, _ = setup
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models_module, "_SHA_CACHE", {})
    path = copy_models(models, tmp_path / "models") / "iqa.onnx"
    real = sha256_file(path)
    assert models_module._file_sha256(path) == real
    store = tmp_path / "home" / "digests.json"
    entries = json.loads(store.read_text())
    assert entries[str(path.resolve())]["sha256"] == real
    # A restart (empty memory) takes the stored digest: prove it by planting one that is not the file's.
    entries[str(path.resolve())]["sha256"] = "f" * 64
    store.write_text(json.dumps(entries))
    monkeypatch.setattr(models_module, "_SHA_CACHE", {})
    assert models_module._file_sha256(path) == "f" * 64
    # Any write to the file changes its times, and it is hashed again.
    path.write_bytes(path.read_bytes())
    assert models_module._file_sha256(path) == real


# ----------------------------------------------------------------------------- 2. file modes


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_0666_minus_the_umask(tmp_path, mask):
    from petal_runtime.files import atomic_path, atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.bin") as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("what open() gives")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask == plain.stat().st_mode & 0o777


def test_reports_galleries_and_exports_are_readable_by_other_users(setup, tmp_path):
    models, gallery, clip = setup
    mode = 0o666 & ~umask_now()
    for name in ("recognizer.onnx", "iqa.onnx", "manifest.json"):
        assert (models / name).stat().st_mode & 0o777 == mode, name
    g = Gallery.load(gallery)
    g.save(tmp_path / "g.npy")
    assert (tmp_path / "g.npy").stat().st_mode & 0o777 == mode
    assert meta_path(tmp_path / "g.npy").stat().st_mode & 0o777 == mode
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json", "--max-frames", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode


def test_an_unreadable_detector_model_says_why(tmp_path):
    from petal_runtime.detect import FaceDetector

    missing = tmp_path / "yunet.onnx"
    with pytest.raises(PetalError, match="cannot read the YuNet model .*No such file"):
        FaceDetector(missing)


# ----------------------------------------------------------------------------- 3. outputs over inputs


def test_outputs_never_overwrite_the_input_or_each_other(setup, tmp_path):
    models, gallery, clip = setup
    video = tmp_path / "clip.mp4"
    shutil.copy(clip.path, video)
    before = video.read_bytes()
    result = run(video, "--gallery", gallery, "--models", models, "--json", video)
    assert result.exit_code == 2 and "--json" in result.output and "is the input video" in result.output
    result = run(video, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json",
                 "--annotate", tmp_path / "." / "clip.mp4")
    assert result.exit_code == 2 and "--annotate" in result.output and "is the input video" in result.output
    os.link(video, tmp_path / "hardlink.mp4")  # same inode, another name
    result = run(video, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json",
                 "--annotate", tmp_path / "hardlink.mp4")
    assert result.exit_code == 2 and "is the input video" in result.output
    result = run(video, "--gallery", gallery, "--models", models, "--json", tmp_path / "same.mp4",
                 "--annotate", tmp_path / "same.mp4")
    assert result.exit_code == 2 and "are the same file" in result.output
    result = run(video, "--gallery", gallery, "--models", models, "--json", gallery)
    assert result.exit_code == 2 and "is the gallery" in result.output
    assert video.read_bytes() == before
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "same.mp4").exists()


# ----------------------------------------------------------------------------- 4. galleries as one unit


def test_concurrent_adds_are_all_kept(setup, tmp_path):
    """Four petal-gallery add processes at once, each adding another person: none is lost."""
    models, gallery, _ = setup
    path = copy_gallery(gallery, tmp_path)
    people = sorted((rs.SHARED_FACES / "orl40").iterdir())[:4]
    code = "import sys; from petal_runtime.cli import gallery_main; sys.argv[0] = 'petal-gallery'; gallery_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, "add", str(path), str(person / "1.pgm"),
                               "--name", f"ORL {person.name}", "--models", str(models)],
                              cwd=rs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for person in people]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    names = Gallery.load(path, fingerprint(models)).names
    assert {f"ORL {p.name}" for p in people} <= set(names) and len(names) == 10 + len(people)


def test_a_metadata_file_beside_another_npy_is_refused(setup, tmp_path):
    models, gallery, _ = setup
    good = Gallery.load(gallery)
    foreign = Gallery(good.entries[:3].copy(), dict(good.meta))
    foreign.save(tmp_path / "foreign.npy")
    shutil.copy(meta_path(gallery), meta_path(tmp_path / "foreign.npy"))  # the good pair's .json
    with pytest.raises(PetalError, match="foreign.npy.json does not belong to foreign.npy"):
        Gallery.load(tmp_path / "foreign.npy", fingerprint(models))


def test_readers_never_see_a_mismatched_pair_while_a_writer_replaces_it(setup, tmp_path):
    """Another process rewrites the gallery 150 times (two versions in turn) while this one reads it."""
    _, gallery, _ = setup
    path = copy_gallery(gallery, tmp_path)
    g = Gallery.load(path)
    smaller = Gallery(g.entries[:4].copy(), dict(g.meta))
    smaller.save(tmp_path / "small.npy")
    writer = subprocess.Popen([sys.executable, "-c", """
import sys
from petal_runtime.gallery import Gallery
full, small = Gallery.load(sys.argv[1]), Gallery.load(sys.argv[2])
for i in range(150):
    (small if i % 2 else full).save(sys.argv[1])
""", str(path), str(tmp_path / "small.npy")], cwd=rs.REPO)
    sizes = set()
    while writer.poll() is None:
        sizes.add(len(Gallery.load(path)))  # raises PetalError on a mismatched pair
    assert writer.returncode == 0 and sizes <= {4, 10}


def test_legacy_metadata_without_the_npy_digest_is_refused_with_the_fix(setup, tmp_path):
    _, gallery, _ = setup
    path = copy_gallery(gallery, tmp_path)
    meta = json.loads(meta_path(path).read_text())
    del meta["entries_sha256"]
    meta_path(path).write_text(json.dumps(meta))
    with pytest.raises(PetalError, match="older petal-gallery.*rebuild the gallery"):
        Gallery.load(path)


# ----------------------------------------------------------------------------- 7. Gallery.add / identify


@pytest.mark.parametrize("embeddings, expected", [
    (np.ones((2, 256)), r"expected shape \[n, 128\] or \[128\] for this 128-d gallery, got \[2, 256\]"),
    (np.ones(256), r"got \[256\]"),
    (np.ones((3, 100)), r"got \[3, 100\]"),
    (np.full((1, 128), np.nan), "NaN or infinite"),
    (np.zeros((2, 128)), "zero embedding"),
    ([["a"] * 128], "expected numbers"),
])
def test_add_refuses_embeddings_that_do_not_fit(embeddings, expected):
    gallery = Gallery(np.zeros(0, gallery_dtype(128)), {})
    with pytest.raises(PetalError, match=expected):
        gallery.add("Jane", embeddings)
    assert len(gallery) == 0


def test_add_takes_one_vector_or_a_batch_and_identify_one_query():
    rng = np.random.default_rng(0)
    gallery = Gallery(np.zeros(0, gallery_dtype(128)), {})
    jane = rng.normal(size=128)
    gallery.add("Jane", jane)
    gallery.add("John", rng.normal(size=(3, 128)))
    assert gallery.names == ["Jane", "John"] and list(gallery.entries["count"]) == [1, 3]
    assert gallery.identify(jane, threshold=0.5).identity == "Jane"
    with pytest.raises(PetalError, match=r"got \[256\]"):
        gallery.identify(np.ones(256), threshold=0.5)
    with pytest.raises(PetalError, match="takes one embedding"):
        gallery.identify(np.ones((2, 128)), threshold=0.5)
    with pytest.raises(PetalError, match="weights for Jane"):
        gallery.add("Jane", np.ones((2, 128)), weights=np.array([1.0, np.nan]))


# ----------------------------------------------------------------------------- 9. no tracebacks


def test_unwritable_outputs_are_refused_before_the_work(setup, tmp_path):
    models, gallery, clip = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder is expected\n")
    folder = rs.lfw_gallery_folder(skip_first=1, per_identity=1)
    result = rs.invoke(gallery_cli, ["build", folder, "--models", models, "-o", blocker / "g.npy"])
    assert result.exit_code == 2 and "cannot write gallery" in result.output
    assert "image(s)" not in result.output  # refused before any embedding work
    path = copy_gallery(gallery, tmp_path)
    os.chmod(tmp_path, 0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pass  # root writes anyway: the folder-under-a-file cases above and below still hold
        else:
            result = rs.invoke(gallery_cli, ["add", path, rs.SHARED_FACES / "orl40" / "s1" / "1.pgm", "--name", "x"])
            assert result.exit_code == 2 and "not writable" in result.output
    finally:
        os.chmod(tmp_path, 0o755)
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json",
                 "--annotate", blocker / "a.mp4")
    assert result.exit_code == 2 and "cannot write --annotate" in result.output
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", blocker / "r.json")
    assert result.exit_code == 2 and "cannot write --json" in result.output


@pytest.mark.parametrize("content, expected", [
    ("[]", "expected a JSON object, found a list"),
    ("null", "expected a JSON object, found null"),
    ('"manifest"', "expected a JSON object, found a string"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line(setup, tmp_path, content, expected):
    models, gallery, clip = setup
    folder = copy_models(models, tmp_path / "models")
    (folder / "manifest.json").write_text(content)
    result = run(clip.path, "--gallery", gallery, "--models", folder, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and expected in result.output


@pytest.mark.parametrize("field, value, expected", [
    ("iqa_threshold", "0.7", "iqa_threshold should be a finite number, found a string"),
    ("embedding_size", 12.5, "embedding_size should be an integer, found a number"),
    ("embedding_size", 0, "embedding_size should be a positive integer"),
    ("alpha_clip", "yes", "alpha_clip should be true or false"),
    ("files", [], "files should be an object of strings, found a list"),
    ("backbone", None, "backbone should be a string, found null"),
])
def test_manifest_fields_of_the_wrong_type_are_named(setup, tmp_path, field, value, expected):
    from petal_runtime.contract import Manifest

    models, _, _ = setup
    folder = copy_models(models, tmp_path / "models")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[field] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PetalError, match=expected):
        Manifest.load(folder)
    with pytest.raises(PetalError, match=expected):
        Models(folder)


@pytest.mark.parametrize("content", ["[]", "null", '{"models_sha256": 5, "entries_sha256": "x"}', "{}"])
def test_gallery_metadata_of_the_wrong_shape_is_one_line(setup, tmp_path, content):
    models, gallery, clip = setup
    path = copy_gallery(gallery, tmp_path)
    meta_path(path).write_text(content)
    with pytest.raises(PetalError, match="g.npy.json"):
        Gallery.load(path)
    result = run(clip.path, "--gallery", path, "--models", models, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and "g.npy.json" in result.output
    result = rs.invoke(gallery_cli, ["list", path])
    assert result.exit_code == 2 and "g.npy.json" in result.output


@pytest.mark.parametrize("image, expected", [
    (np.zeros((0, 0, 3), np.uint8), "empty image"),
    ([[[0, 0, 0]]], "numpy BGR image"),
    (np.zeros((48, 64), np.uint8), r"\[H, W, 3\].*COLOR_GRAY2BGR"),
    (np.zeros((48, 64, 3), np.float64), "8-bit frames .*float64.*0..1"),
    (np.zeros((48, 64, 3), np.uint16), "8-bit frames .*uint16"),
])
def test_process_refuses_frames_it_cannot_read(setup, image, expected):
    from petal_runtime.pipeline import Pipeline

    models, gallery, _ = setup
    with Pipeline.from_dir(models, gallery) as pipeline:
        with pytest.raises(PetalError, match=expected):
            pipeline.process(image)


# ----------------------------------------------------------------------------- 10. --max-frames


def test_max_frames_n_is_n_frames_decoded_and_reported(setup, tmp_path):
    models, gallery, clip = setup
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json", "--max-frames", 10)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f["index"] for f in report["frames"]] == list(range(10))
    assert report["stats"]["frames"] == report["stats"]["frames_read"] == report["source_stats"]["frames"] == 10
    for bad in ("0", "-5"):
        result = run(clip.path, "--gallery", gallery, "--models", models, "--max-frames", bad)
        assert result.exit_code == 2 and "--max-frames" in result.output


# ----------------------------------------------------------------------------- 11. streamed frames


def test_frames_are_on_disk_as_they_are_produced(setup, tmp_path, monkeypatch):
    """While petal-run runs, each analysed frame is already a line of REPORT.frames.jsonl."""
    from petal_runtime.pipeline import Pipeline

    models, gallery, clip = setup
    log = frames_path(tmp_path / "r.json")
    assert log == tmp_path / "r.frames.jsonl"
    seen = []
    original = Pipeline.run

    def watched(self, source, keep_images=False):
        inner = original(self, source, keep_images)
        try:
            for i, result in enumerate(inner):
                seen.append(len(log.read_text().splitlines()) if log.exists() else -1)
                yield result
        finally:
            inner.close()

    monkeypatch.setattr(Pipeline, "run", watched)
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json", "--max-frames", 30)
    assert result.exit_code == 0, result.output
    assert seen == list(range(30))  # before frame i is handed on, frames 0..i-1 are on disk
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["frames_file"] == str(log)
    assert [f["index"] for f in lines] == [f["index"] for f in report["frames"]] == list(range(30))
    assert sum(len(f["faces"]) for f in lines) == sum(len(f["faces"]) for f in report["frames"]) > 0


def test_no_frames_writes_neither_list_nor_log(setup, tmp_path):
    models, gallery, clip = setup
    result = run(clip.path, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json",
                 "--max-frames", 5, "--no-frames")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["frames"] == []
    assert not frames_path(tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- smaller ones


def test_an_empty_gallery_runs_with_a_warning(setup, tmp_path):
    models, gallery, clip = setup
    empty = Gallery(np.zeros(0, gallery_dtype(128)), dict(Gallery.load(gallery).meta))
    empty.save(tmp_path / "empty.npy")
    result = run(clip.path, "--gallery", tmp_path / "empty.npy", "--models", models, "--json", tmp_path / "r.json",
                 "--max-frames", 3)
    assert result.exit_code == 0 and "warning: the gallery" in result.output and "holds no identities" in result.output
    assert any("no identities" in w for w in json.loads((tmp_path / "r.json").read_text())["warnings"])


def test_a_file_cut_before_any_frame_reports_error_not_complete(setup, tmp_path):
    models, gallery, clip = setup
    data = clip.path.read_bytes()
    cut = tmp_path / "five-percent.mp4"
    cut.write_bytes(data[: len(data) // 20])  # faststart: the index survives, the frames do not
    result = run(cut, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and "no frame could be decoded" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "error" and "no frame could be decoded" in report["error"]


def test_an_mp4_cut_before_its_index_says_so(setup, tmp_path):
    models, gallery, _ = setup
    plain = rs.synth_clip("plain", count=1, seconds=1.0, faststart=False, face_px=(30, 40))
    data = plain.path.read_bytes()
    cut = tmp_path / "half.mp4"
    cut.write_bytes(data[: len(data) // 2])
    result = run(cut, "--gallery", gallery, "--models", models, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and "cut before its index was written (no moov atom" in result.output


def test_long_error_messages_are_cut_at_a_word_boundary():
    from petal_runtime.files import first_line

    text = "PytorchStreamReader failed reading zip archive: failed finding central directory " * 3
    line = first_line(ValueError(text), 120)
    assert len(line) <= 120 and line.endswith("...")
    assert text.startswith(line[:-3]) and text[len(line) - 3] == " "  # the cut falls between words
    assert first_line(ValueError("short\nsecond line")) == "short"


def test_checkpoint_errors_keep_whole_words(tmp_path):
    torch = pytest.importorskip("torch")
    from petal_train.checkpoint import load_checkpoint

    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # looks like a zip, is not one
    with pytest.raises(RuntimeError) as raw:
        torch.load(bad, weights_only=True)
    full = str(raw.value)
    assert len(full) > 120  # torch's own message is long
    with pytest.raises(PetalError) as caught:
        load_checkpoint(bad)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("...)")
    reason = message.split(" (", 1)[1][:-len("...)")]
    assert full.startswith(reason) and full[len(reason)] in " .,;:"  # cut between words
