"""Gallery identify latency, exact vs the ANN index (petal-gallery index), and the index's recall@1 against exact.

    python benchmarks/gallery_search.py                                  # 10k, 100k, 1M identities
    python benchmarks/gallery_search.py --sizes 1000000 --reuse          # keep the 1M gallery and index

Galleries: N random 128-d unit vectors (seeded; the hard case for a graph index, which gets no
clusters to use). Queries: noisy copies of random gallery rows at cosine 0.5-0.7 to their row (a
degraded face of someone enrolled), normalised float32, one `Gallery.identify(top_k=5)` at a time.
The index is built through the same code as `petal-gallery index` (`ann.build_index`) and loaded
as `Gallery.load(path, index="ann")`; recall@1 is the share of queries whose ANN identity equals the
exact search's. Results are merged into benchmarks/results/gallery_search.json by size, so sizes can
be measured in separate runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import cpu_name, load_average  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def random_gallery(n: int, dim: int, seed: int):
    from petal_runtime.gallery import Gallery, gallery_dtype

    rng = np.random.default_rng(seed)
    entries = np.zeros(n, gallery_dtype(dim))
    entries["name"] = np.char.add("id", np.arange(n).astype(str))
    entries["count"] = 1
    for lo in range(0, n, 100_000):  # in chunks: no second [N, D] float32 copy
        x = rng.standard_normal((min(n, lo + 100_000) - lo, dim), dtype=np.float32)
        entries["embedding"][lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return Gallery(entries, {"models_sha256": "benchmark-random-" + "0" * 47})


def noisy_queries(matrix: np.ndarray, count: int, seed: int, cos=(0.5, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(matrix), count)
    base = matrix[rows]
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    c = rng.uniform(*cos, (count, 1)).astype(np.float32)
    queries = c * base + np.sqrt(1 - c * c) * noise
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32), rows


def timed_identify(gallery, queries: np.ndarray, top_k: int = 5) -> tuple[list[float], list]:
    times, matches = [], []
    for query in queries:
        t = time.perf_counter()
        matches.append(gallery.identify(query, threshold=0.3, top_k=top_k))
        times.append(time.perf_counter() - t)
    return times, matches


def measure(n: int, args) -> dict:
    from petal_runtime.ann import build_index, index_path, load_index
    from petal_runtime.errors import PetalError
    from petal_runtime.gallery import Gallery

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"random-{n}-{args.dim}d-seed{args.seed}.npy"
    params = dict(connectivity=args.connectivity, expansion_add=args.expansion_add, dtype=args.dtype)
    t0 = time.perf_counter()
    if not (args.reuse and path.is_file()):
        random_gallery(n, args.dim, args.seed).save(path)
    gallery = Gallery.load(path, index="exact")
    make_s = time.perf_counter() - t0
    index, build_s, reused = None, None, False
    if args.reuse:
        try:
            index = load_index(gallery, path, "ann")
            reused = all(getattr(index.meta, k) == v for k, v in params.items())
            index = index if reused else None
        except PetalError:
            index = None
    if index is None:
        print(f"  {n}: building the index ({params}) ...", flush=True, file=sys.stderr)
        cpu0 = time.process_time()
        build_index(gallery, path, expansion_search=args.expansion_search[0], threads=args.threads, **params)
        build_cpu_s = time.process_time() - cpu0
    else:
        build_cpu_s = None
    ann = Gallery.load(path, index="ann")
    build_s = ann.index.meta.build_seconds
    exact = Gallery(gallery.entries, gallery.meta, path)  # the same rows, searched exactly
    queries, rows = noisy_queries(exact.embeddings, args.queries, args.seed + 1)
    ann.embeddings  # noqa: B018 - the matrix is built once per gallery, not in the first query's time
    exact_times, exact_matches = timed_identify(exact, queries)
    truth = [m.identity for m in exact_matches]
    row = {"identities": n, "dim": args.dim, "queries": args.queries,
           "exact_p50_ms": round(1000 * _percentile(exact_times, 50), 3),
           "exact_p99_ms": round(1000 * _percentile(exact_times, 99), 3),
           "exact_is_source_row": round(float(np.mean([t == exact.names[r] for t, r in zip(truth, rows)])), 4),
           "index": {**params, "index_mib": round(index_path(path).stat().st_size / 2**20, 1),
                     "build_s": build_s, "build_cpu_s": None if build_cpu_s is None else round(build_cpu_s, 1),
                     "reused": reused, "gallery_make_load_s": round(make_s, 1)},
           "ann": []}
    for ef in args.expansion_search:
        ann.index.expansion_search = ef
        times, matches = timed_identify(ann, queries)
        row["ann"].append({"expansion_search": ef, "candidates": ann.index.candidate_count,
                           "p50_ms": round(1000 * _percentile(times, 50), 3),
                           "p99_ms": round(1000 * _percentile(times, 99), 3),
                           "recall_at_1": round(float(np.mean([m.identity == t for m, t in zip(matches, truth)])), 4),
                           "top5_same": round(float(np.mean([[a for a, _ in m.top_k] == [b for b, _ in e.top_k]
                                                             for m, e in zip(matches, exact_matches)])), 4)})
        print(f"  {n}: ef {ef}: {row['ann'][-1]}", flush=True, file=sys.stderr)
    if not args.reuse:
        for p in path.parent.glob(path.stem + ".*"):
            p.unlink()
        path.with_name(path.name + ".json").unlink(missing_ok=True)
    return row


def table(rows: list[dict]) -> str:
    out = ["| identities | exact p50 / p99 (ms) | ANN ef | ANN p50 / p99 (ms) | ANN recall@1 | top-5 same "
           "| index build (s) | index (MiB) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["identities"]):
        for i, a in enumerate(r["ann"]):
            exact = f"{r['exact_p50_ms']} / {r['exact_p99_ms']}" if i == 0 else ""
            build = f"{r['index']['build_s']}" if i == 0 else ""
            mib = f"{r['index']['index_mib']}" if i == 0 else ""
            out.append(f"| {r['identities']:,} | {exact} | {a['expansion_search']} | {a['p50_ms']} / {a['p99_ms']} "
                       f"| {a['recall_at_1']} | {a['top5_same']} | {build} | {mib} |")
    return "\n".join(out)


def main() -> None:
    from petal_runtime import ann

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connectivity", type=int, default=ann.DEFAULT_CONNECTIVITY)
    parser.add_argument("--expansion-add", type=int, default=ann.DEFAULT_EXPANSION_ADD)
    parser.add_argument("--expansion-search", default=str(ann.DEFAULT_EXPANSION_SEARCH),
                        help="comma-separated: each is measured on the same index")
    parser.add_argument("--dtype", default=ann.DEFAULT_DTYPE, choices=ann.DTYPES)
    parser.add_argument("--threads", type=int, default=None, help="index build threads (default: all cores)")
    parser.add_argument("--workdir", default=str(HERE / "runs" / "gallery_search"),
                        help="where the galleries and indexes are written (removed after, unless --reuse)")
    parser.add_argument("--reuse", action="store_true", help="keep the galleries and indexes and reuse them")
    parser.add_argument("--json", default=str(HERE / "results" / "gallery_search.json"))
    args = parser.parse_args()
    args.expansion_search = [int(x) for x in args.expansion_search.split(",") if x.strip()]

    load_before = load_average()
    rows = [measure(int(s), args) for s in args.sizes.split(",") if s.strip()]
    machine = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "load_before": load_before,
               "load_after": load_average(), "nice": os.nice(0)}
    out = Path(args.json)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    merged = {r["identities"]: r for r in previous.get("sizes", [])}
    for r in rows:
        merged[r["identities"]] = {**r, "machine": machine}
    result = {"benchmark": "benchmarks/gallery_search.py", "queries": "noisy gallery rows at cosine 0.5-0.7, top_k 5",
              "sizes": [merged[k] for k in sorted(merged)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, nice {machine['nice']}; "
          f"load average {load_before} before, {machine['load_after']} after")
    print(table(result["sizes"]))


if __name__ == "__main__":
    main()
