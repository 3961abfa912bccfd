"""What the adapters cost at the edge: the exported recognizer against the plain SFace it adapts.

Both graphs on ONNX Runtime's CPU provider with the same thread count, one real aligned face at a
time (batch 1, what a camera loop runs), timed in interleaved rounds so machine noise hits both
alike. Prints the median ms per face and the ratio; writes benchmarks/results/recognizer_cost.json.

    python benchmarks/recognizer_cost.py --models exported/        # a petal-export folder
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name, load_average  # noqa: E402
from petal_runtime.files import atomic_write_text  # noqa: E402


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def plain_sface(path: Path, workdir: Path) -> Path:
    """The zoo's SFace with its weights no longer listed as graph inputs: as published, ONNX Runtime
    may not fold them (BatchNorm stays unfused), which would flatter the exported graph."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    out = workdir / "sface_plain.onnx"
    onnx.save(model, str(out))
    return out


def timed(run, rounds: int, reps: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        out.append(1000 * (time.perf_counter() - start) / reps)
    return out


@click.command()
@click.option("--models", required=True, type=click.Path(exists=True, file_okay=False), help="A petal-export folder.")
@click.option("--threads", default=2, show_default=True)
@click.option("--rounds", default=15, show_default=True)
@click.option("--reps", default=20, show_default=True, help="Inferences per round and graph.")
@click.option("--out", default=str(ROOT / "benchmarks" / "results" / "recognizer_cost.json"), show_default=True)
def main(models: str, threads: int, rounds: int, reps: int, out: str) -> None:
    """Median ms per face at batch 1: plain SFace, the exported recognizer, and their ratio."""
    from petal_runtime.model_store import SFACE, model_path
    from petal_train.faces import load_identity_folders

    if not (Path(models) / "recognizer.onnx").is_file():
        raise click.UsageError(f"{models} holds no recognizer.onnx: point --models at a petal-export folder")
    faces = load_identity_folders(ROOT.parent / "shared" / "data" / "faces" / "lfw10").images[:1]
    image = np.ascontiguousarray(faces.transpose(0, 3, 1, 2), dtype=np.float32)
    plain = session(plain_sface(model_path(SFACE), Path(tempfile.mkdtemp())), threads)
    plain_input = plain.get_inputs()[0].name
    adapted = session(Path(models) / "recognizer.onnx", threads)
    alpha = np.full((1, 1), 0.5, np.float32)
    runs = {"SFace (plain)": lambda: plain.run(None, {plain_input: image}),
            "PETAL recognizer (adapters + alpha)": lambda: adapted.run(None, {"image": image, "alpha": alpha})}
    for run in runs.values():  # warm-up
        for _ in range(5):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: noise hits both graphs alike
        for name, run in runs.items():
            samples[name] += timed(run, 1, reps)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    ratio = medians["PETAL recognizer (adapters + alpha)"] / medians["SFace (plain)"]
    report = {"ms_per_face": medians, "ratio": ratio, "threads": threads, "batch": 1, "cpu": cpu_name(),
              "load_average": load_average(), "models": str(models)}
    atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n")
    print(f"| graph (ONNX Runtime CPU, {threads} threads, batch 1) | ms per face |\n|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} |")
    print(f"\nratio {ratio:.2f}x (target at most 1.4x); {cpu_name()}, load {load_average()}")


if __name__ == "__main__":
    main()
