"""Choose the shipped adapter scales on the development identities, never on the evaluation ones.

The release knobs (`petal-train release --adapter-scale S --high-branch-scale H`) trade low-resolution
gain against what the frozen base already did well (sharp faces, clean third-party downsampling). Choosing
them on the benchmark's evaluation part would tune to the test, so they are chosen here, by a rule fixed
before any candidate is measured, on faces the candidate never trained on and the benchmark never reports:

- the 200 development identities (petal_train/splits/lfw_dev.txt), dropped from the checkpoint's training
  (`--drop-dev-identities`, the `petal-plain-dev` row of lowres.py), enrolled by their first image with the
  609 portraits as distractors, the last 60 left out for the open set;
- probes: the training composition at 16/20/24/32 px and undegraded; clean area and cubic downsampling and
  grayscale (a third party's low-resolution set) at 16 and 24 px, every probe.

The rule: keep the candidates that are no worse than frozen on sharp faces (undegraded rank-1 and HR
verification, >= frozen - 0.3), on every clean-downsampling / grayscale probe set (>= frozen - 1) and on the
open set (DIR at FAR 1 % >= frozen at every size); of those, the best mean rank-1 over 16-32 px. Where none
passes, the one with the fewest failed checks (then the best mean rank-1).

    python benchmarks/select_release.py --checkpoint benchmarks/runs/petal-plain-dev/ckpt.pt
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from lowres import PROBE_PX, SHARED_FACES, build_protocol, evaluate_row  # noqa: E402

from petal_runtime.files import atomic_write_text  # noqa: E402
from petal_train import splits  # noqa: E402
from petal_train.evaluate import load_model  # noqa: E402
from petal_train.faces import load_identity_folders, load_portraits  # noqa: E402

# (adapter scale, high-branch scale), fixed before measuring: the trained adapters, two interpolations
# toward the frozen base, and each with the high branch (sharp faces) at half of it.
CANDIDATES = ((1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (1.0, 0.5), (0.75, 0.375))
DEV_FAMILIES = ("downsample-area", "downsample-cubic", "grayscale")
DEV_FAMILY_PX = (16, 24)
DEV_UNENROLLED = 60
SHARP_TOLERANCE, FAMILY_TOLERANCE = 0.003, 0.01


def name_of(low: float, high: float) -> str:
    return f"x{low:g}" if low == high else f"x{low:g}-high{high:g}"


def checks(row: dict, frozen: dict) -> dict[str, bool]:
    """Each of the rule's constraints: True where the candidate passes it."""
    ident, base = row["identification"], frozen["identification"]
    hr, hr_base = row["verification"]["lfw"]["accuracy"], frozen["verification"]["lfw"]["accuracy"]
    out = {"clean rank-1": ident["clean"]["rank-1"] >= base["clean"]["rank-1"] - SHARP_TOLERANCE,
           "HR verification": hr >= hr_base - SHARP_TOLERANCE}
    for name, value in row["families"].items():
        out[name] = value >= frozen["families"][name] - FAMILY_TOLERANCE
    for px in PROBE_PX:
        out[f"DIR@1% {px}px"] = ident[f"{px}px"]["DIR@FAR=0.01"] >= base[f"{px}px"]["DIR@FAR=0.01"]
    return out


def mean_rank1(row: dict) -> float:
    return float(np.mean([row["identification"][f"{px}px"]["rank-1"] for px in PROBE_PX]))


def choose(rows: dict[str, dict]) -> tuple[str, dict[str, list[str]]]:
    """The rule (module docstring) over measured rows ('frozen' among them): the chosen name and each one's failures."""
    failed = {name: [k for k, ok in checks(row, rows["frozen"]).items() if not ok]
              for name, row in rows.items() if name != "frozen"}
    best = min(failed, key=lambda n: (len(failed[n]), -mean_rank1(rows[n])))
    return best, failed


def table(rows: dict[str, dict], failed: dict[str, list[str]], chosen: str) -> str:
    sizes = " | ".join(f"{px} px" for px in PROBE_PX)
    out = [f"| candidate | {sizes} | clean | HR | DIR@1% {'/'.join(map(str, PROBE_PX))} | families (mean) | failed |",
           "|---|" + "---|" * (len(PROBE_PX) + 5)]
    for name, row in rows.items():
        ident = row["identification"]
        cells = [f"{100 * ident[f'{px}px']['rank-1']:.1f}" for px in PROBE_PX]
        dirs = "/".join(f"{100 * ident[f'{px}px']['DIR@FAR=0.01']:.1f}" for px in PROBE_PX)
        fam = 100 * float(np.mean(list(row["families"].values())))
        fails = "-" if name == "frozen" else (", ".join(failed[name]) or "none")
        mark = " (chosen)" if name == chosen else ""
        out.append(f"| {name}{mark} | {' | '.join(cells)} | {100 * ident['clean']['rank-1']:.1f} | "
                   f"{100 * row['verification']['lfw']['accuracy']:.1f} | {dirs} | {fam:.1f} | {fails} |")
    return "\n".join(out)


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A run trained without the development identities (lowres.py row petal-plain-dev).")
@click.option("--iqa", default=str(ROOT / "petal_train" / "weights" / "iqa_faces.pth"), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results" / "select_release.json"), show_default=True)
def main(checkpoint: str, iqa: str, seed: int, out: str) -> None:
    """Measure every candidate on the development identities and apply the rule."""
    from petal_train.checkpoint import load_checkpoint

    dropped = load_checkpoint(checkpoint).training.get("config", {}).get("drop_dev_identities")
    if not dropped:
        raise SystemExit(f"error: {checkpoint} trained on the development identities (no --drop-dev-identities)")
    started = time.time()
    lfw = load_identity_folders(SHARED_FACES / "lfw", progress=True)
    protocol = build_protocol(lfw, load_identity_folders(SHARED_FACES / "orl40"), load_portraits().images, seed,
                              DEV_FAMILIES, identities=splits.development_identities(), unenrolled=DEV_UNENROLLED,
                              family_stride=1, family_px=DEV_FAMILY_PX)
    del lfw
    protocol.hr_pairs.pop("orl40")  # orl40 is an evaluation set
    print(f"development protocol: {len(protocol.gallery)} gallery entries, {len(protocol.probes)} probes", flush=True)
    rows = {"frozen": evaluate_row(load_model(None), protocol)}
    for low, high in CANDIDATES:
        rows[name_of(low, high)] = evaluate_row(load_model(checkpoint, iqa=iqa, adapter_scale=low,
                                                           high_branch_scale=high), protocol)
        print(f"[{name_of(low, high)}] {rows[name_of(low, high)]['seconds']:.0f} s", flush=True)
    chosen, failed = choose(rows)
    low, high = dict((name_of(*c), c) for c in CANDIDATES)[chosen]
    record = {"checkpoint": str(checkpoint), "seed": seed, "candidates": [list(c) for c in CANDIDATES],
              "chosen": {"name": chosen, "adapter_scale": low, "high_branch_scale": high}, "failed": failed,
              "rows": rows, "seconds": round(time.time() - started)}
    atomic_write_text(Path(out), json.dumps(record, indent=2))
    print(table(rows, failed, chosen))
    print(f"chosen: {chosen}: petal-train release CKPT --adapter-scale {low:g} --high-branch-scale {high:g} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
