"""`petal-train grad-report`: the paper's gradient analysis on this data.

PETALface argues that full fine-tuning on a small low-resolution set forgets the pretrained
model because the first updates hit every pretrained weight with large gradients, while the
adapters leave those weights untouched and take small, low-rank steps. This command measures it:
one batch of degraded training faces (the trainer's own pipeline, `--p-clean 0` by default so
every face is degraded), the same head initialised from clean embeddings, and one backward pass in
`full` mode and in `petal` mode (nothing is updated). It writes a PNG with the histogram of
log10 |gradient| over the backbone's trainable parameters of each mode and the gradient norm per
layer, and a JSON file beside it with the numbers.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Sequence

import click
import numpy as np
import torch

from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path, atomic_write_text

MODES = ("full", "petal")


def first_iteration_gradients(data: str, mode: str, *, backbone: str = "sface", rank: int = 8, batch_size: int = 8,
                              seed: int = 0, p_clean: float = 0.0, iqa: str | None = None,
                              calibration: str | None = None, device: str = "cpu",
                              holdout_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    """Backbone and head gradients of the first training step of `mode` on the first batch."""
    from .distributed import DistContext, resolve_device
    from .fit import FitConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        config = FitConfig(data=data, out=tmp, backbone=backbone, mode=mode, rank=rank, batch_size=batch_size,
                           seed=seed, p_clean=p_clean, iqa=iqa, calibration=calibration, device=device,
                           holdout_fraction=holdout_fraction, progress=False, head_init="embeddings")
        config.validate()
        trainer = Trainer(config, DistContext(device=resolve_device(device)))
        trainer.batches.set_epoch(0)
        trainer.dataset.set_epoch(0)
        samples = [trainer.dataset[i] for i in next(iter(trainer.batches))]
        images = torch.stack([sample[0] for sample in samples])
        labels = torch.tensor([sample[-1] for sample in samples])
        # Distillation adds nothing at the first iteration (the adapted model is the frozen one).
        return trainer.gradients(images, labels)


def _layer_of(name: str) -> str:
    """recognizer.backbone.blocks.conv_3.conv.trainable_lora_up.weight -> blocks.conv_3 (one block)."""
    parts = [p for p in name.removeprefix("recognizer.").removeprefix("backbone.").split(".")[:-1]
             if not p.startswith("trainable_lora")]
    return ".".join(parts[:2] if parts[:1] == ["blocks"] else parts[:1]) or name


def summarize(grads: dict[str, torch.Tensor]) -> dict:
    backbone = {k: v for k, v in grads.items() if not k.startswith("head.")}
    flat = torch.cat([v.flatten() for v in backbone.values()]) if backbone else torch.zeros(0)
    nonzero = flat[flat != 0].abs()
    layers: dict[str, float] = {}
    for name, g in backbone.items():
        layers[_layer_of(name)] = math.sqrt(layers.get(_layer_of(name), 0.0) ** 2 + float(g.norm()) ** 2)
    head = grads.get("head.weight")
    return {"trainable_backbone_parameters": int(flat.numel()), "nonzero_gradients": int(nonzero.numel()),
            "backbone_grad_l2": float(flat.norm()), "head_grad_l2": float(head.norm()) if head is not None else 0.0,
            "mean_abs": float(nonzero.mean()) if nonzero.numel() else 0.0,
            "max_abs": float(nonzero.max()) if nonzero.numel() else 0.0,
            "median_abs": float(nonzero.median()) if nonzero.numel() else 0.0,
            "layer_grad_l2": layers}


def plot_report(grads: dict[str, dict[str, torch.Tensor]], summary: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    logs = {}
    for mode, g in grads.items():
        flat = torch.cat([v.flatten() for k, v in g.items() if not k.startswith("head.")]).abs()
        logs[mode] = torch.log10(flat[flat > 0]).numpy()
    lo = min(float(v.min()) for v in logs.values() if v.size)
    hi = max(float(v.max()) for v in logs.values() if v.size)
    bins = np.linspace(lo, hi, 80)
    for mode, values in logs.items():
        s = summary[mode]
        left.hist(values, bins=bins, alpha=0.55, label=f"{mode}: {s['nonzero_gradients']:,} nonzero, "
                                                        f"L2 {s['backbone_grad_l2']:.3g}")
    left.set(xlabel="log10 |gradient|", ylabel="parameters", yscale="log",
             title="first-iteration gradients (backbone)")
    left.legend(fontsize=8)
    order: list[str] = []
    for mode in grads:
        order += [name for name in summary[mode]["layer_grad_l2"] if name not in order]
    for mode in grads:
        layers = summary[mode]["layer_grad_l2"]
        xs = [i for i, name in enumerate(order) if name in layers]
        right.plot(xs, [layers[order[i]] for i in xs], marker="o", markersize=3, label=mode)
    right.set(xlabel="layer (input to output)", ylabel="gradient L2 norm", yscale="log", title="per layer")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def gradient_report(data: str, out: str | Path, modes: Sequence[str] = MODES, **kwargs) -> dict:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PetalError(f"--out names the PNG to write (e.g. grads.png), got {out}")
    grads = {mode: first_iteration_gradients(data, mode, **kwargs) for mode in modes}
    summary = {mode: summarize(g) for mode, g in grads.items()}
    plot_report(grads, summary, out)
    report = {"data": str(data), "modes": summary,
              "settings": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, type(None)))}}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2))
    return report


@click.command("grad-report")
@click.option("--data", required=True, help="Identity-folder tree, TinyFace root, RecordIO or `portraits`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write (JSON goes beside it).")
@click.option("--backbone", default="sface", show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--p-clean", default=0.0, show_default=True, help="Probability a face is left undegraded.")
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False))
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(("auto", "cpu", "cuda")), default="auto", show_default=True)
def grad_report_command(data, out, **options) -> None:
    """Histogram of first-iteration gradients: full fine-tuning against petal."""
    report = gradient_report(data, out, **options)
    for mode, s in report["modes"].items():
        click.echo(f"{mode:6s} trainable {s['trainable_backbone_parameters']:>10,}  "
                   f"nonzero {s['nonzero_gradients']:>10,}"
                   f"  L2 {s['backbone_grad_l2']:.4g}  max |g| {s['max_abs']:.3g}")
    click.echo(f"wrote {out} and {Path(out).with_suffix('.json')}")
