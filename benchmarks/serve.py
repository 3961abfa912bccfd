"""petal-serve on this machine: N concurrent 720p sources with three faces each, paced as live cameras
(frames the service is too late for are dropped, as a camera's would be), through one Service in one
process; fps per source, the slowest against the fastest, event latency (frame capture to the event
published), RSS growth; then exact identify latency at 10k / 100k / 1M gallery identities. Prints
markdown tables.

    python benchmarks/serve.py                          # 4 sources, 60 s, galleries 10k,100k,1M
    python benchmarks/serve.py --sources 4 --seconds 600 --json serve.json
    python benchmarks/serve.py --sizes 10000 --seconds 20

The load average before and after is printed with the tables: numbers from a machine shared with
other work are lower bounds of what the service does alone.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from machine import cpu_name, load_average, markdown_table as _table  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_service(models: Path, gallery: Path, clip: Path, sources: int, seconds: float, max_wait_ms: float) -> dict:
    from petal_runtime.serve import ServeConfig, Service

    config = ServeConfig.from_dict({
        "service": {"models": str(models), "gallery": str(gallery), "max_wait_ms": max_wait_ms},
        "http": {"enabled": False},
        "source": [{"name": f"cam{i}", "url": str(clip), "realtime": True, "loop": True} for i in range(sources)]})
    events = io.StringIO()
    rss = []
    with Service(config, stdout=events, log=lambda m: None) as service:
        service.start()
        start = time.monotonic()
        warm = None
        while time.monotonic() - start < seconds:
            time.sleep(1.0)
            rss.append(_rss_mb())
            if warm is None and time.monotonic() - start >= min(10.0, seconds / 3):
                warm = {r.name: r.frames for r in service.runners}, time.monotonic()
        end = {r.name: r.frames for r in service.runners}, time.monotonic()
        status = service.sources_status()
        metrics = service.metrics_text()
        service.stop()
    fps = {name: (end[0][name] - warm[0][name]) / (end[1] - warm[1]) for name in end[0]}
    lines = [json.loads(line) for line in events.getvalue().splitlines() if line.strip()]
    latency = [e["latency_ms"] for e in lines if e["type"] == "identified" and "latency_ms" in e]
    # From the first frame of a track to its identification, in source time (how long a face is in view first).
    started = {(e["source"], e["track_id"]): e["frame_time"] for e in lines if e["type"] == "track_started"}
    to_name = [e["frame_time"] - started[(e["source"], e["track_id"])] for e in lines
               if e["type"] == "identified" and (e["source"], e["track_id"]) in started]
    batch = {}
    for model in ("iqa", "recognizer"):
        s = [float(x.split()[-1]) for x in metrics.splitlines()
             if x.startswith(f'petal_inference_batch_requests_sum{{model="{model}"}}')]
        c = [float(x.split()[-1]) for x in metrics.splitlines()
             if x.startswith(f'petal_inference_batch_requests_count{{model="{model}"}}')]
        batch[model] = round(s[0] / c[0], 2) if s and c and c[0] else None
    base = rss[min(len(rss) - 1, 5)] if rss else float("nan")
    return {"fps": {k: round(v, 2) for k, v in fps.items()},
            "dropped": {s["name"]: s["dropped_frames"] for s in status["sources"]},
            "ratio": round(min(fps.values()) / max(max(fps.values()), 1e-9), 3),
            "event_latency_ms_p50": round(_percentile(latency, 50), 1),
            "event_latency_ms_p95": round(_percentile(latency, 95), 1),
            "track_to_identified_s_p50": round(_percentile(to_name, 50), 2),
            "identified_events": len(latency), "events": len(lines),
            "requests_per_call": batch,
            "rss_mb_start": round(base, 1), "rss_mb_end": round(rss[-1], 1) if rss else None,
            "rss_growth_pct": round(100 * (rss[-1] - base) / base, 2) if rss else None}


def identify_latency(sizes: list[int], dim: int, queries: int, seed: int = 0) -> list[dict]:
    from petal_runtime.gallery import Gallery, gallery_dtype

    rows = []
    rng = np.random.default_rng(seed)
    for n in sizes:
        entries = np.zeros(n, gallery_dtype(dim))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        entries["embedding"] = x
        entries["name"] = np.char.add("id", np.arange(n).astype(str))
        del x
        gallery = Gallery(entries, {})
        t0 = time.perf_counter()
        matrix = gallery.embeddings  # built once, then cached
        build = time.perf_counter() - t0
        probes = matrix[rng.integers(0, n, queries)] + rng.normal(0, 0.02, (queries, dim)).astype(np.float32)
        times, hits = [], 0
        for i, probe in enumerate(probes):
            t = time.perf_counter()
            match = gallery.identify(probe, threshold=0.5, top_k=5)
            times.append(time.perf_counter() - t)
            hits += match.identity != "unknown"
        rows.append({"identities": n, "p50_ms": round(1000 * _percentile(times, 50), 2),
                     "p99_ms": round(1000 * _percentile(times, 99), 2), "matrix_build_s": round(build, 2),
                     "named": hits, "queries": queries})
        del gallery, entries, matrix
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="a petal-export folder (default: the tests' export)")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes for identify latency")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import runtime_support

    models = Path(args.models) if args.models else runtime_support.exported_models()
    gallery = runtime_support.lfw_gallery(models)
    clip = runtime_support.synth_clip("bench720", count=3, seed=0, width=1280, height=720, seconds=6.0,
                                      face_px=(16, 48))
    load_before = load_average()
    serve = run_service(models, gallery, clip.path, args.sources, args.seconds, args.max_wait_ms)
    from petal_runtime.models import Models

    with Models(models) as m:
        dim = m.embedding_size
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    search = identify_latency(sizes, dim, args.queries)
    load_after = load_average()

    print(f"machine: {cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores; "
          f"load average {load_before} before, {load_after} after")
    print(f"\n### {args.sources} concurrent 720p sources, 3 faces each, paced at {clip.fps} fps, {args.seconds:g} s\n")
    rows = [[name, fps, serve["dropped"][name]] for name, fps in serve["fps"].items()]
    print(_table(["source", "fps (analysed)", "dropped frames"], rows))
    print()
    print(_table(["slowest / fastest", "event latency p50 / p95 (ms)", "track start -> identified p50 (s)",
                  "requests per IQA / recognizer call", "RSS start -> end (MB)"],
                 [[serve["ratio"], f"{serve['event_latency_ms_p50']} / {serve['event_latency_ms_p95']}",
                   serve["track_to_identified_s_p50"],
                   f"{serve['requests_per_call']['iqa']} / {serve['requests_per_call']['recognizer']}",
                   f"{serve['rss_mb_start']} -> {serve['rss_mb_end']} ({serve['rss_growth_pct']:+.1f} %)"]]))
    print(f"\n### Exact identify latency ({dim}-d, top-5, one query at a time)\n")
    print(_table(["identities", "p50 (ms)", "p99 (ms)", "matrix build (s, once)"],
                 [[f"{r['identities']:,}", r["p50_ms"], r["p99_ms"], r["matrix_build_s"]] for r in search]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_name(), "load_before": load_before,
                                               "load_after": load_after, "serve": serve, "identify": search,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
