"""PETALface's twin LoRA: two low-rank adapters per layer, mixed per sample by image quality.

    out = W0 x + (1 - alpha) * low(x) + alpha * high(x),   branch(x) = scale * up(dropout(down(x)))

How alpha reaches every adapted layer: `inject` gives all adapted layers one shared `AlphaGate`;
`PetalRecognizer.forward(image, alpha)` binds alpha to the gate for the duration of the backbone
call. Backbone forwards stay untouched, and because the layers read the very tensor that was passed
in, tracing records `alpha` as a real graph input. Each layer weights its rank-space activations
per sample through a reshape to [N, -1] with N = alpha's batch, so layers whose batch is N * windows
(Swin's windowed attention) mix per sample too, without freezing the window count into the graph.

Parameter names follow the official PETALface code (`trainable_lora_down/up` for the low-quality
branch, `trainable_lora_down2/up2` for the high-quality one), and adapted layers subclass the layer
they replace, so base weights keep their keys and official checkpoints load with strict=True.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from petal_runtime.errors import PetalError

MODES = ("petal", "lora", "full", "frozen")
ADAPTER_KEY = "trainable_lora"
HIGH_UP_SUFFIX = "trainable_lora_up2.weight"  # the high-quality branch's up projection (twin adapters)


class AlphaGate:
    """Carries the current batch's alpha ([N, 1]) to every adapted layer, or switches them off.

    `bypassed()` makes every adapted layer return its frozen base output: the frozen recognizer,
    without a second copy of its weights (the trainer's distillation teacher).
    """

    def __init__(self) -> None:
        self.alpha: torch.Tensor | None = None
        self.bypass = False

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous

    @contextlib.contextmanager
    def bind(self, alpha: torch.Tensor) -> Iterator[None]:
        previous, self.alpha = self.alpha, alpha
        try:
            yield
        finally:
            self.alpha = previous


@dataclass(frozen=True)
class LoRAConfig:
    mode: str = "petal"
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoRAConfig":
        return cls(**{**data, "targets": tuple(data.get("targets", ()))})


class _AdapterMixin:
    """Shared adapter logic for the Linear and Conv2d variants."""

    gate: AlphaGate | None
    twin: bool
    scale: float
    rank: int

    def _add_branches(self, make_down, make_up, rank: int, scale: float, dropout: float, twin: bool) -> None:
        self.twin, self.scale, self.rank = twin, scale, rank
        self.lora_dropout = nn.Dropout(dropout)
        self.trainable_lora_down, self.trainable_lora_up = make_down(), make_up()
        if twin:
            self.trainable_lora_down2, self.trainable_lora_up2 = make_down(), make_up()
        for down, up in self._branches():
            nn.init.normal_(down.weight, std=1.0 / rank)
            nn.init.zeros_(up.weight)

    def _branches(self):
        yield self.trainable_lora_down, self.trainable_lora_up
        if self.twin:
            yield self.trainable_lora_down2, self.trainable_lora_up2

    def _adapt(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.gate is not None and self.gate.bypass:
            return base_out
        if not self.twin:
            down = self.lora_dropout(self._down(x, self.trainable_lora_down.weight))
            return base_out.add_(self._up(down, self.scale * self.trainable_lora_up.weight))
        alpha = self.gate.alpha if self.gate is not None else None
        if alpha is None:
            raise RuntimeError("twin adapters need alpha: call the model through PetalRecognizer(image, alpha)")
        # Both branches as one projection each way, mixed in rank space: up is linear, so
        # (1-a) up1(d1) + a up2(d2) = [up1 | up2]((1-a) d1, a d2), at rank cost instead of out-channel cost.
        down = self.lora_dropout(self._down(x, torch.cat([self.trainable_lora_down.weight,
                                                          self.trainable_lora_down2.weight])))
        low, high = down.split(self.rank, dim=self._channel_dim)
        mixed = torch.cat([_per_sample(low, 1.0 - alpha), _per_sample(high, alpha)], dim=self._channel_dim)
        up = torch.cat([self.trainable_lora_up.weight, self.trainable_lora_up2.weight], dim=1)
        # In place: the base output is not needed for its own backward, and these maps are large.
        return base_out.add_(self._up(mixed, self.scale * up))


def _per_sample(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """t * weight[sample]; t's batch may be N * k (Swin's windows), weight's is N."""
    n = weight.shape[0]
    return (t.reshape(n, -1) * weight.reshape(n, 1)).reshape(t.shape)


class TwinLoRALinear(nn.Linear, _AdapterMixin):
    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, twin: bool,
                 gate: AlphaGate | None) -> None:
        nn.Linear.__init__(self, base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        if rank > min(base.in_features, base.out_features):
            raise PetalError(f"rank {rank} exceeds the smaller side of a {base.in_features}x{base.out_features} layer")
        self.gate = gate
        self._add_branches(lambda: nn.Linear(base.in_features, rank, bias=False),
                           lambda: nn.Linear(rank, base.out_features, bias=False), rank, scale, dropout, twin)

    _channel_dim = -1

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def _up(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapt(x, F.linear(x, self.weight, self.bias))


class TwinLoRAConv2d(nn.Conv2d, _AdapterMixin):
    """down: k x k conv to `rank` channels with the base's stride and padding (groups=1); up: 1x1."""

    def __init__(self, base: nn.Conv2d, rank: int, scale: float, dropout: float, twin: bool,
                 gate: AlphaGate | None) -> None:
        nn.Conv2d.__init__(self, base.in_channels, base.out_channels, base.kernel_size, base.stride,
                           base.padding, base.dilation, base.groups, base.bias is not None, base.padding_mode)
        self.weight, self.bias = base.weight, base.bias
        if rank > base.out_channels:
            raise PetalError(f"rank {rank} exceeds the {base.out_channels} output channels of a conv layer")
        self.gate = gate
        self._add_branches(
            lambda: nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                              base.dilation, groups=1, bias=False),
            lambda: nn.Conv2d(rank, base.out_channels, 1, bias=False), rank, scale, dropout, twin)

    _channel_dim = 1

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        down = self.trainable_lora_down
        return F.conv2d(x, weight, None, down.stride, down.padding, down.dilation)

    def _up(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapt(x, self._conv_forward(x, self.weight, self.bias))


_ADAPTED = {nn.Linear: TwinLoRALinear, nn.Conv2d: TwinLoRAConv2d}


@dataclass(frozen=True)
class InjectionReport:
    mode: str
    adapted_layers: tuple[str, ...]
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"mode={self.mode}: {len(self.adapted_layers)} adapted layers, "
                f"{self.trainable:,} of {self.total:,} parameters trainable ({self.percent:.2f}%)")


def matching_modules(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if type(module) in _ADAPTED and any(fnmatch.fnmatchcase(name, p) for p in targets)]


def inject(model: nn.Module, targets: tuple[str, ...] | list[str], rank: int = 8, scale: float = 1.0,
           mode: str = "petal", dropout: float = 0.1) -> tuple[AlphaGate, InjectionReport]:
    """Replace matching Linear/Conv2d layers by adapted ones in place; freeze everything else.

    `petal` adds twin gated adapters, `lora` one branch, `full` trains every base weight, `frozen`
    trains nothing in the backbone.
    """
    if mode not in MODES:
        raise PetalError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if rank < 1:
        raise PetalError(f"rank must be at least 1, got {rank}")
    gate = AlphaGate()
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    adapted: list[str] = []
    if mode in ("petal", "lora"):
        found = matching_modules(model, tuple(targets))
        if not found:
            raise PetalError(f"no Linear or Conv2d layer matches the adapter targets {list(targets)}")
        for name, module in found:
            replacement = _ADAPTED[type(module)](module, rank, scale, dropout, mode == "petal", gate)
            _set_submodule(model, name, replacement)
            adapted.append(name)
        for name, p in model.named_parameters():
            p.requires_grad_(ADAPTER_KEY in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return gate, InjectionReport(mode, tuple(adapted), trainable, total)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ADAPTER_KEY in k}


class PetalRecognizer(nn.Module):
    """image (RGB 0..255, [N, 3, H, W]) and alpha ([N, 1]) -> L2-normalised embedding.

    Normalisation sits inside, so the exported graph takes raw pixels (see petal_runtime.contract).
    """

    def __init__(self, backbone: nn.Module, gate: AlphaGate, norm_mean: float, norm_std: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.gate = gate
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)

    def embed(self, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding (what a margin head trains on)."""
        x = (image - self.norm_mean) / self.norm_std
        with self.gate.bind(alpha.reshape(-1, 1).to(x.dtype)):
            return self.backbone(x)

    def forward(self, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(image, alpha).float(), dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AlphaGate", "InjectionReport", "LoRAConfig", "MODES", "PetalRecognizer", "TwinLoRAConv2d",
           "TwinLoRALinear", "adapter_state_dict", "inject", "matching_modules", "count_parameters"]
