"""petal-gallery: build / add / remove / list on real LFW faces; no pickle; galleries tied to their models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtime_support as rs
from petal_runtime.cli import gallery_cli
from petal_runtime.errors import PetalError
from petal_runtime.gallery import Gallery, gallery_dtype, meta_path
from petal_runtime.models import Models, fingerprint


@pytest.fixture(scope="module")
def models_dir(shared_faces):
    from conftest import require_models

    require_models()
    return rs.exported_models()


def _invoke(*args):
    return rs.invoke(gallery_cli, args)


@pytest.fixture(scope="module")
def built(models_dir, tmp_path_factory):
    """A gallery of the 10 LFW10 people from their photos 2-3 (built once through the CLI)."""
    out = tmp_path_factory.mktemp("gallery") / "g.npy"
    folder = rs.lfw_gallery_folder(skip_first=1, per_identity=2)
    result = _invoke("build", folder, "--models", models_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert "10 identities from 20 images, 128-d" in result.output
    return out


def test_gallery_file_is_a_structured_array_without_pickle(built, models_dir):
    entries = np.load(built, allow_pickle=False)
    assert entries.dtype.names == ("name", "embedding", "count")
    assert entries.dtype["embedding"].shape == (128,)
    assert len(entries) == 10 and set(entries["count"]) == {2}
    np.testing.assert_allclose(np.linalg.norm(entries["embedding"], axis=1), 1.0, atol=1e-5)
    meta = json.loads(meta_path(built).read_text())
    assert meta["models_sha256"] == fingerprint(models_dir).models_sha256
    assert meta["embedding_size"] == 128 and meta["identities"] == 10


def test_gallery_separates_people(built, models_dir):
    """Each person's held-out photo (their 5th) is closest to their own gallery entry."""
    from petal_runtime.gallery import embed_images

    gallery = Gallery.load(built, fingerprint(models_dir))
    probes = sorted((rs.SHARED_FACES / "lfw10").glob("*/*_0005.jpg"))
    with Models(models_dir) as models:
        embeddings = embed_images(models, probes)
    best = [gallery.names[i] for i in gallery.scores(embeddings).argmax(1)]
    truth = [p.parent.name for p in probes]
    assert sum(b == t for b, t in zip(best, truth)) >= 8, list(zip(truth, best))


def test_add_list_remove(built, tmp_path):
    path = tmp_path / "g.npy"
    shutil.copy(built, path)
    shutil.copy(meta_path(built), meta_path(path))
    person = rs.SHARED_FACES / "lfw10" / "Tony_Blair"
    result = _invoke("add", path, person / "Tony_Blair_0008.jpg", person / "Tony_Blair_0009.jpg",
                     "--name", "Tony_Blair")
    assert result.exit_code == 0, result.output
    result = _invoke("add", path, rs.SHARED_FACES / "orl40" / "s1", "--name", "ORL subject 1")
    assert result.exit_code == 0, result.output
    listing = _invoke("list", path)
    assert "Tony_Blair" in listing.output and "4 image(s)" in listing.output
    assert "ORL subject 1" in listing.output and "11 identities, 128-d" in listing.output
    result = _invoke("remove", path, "ORL subject 1", "Hugo_Chavez")
    assert result.exit_code == 0 and "9 identities" in result.output
    result = _invoke("remove", path, "Nobody")
    assert result.exit_code == 2 and "not in the gallery: Nobody" in result.output
    assert len(Gallery.load(path)) == 9


def test_gallery_from_other_models_or_of_wrong_dimension_is_refused(built, models_dir, tmp_path):
    fp = fingerprint(models_dir)
    other = tmp_path / "other.npy"
    shutil.copy(built, other)
    meta = json.loads(meta_path(built).read_text())
    meta_path(other).write_text(json.dumps({**meta, "models_sha256": "f" * 64}))
    with pytest.raises(PetalError, match="built with other models"):
        Gallery.load(other, fp)
    wide = Gallery(np.zeros(2, gallery_dtype(512)), {**meta})
    wide.entries["name"] = ["a", "b"]
    wide.save(tmp_path / "wide.npy")
    with pytest.raises(PetalError, match="holds 512-d embeddings but the models produce 128-d"):
        Gallery.load(tmp_path / "wide.npy", fp)
    result = _invoke("add", tmp_path / "wide.npy", rs.SHARED_FACES / "lfw10" / "Tony_Blair", "--name", "x",
                     "--models", models_dir)
    assert result.exit_code == 2 and "512-d" in result.output


def test_damaged_galleries_are_clear_errors(built, tmp_path):
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"name": "x"}], dtype=object), allow_pickle=True)
    shutil.copy(meta_path(built), meta_path(pickled))
    with pytest.raises(PetalError, match="not a PETAL gallery"):
        Gallery.load(pickled)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((3, 128), np.float32))
    shutil.copy(meta_path(built), meta_path(plain))
    with pytest.raises(PetalError, match="expected fields name, embedding, count"):
        Gallery.load(plain)
    orphan = tmp_path / "orphan.npy"
    shutil.copy(built, orphan)
    with pytest.raises(PetalError, match="orphan.npy.json is missing"):
        Gallery.load(orphan)
    with pytest.raises(PetalError, match="not found"):
        Gallery.load(tmp_path / "absent.npy")


def test_build_errors_are_one_line(models_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    (empty / "someone" / "noise.png").write_bytes(b"\x89PNG not really")
    result = _invoke("build", empty, "--models", models_dir, "-o", tmp_path / "g.npy")
    assert result.exit_code == 2 and "no face found" in result.output
    result = _invoke("build", tmp_path / "missing", "--models", models_dir, "-o", tmp_path / "g.npy")
    assert result.exit_code == 2 and "is not a folder" in result.output
    result = _invoke("build", empty, "--models", tmp_path, "-o", tmp_path / "g.npy")
    assert result.exit_code == 2 and "no manifest.json" in result.output
    assert not (tmp_path / "g.npy").exists()


def test_merge_keeps_embeddings_normalised(models_dir):
    gallery = Gallery.empty(fingerprint(models_dir))
    rng = np.random.default_rng(0)
    gallery.add("a", rng.normal(size=(3, 128)))
    gallery.add("a", rng.normal(size=(2, 128)))
    gallery.add("b", rng.normal(size=(1, 128)))
    assert gallery.names == ["a", "b"] and list(gallery.entries["count"]) == [5, 1]
    np.testing.assert_allclose(np.linalg.norm(gallery.embeddings, axis=1), 1.0, atol=1e-5)
    with pytest.raises(PetalError, match="reserved"):
        gallery.add("unknown", rng.normal(size=(1, 128)))
    match = gallery.identify(gallery.embeddings[1], threshold=0.5, top_k=2)
    assert match.identity == "b" and match.score == pytest.approx(1.0, abs=1e-5)
    assert gallery.identify(-gallery.embeddings[1], threshold=0.5).identity == "unknown"
