"""The Triton targets of issue 14, measured: throughput of the recognizer through Triton with 1 and 8
concurrent clients (and the server's own batch sizes), and petal-run on the 720p benchmark clip through
Triton against the local backend (the same people, scores within 1e-5). Prints markdown tables.

    python benchmarks/triton_scaleout.py                 # the tests' stand-in: pytriton's tritonserver,
                                                         # Python backend running the exported ONNX with ORT
    python benchmarks/triton_scaleout.py --instances 2   # two model instances in the stand-in
    python benchmarks/triton_scaleout.py --url grpc://gpu:8001 --models exported/   # a real server serving
                                                         # the petal-export --triton repository of exported/

--models (default: the test suite's export of the default checkpoint) is the local side of the
comparison and, for the stand-in, what it serves. Compare throughput only from a quiet machine: the
load average is printed with the tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from machine import cpu_name, load_average, markdown_table  # noqa: E402  (benchmarks/ is on sys.path as a script)
from runtime import clip_720p, gallery_for, models_folder, real_faces  # noqa: E402


def batch_counts(runner) -> dict[int, int]:
    stats = runner.statistics()["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def throughput(url: str, faces: np.ndarray, clients: int, requests: int) -> dict:
    """`requests` single-face recognizer requests spread over `clients` threads: faces/s, server batches."""
    from petal_runtime.models import Models

    alpha = np.full((1, 1), 0.5, np.float32)
    with Models(None, backend="triton", url=url) as models:
        models.embed(faces[:1], alpha)  # warm, and one connection per thread below
        before = batch_counts(models.recognizer)
        errors: list[BaseException] = []

        def client(k: int) -> None:
            try:
                for i in range(k, requests, clients):
                    models.embed(faces[i % len(faces)][None], alpha)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        if errors:
            raise errors[0]
        after = batch_counts(models.recognizer)
    batches = {size: after[size] - before.get(size, 0) for size in sorted(after) if after[size] - before.get(size, 0)}
    return {"clients": clients, "requests": requests, "seconds": round(seconds, 3),
            "faces_per_s": round(requests / seconds, 2), "server_batches": batches}


def run_clip(models: Path, gallery: Path, clip, where: list[str], out: Path) -> dict:
    from runtime_support import run

    result = run(clip.path, "--gallery", gallery, *where, "--threshold", "0.3", "--json", out, "--no-frames")
    if result.exit_code != 0:
        raise SystemExit(f"petal-run {' '.join(where)} failed:\n{result.output}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a Triton server serving the repository of --models (default: start the "
                                      "local stand-in)")
    parser.add_argument("--models", help="petal-export folder (default: the test suite's export of the default)")
    parser.add_argument("--instances", type=int, default=1, help="model instances in the stand-in's repository")
    parser.add_argument("--clients", default="1,8", help="concurrent client counts to measure")
    parser.add_argument("--requests", type=int, default=64, help="single-face requests per measurement")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the 720p clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-clip", action="store_true", help="throughput only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    models = models_folder(args.models)
    load_before = load_average()
    server = None
    results: dict = {"machine": cpu_name(), "models": str(models)}
    with tempfile.TemporaryDirectory(prefix="petal-triton-bench-") as work:
        work = Path(work)
        url = args.url
        if url is None:
            import triton_support

            from petal_export.triton import TritonOptions, write_repository

            write_repository(models, work / "exported", TritonOptions(instances=args.instances), log=None)
            server = triton_support.LocalTritonServer(
                triton_support.server_venv(), triton_support.python_backend_variant(work / "exported", work / "served"),
                work)
            server.start()
            url = server.http_url
            results["server"] = (f"stand-in: {triton_support.PYTRITON} tritonserver, Python backend running the "
                                 f"exported ONNX with ONNX Runtime, {args.instances} instance(s)")
        else:
            results["server"] = url
        try:
            faces = real_faces(16)
            rows = [throughput(url, faces, int(c), args.requests) for c in args.clients.split(",")]
            results["throughput"] = rows
            if not args.no_clip:
                clip = clip_720p(args.seconds, args.seed)
                gallery = gallery_for(models)
                remote = run_clip(models, gallery, clip, ["--triton-url", url], work / "triton.json")
                local = run_clip(models, gallery, clip, ["--models", str(models), "--backend", "onnxruntime"],
                                 work / "local.json")
                pairs = list(zip(remote["tracks"], local["tracks"]))
                results["clip"] = {
                    "tracks": len(local["tracks"]), "same_tracks": len(remote["tracks"]) == len(local["tracks"]),
                    "same_identities": [t["identity"] for t in remote["tracks"]] == [t["identity"]
                                                                                    for t in local["tracks"]],
                    "max_score_difference": max((abs(r["score"] - m["score"]) for r, m in pairs), default=0.0),
                    "fps_triton": remote["stats"].get("fps"), "fps_local": local["stats"].get("fps"),
                    "identities": [t["identity"] for t in local["tracks"]]}
        finally:
            if server is not None:
                server.stop()
    results["load_average"] = f"{load_before} -> {load_average()}"

    base = results["throughput"][0]["faces_per_s"]
    print(f"Triton: {results['server']}\n{results['machine']}, load {results['load_average']}\n")
    print(markdown_table(["clients", "faces/s", "vs first row", "server batches (size: count)"],
                         [[r["clients"], r["faces_per_s"], f"{r['faces_per_s'] / base:.2f}x", r["server_batches"]]
                          for r in results["throughput"]]))
    if "clip" in results:
        c = results["clip"]
        print()
        print(markdown_table(["720p clip", "tracks", "same identities", "max score difference", "fps"],
                             [["triton vs local", c["tracks"], c["same_identities"],
                               f"{c['max_score_difference']:.1e}", f"{c['fps_triton']} vs {c['fps_local']}"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
