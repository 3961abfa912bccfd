"""Assemble a PETAL recognizer: registered backbone + adapters + the raw-pixel wrapper."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .lora import AlphaGate, InjectionReport, LoRAConfig, PetalRecognizer, inject
from .registry import BackboneSpec, create_model, get_spec


@dataclass
class BuiltRecognizer:
    recognizer: PetalRecognizer
    spec: BackboneSpec
    lora: LoRAConfig
    report: InjectionReport

    @property
    def gate(self) -> AlphaGate:
        return self.recognizer.gate


def build_recognizer(backbone: str = "sface", mode: str = "petal", rank: int = 8, scale: float = 1.0,
                     dropout: float = 0.1, targets: tuple[str, ...] | None = None,
                     pretrained: bool = True, **backbone_kwargs) -> BuiltRecognizer:
    spec = get_spec(backbone)
    model: nn.Module = create_model(backbone, pretrained=pretrained, **backbone_kwargs)
    lora = LoRAConfig(mode=mode, rank=rank, scale=scale, dropout=dropout,
                      targets=tuple(targets) if targets else spec.lora_targets)
    gate, report = inject(model, lora.targets, rank=rank, scale=scale, mode=mode, dropout=dropout)
    recognizer = PetalRecognizer(model, gate, spec.norm_mean, spec.norm_std)
    return BuiltRecognizer(recognizer, spec, lora, report)
