"""Adapter checkpoints: the adapters and the margin head, never the frozen base.

A checkpoint names its backbone and the sha256 of the base weights it was trained on; loading into
another base is refused. `full` fine-tuning is the exception that proves the rule: it has no
adapters, so its checkpoint carries the whole backbone. Files are plain dicts of tensors and
primitives, loaded with `torch.load(weights_only=True)`, and written atomically.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from petal_runtime.errors import PetalError
from petal_runtime.files import atomic_path

from .lora import ADAPTER_KEY, HIGH_UP_SUFFIX, LoRAConfig
from .torch_files import load_torch_file

FORMAT = "petal-adapter-checkpoint"
# What a release checkpoint keeps of the run's progress (no optimizer or RNG state).
RELEASE_PROGRESS = ("status", "epoch", "global_step", "global_batch", "world_size", "elapsed_s")
VERSION = 1


@dataclass
class AdapterCheckpoint:
    backbone: str
    base_sha256: str
    lora: LoRAConfig
    adapters: dict[str, torch.Tensor]
    iqa_sha256: str = ""
    iqa_threshold: float = 0.5
    alpha_clip: bool = True
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    backbone_state: dict[str, torch.Tensor] = field(default_factory=dict)  # `full` mode only
    training: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)  # epoch, step, optimizer/scheduler for resume

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "backbone": self.backbone,
                "base_sha256": self.base_sha256, "lora": self.lora.to_dict(), "adapters": self.adapters,
                "iqa": {"sha256": self.iqa_sha256, "threshold": float(self.iqa_threshold),
                        "alpha_clip": bool(self.alpha_clip)},
                "head": self.head, "backbone_state": self.backbone_state, "training": self.training,
                "progress": self.progress}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterCheckpoint":
        iqa = data.get("iqa", {})
        return cls(backbone=data["backbone"], base_sha256=data["base_sha256"],
                   lora=LoRAConfig.from_dict(data["lora"]), adapters=data.get("adapters", {}),
                   iqa_sha256=iqa.get("sha256", ""), iqa_threshold=float(iqa.get("threshold", 0.5)),
                   alpha_clip=bool(iqa.get("alpha_clip", True)), head=data.get("head", {}),
                   backbone_state=data.get("backbone_state", {}), training=data.get("training", {}),
                   progress=data.get("progress", {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)
        return path

    def for_release(self) -> "AdapterCheckpoint":
        """A shippable copy: no head or optimizer state, adapters stored in FP16 (loading casts back)."""
        from dataclasses import replace

        # The run folder is a path on the training machine: meaningless (and private) elsewhere.
        training = {**self.training, "config": {k: v for k, v in self.training.get("config", {}).items() if k != "out"}}
        return replace(self, adapters={k: v.half() for k, v in self.adapters.items()}, head={}, training=training,
                       backbone_state={k: v.half() if v.is_floating_point() else v
                                       for k, v in self.backbone_state.items()},
                       progress={k: v for k, v in self.progress.items() if k in RELEASE_PROGRESS})

    def with_adapter_scale(self, factor: float, high: float | None = None) -> "AdapterCheckpoint":
        """The same adapters with their output scaled by `factor`: W0 + factor * dW, the frozen base at 0.

        A weight-space interpolation between the frozen recognizer and the trained one (WiSE-FT):
        a smaller factor keeps more of what the base knew, on faces unlike the training degradations.
        `high` scales the high-quality branch alone (default: `factor`); 0 leaves sharp faces
        (alpha = 1) to the frozen base.
        """
        high = factor if high is None else high
        if not 0.0 < factor <= 1.0:
            raise PetalError(f"the adapter scale must be in (0, 1], got {factor}")
        if not 0.0 <= high <= 1.0:
            raise PetalError(f"the high-branch scale must be in [0, 1], got {high}")
        if factor == high == 1.0:
            return self
        if self.backbone_state:
            raise PetalError("a full fine-tuning checkpoint has no adapters to scale")
        if high != factor and self.lora.mode != "petal":
            raise PetalError(f"a {self.lora.mode} checkpoint has one adapter per layer: no high branch to scale")
        from dataclasses import replace

        # The global scale carries `factor`; the high branch's up weights carry the rest of `high`.
        adapters = {k: v * (high / factor) if k.endswith(HIGH_UP_SUFFIX) else v for k, v in self.adapters.items()}
        record = self.training.get("adapter_scale", 1.0)
        low_before, high_before = (record, record) if isinstance(record, float) else (record["low"], record["high"])
        scales = {"low": low_before * factor, "high": high_before * high}
        return replace(self, lora=replace(self.lora, scale=self.lora.scale * factor), adapters=adapters,
                       training={**self.training,
                                 "adapter_scale": scales["low"] if scales["low"] == scales["high"] else scales})

    def apply_to(self, backbone: torch.nn.Module, expected_base_sha256: str) -> None:
        """Load the adapters (or the full state) into an injected backbone built on the same base."""
        if self.base_sha256 != expected_base_sha256:
            raise PetalError(f"checkpoint was trained on {self.backbone} base {self.base_sha256[:12]}, "
                             f"but the loaded base is {expected_base_sha256[:12]}: wrong base weights")
        state = self.backbone_state or self.adapters
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if unexpected:
            raise PetalError(f"checkpoint has {len(unexpected)} keys the model lacks (e.g. {unexpected[0]}); "
                             "was it trained with another --mode or --rank?")
        if not self.backbone_state:
            lacking = [k for k in missing if ADAPTER_KEY in k]
            if lacking:
                raise PetalError(f"checkpoint lacks {len(lacking)} adapter weights (e.g. {lacking[0]})")


def load_checkpoint(path: str | Path) -> AdapterCheckpoint:
    """Read a checkpoint safely (weights_only); any damage becomes a one-line PetalError."""
    path = Path(path)
    data = load_torch_file(path, "checkpoint", "PETAL checkpoint")
    if not isinstance(data, dict) or not isinstance(data.get("format"), str) or data["format"] != FORMAT:
        raise PetalError(f"{path} is not a PETAL adapter checkpoint")
    version = data.get("version")
    if type(version) is not int or version != VERSION:  # noqa: E721 - a tensor or bool is no version
        shown = version if isinstance(version, (int, str, float, type(None))) else type(version).__name__
        raise PetalError(f"{path} has checkpoint version {shown}, expected {VERSION}")
    _check_structure(data, path)
    return AdapterCheckpoint.from_dict(data)


def _check_structure(data: dict, path: Path) -> None:
    """The fields from_dict reads, with their types: a damaged or hand-edited file is a PetalError
    naming the field, never a KeyError or TypeError from deep inside."""
    from petal_runtime.schema import check_value, kind_of

    def fail(what: str) -> None:
        raise PetalError(f"{path} is not a valid PETAL checkpoint: {what}")

    for key in ("backbone", "base_sha256", "lora"):
        if key not in data:
            fail(f"it lacks {key}")
    for key, annotation in (("backbone", "str"), ("base_sha256", "str"), ("lora", "dict[str, Any]"),
                            ("iqa", "dict[str, Any]"), ("adapters", "dict[str, Any]"), ("head", "dict[str, Any]"),
                            ("backbone_state", "dict[str, Any]"), ("training", "dict[str, Any]"),
                            ("progress", "dict[str, Any]")):
        if key in data:
            check_value(data[key], annotation, f"{path}: {key}")
    for key in ("adapters", "head", "backbone_state"):
        for name, value in data.get(key, {}).items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                fail(f"{key} should map names to tensors, found {kind_of(name)} -> {kind_of(value)}")
    lora = data["lora"]
    fields = {f.name: str(f.type) for f in dataclasses.fields(LoRAConfig)}
    unknown = sorted(map(str, set(lora) - set(fields)))
    if unknown:
        fail(f"lora has unknown fields {', '.join(unknown)}")
    for key, annotation in fields.items():
        if key in lora:
            check_value(lora[key], annotation, f"{path}: lora.{key}")
    targets = lora.get("targets", [])
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        fail("lora.targets should be a list of strings")
    for key, annotation in (("sha256", "str"), ("threshold", "float"), ("alpha_clip", "bool")):
        if key in data.get("iqa", {}):
            check_value(data["iqa"][key], annotation, f"{path}: iqa.{key}")
