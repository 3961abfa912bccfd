"""ArcFace and CosFace margin heads: s * cos(theta + m) and s * (cos(theta) - m) on the true class."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from petal_runtime.errors import PetalError
from petal_train.heads import ArcFace, CosFace, build_head


def _head_at_angles(cls, thetas: torch.Tensor, **kw):
    """A 2-class head in 2-D and unit embeddings at the given angles from class 0's centre."""
    head = cls(2, 2, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embeddings = torch.stack([torch.cos(thetas), torch.sin(thetas)], dim=1) * 3.0  # norm does not matter
    return head, embeddings


def test_arcface_adds_an_angular_margin_to_the_true_class_only():
    thetas = torch.tensor([0.1, 0.7, 1.2])
    head, emb = _head_at_angles(ArcFace, thetas)
    logits = head(emb, torch.zeros(3, dtype=torch.long))
    assert head.scale == 64.0 and head.margin == 0.5
    assert torch.allclose(logits[:, 0], 64 * torch.cos(thetas + 0.5), atol=1e-4)
    assert torch.allclose(logits[:, 1], 64 * torch.cos(math.pi / 2 - thetas), atol=1e-4)


def test_arcface_stays_monotone_past_pi_minus_m():
    thetas = torch.linspace(2.0, 3.1, 12)  # theta + m passes pi here
    head, emb = _head_at_angles(ArcFace, thetas)
    target = head(emb, torch.zeros(12, dtype=torch.long))[:, 0]
    assert (target[1:] < target[:-1]).all()


def test_cosface_subtracts_its_margin_from_the_cosine():
    thetas = torch.tensor([0.2, 1.0])
    head, emb = _head_at_angles(CosFace, thetas, scale=30.0, margin=0.35)
    logits = head(emb, torch.tensor([0, 1]))
    assert torch.allclose(logits[0, 0], 30 * (torch.cos(thetas[0]) - 0.35), atol=1e-4)
    assert torch.allclose(logits[1, 1], 30 * (torch.sin(thetas[1]) - 0.35), atol=1e-4)
    assert torch.allclose(logits[0, 1], 30 * torch.sin(thetas[0]), atol=1e-4)
    assert CosFace(4, 3).margin == 0.4


def test_heads_start_from_clean_embeddings_and_learn_them(aligned_batch):
    from petal_train.model import build_recognizer

    recognizer = build_recognizer("sface", mode="frozen").recognizer
    with torch.no_grad():
        emb = recognizer.embed(torch.from_numpy(aligned_batch), torch.ones(8, 1))
    labels = torch.arange(4).repeat_interleave(2)  # the fixture holds two faces of each of 4 people
    for kind in ("arcface", "cosface"):
        head = build_head(kind, 128, 4)
        random_loss, _ = head.loss(emb, labels)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
        for _ in range(10):
            optimizer.zero_grad()
            head.loss(emb, labels)[0].backward()
            optimizer.step()
        assert head.loss(emb, labels)[0] < random_loss
        head.init_from_embeddings(torch.stack([F.normalize(emb[labels == k]).mean(0) for k in range(4)]))
        init_loss, accuracy = head.loss(emb, labels)
        assert accuracy == 1.0 and init_loss < random_loss  # each face lies nearest its own person's centre


def test_bad_head_options_are_user_errors():
    with pytest.raises(PetalError, match="unknown head"):
        build_head("sphereface", 128, 10)
    with pytest.raises(PetalError, match="at least 2"):
        build_head("arcface", 128, 1)
