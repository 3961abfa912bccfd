"""Shared fixtures: real faces from ../shared (skipped with a reason where absent) and the models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"


def require_shared_faces() -> Path:
    if not (SHARED_FACES / "lfw10").is_dir():
        pytest.skip(f"real face images not found at {SHARED_FACES} (the ../shared folder beside the checkout)")
    return SHARED_FACES


def require_models() -> None:
    from petal_runtime.model_store import cache_dir, models_present

    if not models_present():
        pytest.skip(f"SFace/YuNet not in {cache_dir()}; run `petal-models fetch` (make test does)")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The real default checkpoint exported once per checkout (tests/runtime_support.py caches it)."""
    import runtime_support as rs

    require_models()
    return rs.exported_models()


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    return require_shared_faces()


@pytest.fixture(scope="session")
def lfw_faces(shared_faces):
    """LFW10 aligned with YuNet: 100 real 112x112 RGB crops of 10 identities."""
    require_models()
    from petal_train.faces import load_identity_folders

    return load_identity_folders(shared_faces / "lfw10")


@pytest.fixture(scope="session")
def aligned_batch(lfw_faces) -> np.ndarray:
    """Eight real aligned faces (two per identity) as the graphs' `image` input, float32 NCHW 0..255."""
    from petal_runtime.contract import to_model_input

    picks = np.concatenate([np.flatnonzero(lfw_faces.labels == k)[:2] for k in range(4)])
    return to_model_input(lfw_faces.images[picks])
