"""Margin heads for training face embeddings: ArcFace and CosFace, s = 64 by default.

Both compare the L2-normalised embedding with L2-normalised class centres (cos theta) and move
only the true class's logit before scaling by s:

    ArcFace  (Deng et al., 2019):  s * cos(theta + m), m = 0.5
    CosFace  (Wang et al., 2018):  s * (cos(theta) - m), m = 0.4 (arcface_torch's cosface setting)

ArcFace uses the usual guard for theta + m > pi (where cos(theta + m) would stop falling): past
that point the logit becomes cos(theta) - m * sin(m), which keeps the loss monotone. The head
computes in its weights' precision (float32 unless asked otherwise), also under autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from petal_runtime.errors import PetalError

DEFAULT_SCALE = 64.0


class MarginHead(nn.Module):
    """Class centres W [C, D]; forward(embedding, labels) -> scaled logits with the margin applied."""

    default_margin = 0.0

    def __init__(self, embedding_size: int, num_classes: int, scale: float = DEFAULT_SCALE,
                 margin: float | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise PetalError(f"a margin head needs at least 2 identities, got {num_classes}")
        self.scale = float(scale)
        self.margin = float(self.default_margin if margin is None else margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """cos theta between each embedding and each class centre, [N, C]."""
        return F.linear(F.normalize(embedding.to(self.weight.dtype), dim=1), F.normalize(self.weight, dim=1))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._logits(self.cosine(embedding), labels)

    def _logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1.0, 1.0)
        one_hot = F.one_hot(labels, self.num_classes).to(torch.bool)
        return cos.masked_scatter(one_hot, self.target_logit(cos[one_hot])) * self.scale

    def loss(self, embedding: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the batch, top-1 accuracy of the margin-free cosine)."""
        cos = self.cosine(embedding)
        with torch.no_grad():
            accuracy = (cos.argmax(1) == labels).float().mean()
        return F.cross_entropy(self._logits(cos, labels), labels), accuracy

    def init_from_embeddings(self, centres: torch.Tensor) -> None:
        """Start the class centres at given embeddings (e.g. each identity's mean clean embedding)."""
        if centres.shape != self.weight.shape:
            raise ValueError(f"centres of shape {tuple(centres.shape)} for a head of {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(F.normalize(centres.to(self.weight.dtype), dim=1))


class ArcFace(MarginHead):
    default_margin = 0.5

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        m = self.margin
        sin_target = torch.sqrt((1.0 - cos_target * cos_target).clamp_min(1e-9))
        phi = cos_target * math.cos(m) - sin_target * math.sin(m)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m): fall back to a linear penalty.
        return torch.where(cos_target > math.cos(math.pi - m), phi, cos_target - m * math.sin(m))


class CosFace(MarginHead):
    default_margin = 0.4

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin


HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace}


def build_head(kind: str, embedding_size: int, num_classes: int, scale: float = DEFAULT_SCALE,
               margin: float | None = None) -> MarginHead:
    try:
        cls = HEADS[kind]
    except KeyError:
        raise PetalError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}") from None
    return cls(embedding_size, num_classes, scale, margin)
