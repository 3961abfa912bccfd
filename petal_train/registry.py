"""Backbone registry in the style of timm: one decorated builder per backbone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from petal_runtime.errors import PetalError


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of PETAL needs to know about a backbone besides its weights."""

    name: str
    builder: Callable[..., nn.Module]
    input_size: int
    embedding_size: int
    norm_mean: float  # image in 0..255 is fed as (x - mean) / std
    norm_std: float
    lora_targets: tuple[str, ...]  # glob patterns over module names that get adapters
    pretrained: str = ""  # how weights are obtained; "" = user brings a state dict
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_model(*, input_size: int, embedding_size: int, norm_mean: float, norm_std: float,
                   lora_targets: tuple[str, ...], pretrained: str = ""):
    """Decorator: register `builder` under its function name."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        _REGISTRY[name] = BackboneSpec(name, builder, input_size, embedding_size, norm_mean,
                                       norm_std, tuple(lora_targets), pretrained)
        return builder

    return decorate


def _ensure_builtin() -> None:
    from . import backbones  # noqa: F401  (importing registers the built-in backbones)


def list_models() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PetalError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone (`pretrained=True` loads its weights where PETAL can obtain them)."""
    return get_spec(name).builder(**kwargs)
