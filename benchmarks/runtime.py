"""Runtime speed on this CPU: end-to-end fps on a 720p clip with three faces, time per stage, the
recognizer alone (ONNX Runtime FP32 and INT8 against PyTorch eager on the same model, as ratios
measured side by side), and what quality-aware selection saves. Prints markdown tables.

    python benchmarks/runtime.py                      # the test suite's export of the default checkpoint
    python benchmarks/runtime.py --models exported/   # a petal-export folder
    python benchmarks/runtime.py --json bench.json --seconds 6

Everything is measured in one run on one machine; the recognizer engines are timed in interleaved
rounds (A, B, C, A, B, C, ...) and the median per-round time is reported, so a machine shared with
other work biases all of them alike. The load average before and after is printed with the tables:
compare numbers only from runs on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


from machine import cpu_name, load_average, markdown_table as _table  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

# ----------------------------------------------------------------------------- inputs


def models_folder(path: str | None) -> Path:
    if path:
        return Path(path)
    import runtime_support

    return runtime_support.exported_models()


def clip_720p(seconds: float, seed: int):
    import runtime_support

    return runtime_support.synth_clip("bench720", count=3, seed=seed, width=1280, height=720, seconds=seconds,
                                      face_px=(16, 48))


def gallery_for(models: Path) -> Path:
    import runtime_support

    return runtime_support.lfw_gallery(models)


def real_faces(count: int) -> np.ndarray:
    """Aligned real faces (LFW10) as the recognizer's input, float32 [count, 3, 112, 112]."""
    from petal_runtime.contract import to_model_input
    from petal_runtime.gallery import ImageFaceAligner, image_files, read_image

    aligner = ImageFaceAligner()
    faces = []
    for path in image_files([REPO.parent / "shared" / "data" / "faces" / "lfw10"]):
        face = aligner(read_image(path))
        if face is not None:
            faces.append(face)
        if len(faces) >= count:
            break
    batch = to_model_input(np.stack(faces))
    reps = int(np.ceil(count / len(batch)))
    return np.concatenate([batch] * reps)[:count]


# ----------------------------------------------------------------------------- end to end


def end_to_end(models: Path, gallery: Path, clip, selection: str, threads: int | None, detect_every: int) -> dict:
    from petal_runtime.pipeline import Pipeline, PipelineConfig

    config = PipelineConfig(selection=selection, detect_every=detect_every)
    with Pipeline.from_dir(models, gallery, config=config, threads=threads) as pipeline:
        # Warm-up on a few frames (session start-up, first allocations), then a fresh run.
        warm = pipeline.run(str(clip.path))
        for i, _ in enumerate(warm):
            if i >= 5:
                break
        warm.close()  # stops and joins its threads before the counters are reset
        pipeline.reset()
        start, cpu = time.perf_counter(), time.process_time()
        frames = sum(1 for _ in pipeline.run(str(clip.path)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        tracks = pipeline.tracks(min_frames=3)
        stats = pipeline.stats.to_dict()
    # CPU time is what this process itself used, whatever else runs on the machine: on idle cores the
    # pipeline could reach at most cores / (CPU seconds per frame).
    cpu_ms = 1000 * cpu / frames
    return {"selection": selection, "frames": frames, "wall_s": wall, "fps": frames / wall, "stats": stats,
            "cpu_ms_per_frame": cpu_ms, "fps_bound": (os.cpu_count() or 1) * 1000 / cpu_ms,
            "tracks": [(t.identity, round(float(t.score), 3), t.frames) for t in tracks],
            "truth": clip.identities}


def sequential_profile(models: Path, gallery: Path, clip, threads: int | None, detect_every: int) -> dict:
    """Every stage in one thread through the process() API: clean per-stage times that add up."""
    import av

    from petal_runtime.pipeline import Pipeline, PipelineConfig

    config = PipelineConfig(detect_every=detect_every)
    with Pipeline.from_dir(models, gallery, config=config, threads=threads) as pipeline:
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decode = 0.0
            frames = container.decode(stream)
            for i in range(clip.frames):
                start = time.perf_counter()
                try:
                    image = next(frames).to_ndarray(format="bgr24")
                except StopIteration:
                    break
                decode += time.perf_counter() - start
                if i == 5:  # warm-up done: count from here
                    pipeline.stats.stage_seconds = {k: 0.0 for k in pipeline.stats.stage_seconds}
                    decode, counted = 0.0, 0
                pipeline.process(image)
                counted = counted + 1 if i >= 5 else 0
        stage = {k: 1000 * v / counted for k, v in pipeline.stats.stage_seconds.items()}
        stage["decode"] = 1000 * decode / counted
    return {"stage_ms": stage, "total_ms": sum(stage.values()), "frames": counted}


# ----------------------------------------------------------------------------- recognizer alone


def int8_graph(models: Path, faces: np.ndarray, workdir: Path) -> tuple[Path | None, str]:
    """The export's recognizer.int8.onnx, or a static QDQ quantisation made here from real faces."""
    exported = models / "recognizer.int8.onnx"
    if exported.is_file():
        return exported, "petal-export recognizer.int8.onnx"
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        return None, f"onnxruntime.quantization unavailable ({exc})"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": faces[i:i + 1], "alpha": np.full((1, 1), 0.5, np.float32)}
                               for i in range(min(32, len(faces)))])

        def get_next(self):
            return next(self.items, None)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser warns once per folded BatchNorm
    pre = workdir / "recognizer.pre.onnx"
    out = workdir / "recognizer.int8.onnx"
    try:
        quant_pre_process(str(models / "recognizer.onnx"), str(pre))
    except Exception:
        pre = models / "recognizer.onnx"
    # U8 activations with 7-bit weights (reduce_range): ONNX Runtime's fast integer path on x86 CPUs
    # without VNNI, and reduce_range avoids the AVX2 u8s8 saturation that costs accuracy. (S8S8 QDQ
    # ran slower than FP32 on the AMD EPYC of the development machines.)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
    return out, ("static QDQ INT8, U8 activations / S8 weights with reduce_range (onnxruntime.quantization, "
                 "32 real LFW faces for calibration, made by this benchmark)")


def eager_recognizer(manifest: dict, checkpoint: str | None):
    """The PyTorch model the export came from: --checkpoint, else the shipped default when the
    manifest's checkpoint hash matches it, else the untrained PETAL SFace of the same size (noted)."""
    from petal_train.default import default_checkpoint_path
    from petal_runtime.files import sha256_file
    from petal_train.evaluate import load_model
    from petal_train.model import build_recognizer

    exported_from = manifest.get("checkpoint_sha256")
    default = default_checkpoint_path()
    if checkpoint is None and exported_from and default.is_file() and sha256_file(default) == exported_from:
        checkpoint = str(default)
    if checkpoint is not None:
        return load_model(checkpoint, device="cpu").recognizer, None
    note = None
    if exported_from:
        note = "(export of an unknown checkpoint: PyTorch eager runs the untrained PETAL SFace of the same size)"
    return build_recognizer("sface").recognizer.eval(), note


def recognizer_speed(models: Path, threads: int, rounds: int, faces: np.ndarray,
                     checkpoint: str | None = None) -> tuple[list[list], dict]:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(threads)
    engines = {}

    def ort_session(path: Path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x, a: session.run(["embedding"], {"image": x, "alpha": a})[0]

    engines["ONNX Runtime FP32"] = ort_session(models / "recognizer.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        int8_path, int8_note = int8_graph(models, faces, Path(tmp))
        if int8_path is not None:
            engines["ONNX Runtime INT8"] = ort_session(int8_path)
        recognizer, ckpt = eager_recognizer(json.loads((models / "manifest.json").read_text()), checkpoint)

        def eager(x, a):
            with torch.inference_mode():
                return recognizer(torch.from_numpy(x), torch.from_numpy(a)).numpy()

        engines["PyTorch eager"] = eager
        reference = eager(faces[:8], np.full((8, 1), 0.5, np.float32))
        agreement = {}
        for name, fn in engines.items():
            out = fn(faces[:8], np.full((8, 1), 0.5, np.float32))
            agreement[name] = float(np.mean(np.sum(out * reference, axis=1)))
        results: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in engines}
        cpu: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in engines}
        for batch in (1, 32):
            x = np.ascontiguousarray(faces[:batch])
            a = np.full((batch, 1), 0.5, np.float32)
            for fn in engines.values():  # warm-up
                fn(x, a)
            reps = 8 if batch == 1 else 1
            for _ in range(rounds):
                for name, fn in engines.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    for _ in range(reps):
                        fn(x, a)
                    results[name][batch].append((time.perf_counter() - start) / (reps * batch))
                    cpu[name][batch].append((time.process_time() - start_cpu) / (reps * batch))
    base = {b: statistics.median(results["PyTorch eager"][b]) for b in (1, 32)}
    rows = []
    for name in engines:
        per_face = {b: statistics.median(results[name][b]) for b in (1, 32)}
        cpu_ms = {b: 1000 * statistics.median(cpu[name][b]) for b in (1, 32)}
        rows.append([name, f"{1 / per_face[1]:.1f}", f"{1 / per_face[32]:.1f}", f"{base[1] / per_face[1]:.2f}x",
                     f"{base[32] / per_face[32]:.2f}x", f"{cpu_ms[1]:.1f}", f"{cpu_ms[32]:.1f}",
                     f"{agreement[name]:.4f}"])
    return rows, {"int8": int8_note, "note": ckpt}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models",
                        help="petal-export folder (default: the test suite's export of the default checkpoint)")
    parser.add_argument("--checkpoint", help="the checkpoint --models was exported from, for the PyTorch column "
                        "(default: the shipped one when the manifest's hash matches)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the 720p clip")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per session (pipeline)")
    parser.add_argument("--recognizer-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds for the recognizer")
    parser.add_argument("--detect-every", type=int, default=4)
    parser.add_argument("--skip-all", action="store_true", help="skip the selection=all end-to-end run")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    load_before = load_average()
    models = models_folder(args.models)
    clip = clip_720p(args.seconds, args.seed)
    gallery = gallery_for(models)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average before {load_before}", file=sys.stderr)
    print(f"clip: {clip.path.name} {clip.width}x{clip.height}, {clip.frames} frames, people {clip.identities}",
          file=sys.stderr)

    runs = [end_to_end(models, gallery, clip, "best", args.threads, args.detect_every)]
    if not args.skip_all:
        runs.append(end_to_end(models, gallery, clip, "all", args.threads, args.detect_every))
    profile = sequential_profile(models, gallery, clip, args.threads, args.detect_every)
    faces = real_faces(32)
    rec_rows, rec_notes = recognizer_speed(models, args.recognizer_threads, args.rounds, faces, args.checkpoint)
    load_after = load_average()

    out = []
    out.append(f"## Runtime on {cpu_name()} ({os.cpu_count()} cores), load average {load_before} -> {load_after}\n")
    out.append(f"End to end, {clip.width}x{clip.height} H.264, {clip.frames} frames, three people at 16-48 px, "
               f"ONNX Runtime CPU, detection every {args.detect_every} frames (around tracks in between):\n")
    rows = []
    for r in runs:
        s = r["stats"]
        rows.append([r["selection"], f"{r['fps']:.1f}", f"{r['cpu_ms_per_frame']:.1f}", f"{r['fps_bound']:.1f}",
                     r["frames"], s["faces"], s["recognized"],
                     f"{100 * s['selection_saving']:.0f}%", ", ".join(f"{n} ({sc})" for n, sc, _ in r["tracks"])])
    out.append(_table(["selection", "fps (wall)", "CPU ms/frame", f"fps bound ({os.cpu_count()} idle cores)", "frames",
                       "faces (IQA)", "recognizer runs", "saved", "tracks"], rows))
    out.append(f"\nTime per stage, every stage in one thread (process() API, selection best, "
               f"{profile['frames']} frames after warm-up), ms per frame:\n")
    out.append(_table(["stage", "ms/frame", "share"],
                      [[k, f"{v:.2f}", f"{100 * v / profile['total_ms']:.0f}%"] for k, v in profile["stage_ms"].items()]
                      + [["total", f"{profile['total_ms']:.1f}",
                          f"= {1000 / profile['total_ms']:.1f} fps on one thread"]]))
    out.append("\nThe same stages in the threaded run (wall ms per frame; they overlap, and waiting for a core "
               "counts):\n")
    stages = list(runs[0]["stats"]["stage_ms_per_frame"])
    out.append(_table(["stage", *[r["selection"] for r in runs]],
                      [[st, *[f"{r['stats']['stage_ms_per_frame'][st]:.2f}" for r in runs]] for st in stages]))
    out.append(f"\nRecognizer alone ({args.recognizer_threads} threads, real LFW faces, median of {args.rounds} "
               "interleaved rounds):\n")
    out.append(_table(["engine", "faces/s batch 1", "faces/s batch 32", "vs PyTorch b1", "vs PyTorch b32",
                       "CPU ms/face b1", "CPU ms/face b32", "cosine to PyTorch"], rec_rows))
    out.append(f"\nINT8 graph: {rec_notes['int8']}.")
    if rec_notes["note"]:
        out.append(rec_notes["note"])
    if len(runs) == 2:
        recognize_ms = [run["stats"]["stage_ms_per_frame"]["recognize"] for run in runs]
        saved_ms = recognize_ms[1] - recognize_ms[0]
        out.append(f"\nQuality-aware selection: the recognizer ran on {runs[0]['stats']['recognized']} of "
                   f"{runs[0]['stats']['faces']} crops ({100 * runs[0]['stats']['selection_saving']:.0f}% saved), "
                   f"{saved_ms:.1f} ms of recognizer time per frame less than on every crop; "
                   f"{runs[0]['fps']:.1f} fps against {runs[1]['fps']:.1f} fps.")
    text = "\n".join(out)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "profile": profile, "recognizer": rec_rows,
                                               "notes": rec_notes, "load": [load_before, load_after],
                                               "cpu": cpu_name()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
