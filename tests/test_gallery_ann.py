"""The optional ANN gallery index (petal_runtime/ann.py, `petal-gallery index`): the same answers as exact
search on a few thousand identities, bound to the gallery's content (stale -> refused), one-line errors,
and a runtime that works without usearch."""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest

from runtime_support import invoke

from petal_runtime.ann import build_index, index_meta_path, index_path
from petal_runtime.cli import gallery_cli
from petal_runtime.errors import PetalError
from petal_runtime.gallery import Gallery, Match, gallery_dtype
from petal_runtime.openset import OpenSetRule, PetalWarning

pytest.importorskip("usearch", reason="the [ann] extra (make test installs it with the dev extras)")

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def save_random_gallery(path, n: int, seed: int = 0) -> Gallery:
    rng = np.random.default_rng(seed)
    entries = np.zeros(n, gallery_dtype(DIM))
    entries["name"] = [f"id{i:06d}" for i in range(n)]
    entries["embedding"] = unit(rng.standard_normal((n, DIM), dtype=np.float32))
    entries["count"] = 1
    gallery = Gallery(entries, {"models_sha256": "0" * 64})
    gallery.save(path)
    return gallery


def noisy_copies(matrix: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Queries at cosine 0.5-0.7 to a random gallery row (as a degraded face of an enrolled person)."""
    rng = np.random.default_rng(seed)
    rows = matrix[rng.integers(0, len(matrix), count)]
    noise = rng.standard_normal(rows.shape, dtype=np.float32)
    noise = unit(noise - (noise * rows).sum(1, keepdims=True) * rows)  # orthogonal to its row
    cos = rng.uniform(0.5, 0.7, (count, 1)).astype(np.float32)
    return unit(cos * rows + np.sqrt(1 - cos ** 2) * noise)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A saved 3000-identity gallery with its index built (once for the module)."""
    path = tmp_path_factory.mktemp("ann") / "g.npy"
    save_random_gallery(path, 3000)
    build_index(Gallery.load(path, index="exact"), path, threads=1)
    return path


def test_index_gives_exact_searchs_answers(indexed):
    exact = Gallery.load(indexed, index="exact")
    ann = Gallery.load(indexed)  # auto: the index beside it fits
    assert exact.index is None and ann.index is not None and len(ann.index) == 3000
    queries = noisy_copies(exact.embeddings, 300)
    hits = same_top5 = 0
    for query in queries:
        a, e = ann.identify(query, threshold=0.3, top_k=5), exact.identify(query, threshold=0.3, top_k=5)
        assert isinstance(a, Match)
        hits += a.identity == e.identity
        same_top5 += [n for n, _ in a.top_k] == [n for n, _ in e.top_k]
        # Scores are the exact cosines (re-scored in float32, not the index's f16 distances; a product over
        # the candidates' rows may round the last bit unlike one over the whole matrix).
        assert all(score == pytest.approx(float(exact.embeddings[exact.names.index(name)] @ query), abs=1e-6)
                   for name, score in a.top_k)
    assert hits / len(queries) == 1.0  # recall@1 against exact
    assert same_top5 / len(queries) >= 0.99


def test_track_decisions_use_the_index_with_the_same_result(indexed):
    exact, ann = Gallery.load(indexed, index="exact"), Gallery.load(indexed, index="ann")
    rule = OpenSetRule(None, 0.3, None, None)
    crops = noisy_copies(exact.embeddings, 4, seed=7)
    crops[1:] = noisy_copies(np.repeat(crops[:1], 3, 0), 3, seed=8)  # four crops of one face
    qualities = np.array([0.9, 0.5, 0.3, 0.7])
    a, e = rule.decide(ann, crops, qualities), rule.decide(exact, crops, qualities)
    assert a.identity == e.identity and [n for n, _ in a.top_k] == [n for n, _ in e.top_k]
    assert [s for _, s in a.top_k] == pytest.approx([s for _, s in e.top_k], abs=1e-6)


def test_files_are_0644_and_name_the_gallery(indexed):
    meta = json.loads(index_meta_path(indexed).read_text())
    gallery_meta = json.loads(indexed.with_name("g.npy.json").read_text())
    assert meta["entries_sha256"] == gallery_meta["entries_sha256"] and meta["identities"] == 3000
    assert meta["metric"] == "ip" and meta["index_file"] == "g.ann.usearch"
    old = os.umask(0o022)
    try:
        for path in (index_path(indexed), index_meta_path(indexed)):
            assert path.stat().st_mode & 0o777 == 0o644
        assert not [p for p in indexed.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    finally:
        os.umask(old)


def test_a_stale_index_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    path = tmp_path / "g.npy"
    save_random_gallery(path, 500)
    build_index(Gallery.load(path, index="exact"), path, threads=1)
    assert Gallery.load(path, index="ann").index is not None
    with Gallery.locked(path) as gallery:
        gallery.add("newcomer", np.ones((1, DIM), np.float32))
    with pytest.raises(PetalError, match=r"g.ann.usearch is stale.*rebuild it with: petal-gallery index .*g\.npy"):
        Gallery.load(path, index="ann")
    with pytest.warns(PetalWarning, match="stale.*searching g.npy exactly"):
        gallery = Gallery.load(path)  # auto: the gallery still works, exactly
    assert gallery.index is None and gallery.identify(np.ones(DIM), 0.5).identity == "newcomer"
    result = invoke(gallery_cli, ["index", path, "--check"])
    assert result.exit_code == 2 and "stale" in result.output and len(result.output.strip().splitlines()) == 1
    # rebuilt when asked
    assert invoke(gallery_cli, ["index", path, "--threads", "1"]).exit_code == 0
    assert Gallery.load(path, index="ann").identify(np.ones(DIM), 0.5).identity == "newcomer"


def test_editing_in_memory_drops_to_exact_search(indexed):
    gallery = Gallery.load(indexed, index="ann")
    gallery.add("late", np.full((1, DIM), -1.0, np.float32))
    assert gallery.index is None and gallery.identify(np.full(DIM, -1.0), 0.5).identity == "late"


def test_a_damaged_index_is_refused(tmp_path):
    path = tmp_path / "g.npy"
    save_random_gallery(path, 300)
    build_index(Gallery.load(path, index="exact"), path, threads=1)
    data = bytearray(index_path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_path(path).write_bytes(bytes(data))
    with pytest.raises(PetalError, match="damaged or was replaced.*petal-gallery index"):
        Gallery.load(path, index="ann")
    index_meta_path(path).write_text("{not json")
    with pytest.raises(PetalError, match="g.ann.json is not valid JSON"):
        Gallery.load(path, index="ann")


def test_index_modes(tmp_path):
    path = tmp_path / "g.npy"
    save_random_gallery(path, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Gallery.load(path).index is None  # auto without an index: exact, silently
    with pytest.raises(PetalError, match=r"no ANN index beside .*g\.npy.*petal-gallery index"):
        Gallery.load(path, index="ann")
    with pytest.raises(PetalError, match="index must be one of auto, exact, ann"):
        Gallery.load(path, index="hnsw")


def test_without_usearch(indexed, monkeypatch):
    monkeypatch.setitem(sys.modules, "usearch", None)  # `import usearch` raises ImportError
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    missing = r"needs usearch, which is not installed: pip install 'petal\[ann\]'"
    with pytest.raises(PetalError, match=missing):
        Gallery.load(indexed, index="ann")
    with pytest.raises(PetalError, match=missing):
        build_index(Gallery.load(indexed, index="exact"), indexed)
    with pytest.warns(PetalWarning, match=missing):
        gallery = Gallery.load(indexed)  # auto: exact search, said once
    assert gallery.index is None and gallery.identify(gallery.embeddings[5], 0.5).identity == "id000005"
    result = invoke(gallery_cli, ["index", indexed])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: the ANN gallery index needs usearch, which is not installed: pip install 'petal[ann]' "
        "(or load the gallery with index='exact')"]


def test_cli_index_builds_and_checks(tmp_path):
    path = tmp_path / "people.npy"
    save_random_gallery(path, 400)
    result = invoke(gallery_cli, ["index", path, "--connectivity", "8", "--expansion-search", "40", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "exact search is already fast" in result.output and "400 identities" in result.output
    meta = json.loads(index_meta_path(path).read_text())
    assert (meta["connectivity"], meta["expansion_search"]) == (8, 40)
    assert Gallery.load(path).index.expansion_search == 40
    result = invoke(gallery_cli, ["index", path, "--check"])
    assert result.exit_code == 0 and "fits" in result.output


@pytest.mark.parametrize("make, message", [
    (lambda p: None, r"gallery .*absent\.npy not found"),
    (lambda p: p.write_bytes(b"not a numpy file at all"), "is not a PETAL gallery"),
    (lambda p: np.save(p, np.zeros((3, 4), np.float32)), "is not a PETAL gallery: expected fields"),
])
def test_cli_index_bad_input_is_one_line(tmp_path, make, message):
    path = tmp_path / "absent.npy"
    make(path)
    result = invoke(gallery_cli, ["index", path])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not index_path(path).exists() and not index_meta_path(path).exists()


def test_the_console_script_prints_one_line_not_a_traceback(tmp_path):
    import subprocess

    path = tmp_path / "g.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    result = subprocess.run([sys.executable, "-c", "from petal_runtime.cli import gallery_main; gallery_main()",
                             "index", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
