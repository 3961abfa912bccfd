"""The triton backend against a real tritonserver process (the nvidia-pytriton wheel's, started here on free
local ports; tests/triton_support.py says how and why its Python backend stands in for ONNX Runtime's).

One server for the whole module, serving the repository petal-export --triton wrote for the shipped default
checkpoint: the ensemble's wiring, names and dims; parity with the local ONNX Runtime backend over HTTP
and gRPC; dynamic batching across concurrent clients in the server's own statistics; galleries checked
against the server's parameters; petal-gallery and petal-run through the server; a URL that does not
answer; and, last, the server killed and restarted under a live Models.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import runtime_support as rs
import triton_support as ts
from petal_runtime.backends.triton import TritonUnreachable
from petal_runtime.backends.triton.repository import ENSEMBLE_MODEL, IQA_MODEL, RECOGNIZER_MODEL
from petal_runtime.errors import PetalError
from petal_runtime.gallery import Gallery
from petal_runtime.models import Fingerprint, Models

pytestmark = pytest.mark.slow
COSINE = 0.99999
# A small max_batch_size, so that a batch of a few faces already spans two server calls (the runner splits it).
BATCH = (1, 2, 4)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'petal[triton]')")
    from petal_export.triton import TritonOptions, write_repository

    venv = ts.require_server_venv()
    root = tmp_path_factory.mktemp("triton-server")
    write_repository(models_dir, root / "exported", TritonOptions(batch=BATCH), log=None)
    process = ts.LocalTritonServer(venv, ts.python_backend_variant(root / "exported", root / "served"), root)
    started = time.perf_counter()
    process.start()
    process.start_seconds = time.perf_counter() - started
    yield process
    process.stop()


@pytest.fixture(scope="module")
def faces():
    """Real aligned LFW10 faces where ../shared has them (quality, so alpha, varies), else seeded noise."""
    try:
        from conftest import SHARED_FACES

        from petal_runtime.contract import to_model_input
        from petal_train.faces import load_identity_folders

        if (SHARED_FACES / "lfw10").is_dir():
            found = load_identity_folders(SHARED_FACES / "lfw10")
            picks = np.array([np.flatnonzero(found.labels == k)[0] for k in range(6)])
            return to_model_input(found.images[picks])
    except Exception:  # noqa: BLE001 - fall back to synthetic faces
        pass
    return np.random.default_rng(0).uniform(0, 255, (6, 3, 112, 112)).astype(np.float32)


@pytest.fixture(scope="module")
def local(models_dir):
    with Models(models_dir, backend="onnxruntime") as models:
        yield models


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def http_client(server):
    import tritonclient.http as http

    return http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=120)


def test_ensemble_wiring_names_and_dims(server, local, faces):
    import tritonclient.http as http

    client = http_client(server)
    meta = client.get_model_metadata(ENSEMBLE_MODEL)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("image", "FP32", [-1, 3, 112, 112])]
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [("embedding", [-1, 128]), ("quality", [-1, 1]),
                                                                 ("alpha", [-1, 1])]
    config = client.get_model_config(ENSEMBLE_MODEL)
    assert config["platform"] == "ensemble"
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == [IQA_MODEL, RECOGNIZER_MODEL]
    assert [(t["name"], t["shape"]) for t in client.get_model_metadata(IQA_MODEL)["inputs"]] == [
        ("image", [-1, 3, -1, -1])]

    faces = faces[:BATCH[2]]  # one request holds at most max_batch_size faces
    image = http.InferInput("image", list(faces.shape), "FP32")
    image.set_data_from_numpy(faces, binary_data=True)
    result = client.infer(ENSEMBLE_MODEL, [image])
    quality, alpha, embedding = (result.as_numpy(n) for n in ("quality", "alpha", "embedding"))
    np.testing.assert_allclose(quality.reshape(-1), local.quality(faces), atol=1e-5)
    np.testing.assert_allclose(alpha, local.manifest.alpha(quality), atol=1e-6)  # the contract's formula, in-graph
    assert cosines(embedding, local.embed_gated(faces)).min() >= COSINE
    client.close()


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_parity_with_the_local_backend(server, local, faces, scheme):
    url = server.http_url if scheme == "http" else server.grpc_url
    with Models(None, backend="triton", url=url) as remote:
        assert remote.fingerprint == local.fingerprint
        assert remote.manifest.iqa_threshold == local.manifest.iqa_threshold
        assert url in remote.description() and remote.backend.name == "triton"
        assert remote.recognizer.max_batch_size == BATCH[2] < len(faces)  # so each call below is split
        quality = remote.quality(faces)
        np.testing.assert_allclose(quality, local.quality(faces), atol=1e-5)
        alpha = remote.alpha(quality)
        assert cosines(remote.embed(faces, alpha), local.embed(faces, alpha)).min() >= COSINE
        if scheme == "http":  # the adapters' ends too (alpha 0 and 1, per sample)
            ends = (np.arange(len(faces)) % 2).astype(np.float32)
            assert cosines(remote.embed(faces, ends), local.embed(faces, ends)).min() >= COSINE


def _batch_counts(client, model: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, compute ns) in the server's statistics."""
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return {int(b["batch_size"]): (int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"]))
            for b in stats.get("batch_stats", [])}


def test_dynamic_batching_across_concurrent_clients(server, local, faces, capsys):
    client = http_client(server)
    before = _batch_counts(client, RECOGNIZER_MODEL)
    with Models(None, backend="triton", url=server.http_url) as remote:
        one = faces[:1]
        alpha = np.full((1, 1), 0.5, np.float32)
        remote.embed(one, alpha)  # warm
        start = time.perf_counter()
        for _ in range(4):
            remote.embed(one, alpha)
        single = 4 / (time.perf_counter() - start)

        errors: list[BaseException] = []
        results: list[np.ndarray] = []

        def client_thread(k: int) -> None:
            try:
                for i in range(2):
                    face = faces[(k + i) % len(faces)][None]
                    results.append(cosines(remote.embed(face, alpha), local.embed(face, alpha)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        concurrent = 16 / (time.perf_counter() - start)
    assert not errors, errors
    assert len(results) == 16 and min(float(r.min()) for r in results) >= COSINE
    after = _batch_counts(client, RECOGNIZER_MODEL)
    client.close()
    grown = {size: after[size][0] - before.get(size, (0, 0))[0] for size in after}
    assert any(size > 1 and count > 0 for size, count in grown.items()), grown
    ms = {size: (after[size][1] - before.get(size, (0, 0))[1]) / 1e6 / count for size, count in grown.items() if count}
    with capsys.disabled():
        print(f"\n[triton] server start {server.start_seconds:.1f} s; petal_recognizer: 1 client {single:.1f} "
              f"faces/s, 8 concurrent clients {concurrent:.1f} faces/s ({concurrent / single:.2f}x); "
              f"server batches (size: executions) {dict(sorted(grown.items()))}, compute ms per batch "
              f"{ {k: round(v, 1) for k, v in sorted(ms.items())} }")


def test_galleries_are_checked_against_the_servers_parameters(server, models_dir, local, tmp_path):
    from petal_runtime.pipeline import Pipeline

    ours = Gallery.empty(local.fingerprint)
    ours.save(tmp_path / "ours.npy")
    with Pipeline.from_dir(None, tmp_path / "ours.npy", backend="triton", url=server.http_url) as pipeline:
        assert pipeline.models.fingerprint == local.fingerprint

    other = Fingerprint("a" * 64, "b" * 64, "c" * 64, 128, "sface")
    Gallery.empty(other).save(tmp_path / "other.npy")
    with pytest.raises(PetalError) as remote_refusal:
        Pipeline.from_dir(None, tmp_path / "other.npy", backend="triton", url=server.http_url)
    with pytest.raises(PetalError) as local_refusal:
        Pipeline.from_dir(models_dir, tmp_path / "other.npy", backend="onnxruntime")
    assert str(remote_refusal.value) == str(local_refusal.value)  # refused exactly as for a local folder


def test_gallery_and_run_through_the_server_give_the_local_answers(server, models_dir, tmp_path):
    """petal-gallery build and petal-run with --triton-url: the gallery's embeddings and every track's identity
    and score as with the local backend (scores as the report gives them, to 4 decimals)."""
    from conftest import require_shared_faces

    from petal_runtime.cli import gallery_cli

    require_shared_faces()
    clip = rs.lfw_clip()
    folder = tmp_path / "people"  # one other photo of each walker in the clip
    for person in clip.identities:
        source = next(p for p in sorted((rs.lfw_gallery_folder(skip_first=1, per_identity=1) / person).iterdir()))
        (folder / person).mkdir(parents=True)
        (folder / person / source.name).write_bytes(source.read_bytes())
    built = rs.invoke(gallery_cli, ["build", folder, "--triton-url", server.http_url, "-o", tmp_path / "g.npy"])
    assert built.exit_code == 0, built.output
    reference = rs.invoke(gallery_cli, ["build", folder, "--models", models_dir, "-o", tmp_path / "local.npy"])
    assert reference.exit_code == 0, reference.output
    remote_gallery, local_gallery = Gallery.load(tmp_path / "g.npy"), Gallery.load(tmp_path / "local.npy")
    assert remote_gallery.names == local_gallery.names and len(remote_gallery) == len(clip.identities)
    assert cosines(remote_gallery.embeddings, local_gallery.embeddings).min() >= COSINE
    assert "models_dir" not in remote_gallery.meta  # no folder to point back to

    reports = {}
    for name, where in (("triton", ["--triton-url", server.grpc_url]), ("local", ["--models", models_dir])):
        result = rs.run(clip.path, "--gallery", tmp_path / "local.npy", *where, "--threshold", "0.3",
                        "--max-frames", "30", "--json", tmp_path / f"{name}.json", "--no-frames")
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["triton"]["models"]["url"] == server.grpc_url and reports["triton"]["models"]["dir"] is None
    remote_tracks, local_tracks = reports["triton"]["tracks"], reports["local"]["tracks"]
    assert [t["identity"] for t in remote_tracks] == [t["identity"] for t in local_tracks] and local_tracks
    for r, m in zip(remote_tracks, local_tracks):
        assert abs(r["score"] - m["score"]) <= 1e-5 and r["frames"] == m["frames"]


def test_a_url_that_does_not_answer_is_one_line(tmp_path):
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'petal[triton]')")
    dead = f"http://127.0.0.1:{ts.free_port()}"
    with pytest.raises(TritonUnreachable, match=f"Triton server at {dead} does not answer") as info:
        Models(None, backend="triton", url=dead)
    assert "\n" not in str(info.value)
    (tmp_path / "clip.mp4").write_bytes(b"")
    result = rs.run(tmp_path / "clip.mp4", "--gallery", tmp_path / "g.npy", "--triton-url", dead,
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"error: Triton server at {dead} does not answer")
    with pytest.raises(PetalError, match="give its URL"):
        Models(None, backend="triton")
    with pytest.raises(PetalError, match="is for a server backend"):
        Models(None, backend="onnxruntime", url=dead)


def test_server_killed_and_restarted(server, local, faces):
    """Last: a crash of the server under live Models is a one-line error naming the URL; once it is back on
    the same address, the same Models object answers again (HTTP and gRPC)."""
    with Models(None, backend="triton", url=server.http_url) as http_models, \
            Models(None, backend="triton", url=server.grpc_url) as grpc_models:
        before = http_models.embed_gated(faces[:2])
        server.kill()
        for models, url in ((http_models, server.http_url), (grpc_models, server.grpc_url)):
            with pytest.raises(TritonUnreachable) as info:
                models.quality(faces[:2])
            assert str(info.value).startswith(f"Triton server at {url} does not answer") and "\n" not in str(
                info.value)
        started = time.perf_counter()
        server.start()
        restart = time.perf_counter() - started
        for models in (http_models, grpc_models):
            assert cosines(models.embed_gated(faces[:2]), before).min() >= COSINE
    assert cosines(before, local.embed_gated(faces[:2])).min() >= COSINE
    print(f"[triton] restart {restart:.1f} s")
