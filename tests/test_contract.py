"""The exporter/runtime contract (petal_runtime/contract.py), the single definition of PETALface's gate:
alpha = 0.5 + (q - t), clipped to [0, 1] unless the manifest says otherwise."""
from __future__ import annotations

import numpy as np
import pytest

from petal_runtime.contract import ALPHA_CLIP_DEFAULT, Manifest, alpha_from_quality

T = 0.6  # any IQA threshold
# Far below, at the lower clip edge, between, at the threshold, at the upper clip edge, far above.
Q = np.array([-1.0, T - 0.5, T - 0.25, T, T + 0.5, 2.0], np.float32)
RAW = 0.5 + (Q - T)  # the paper's formula, written out


def test_alpha_is_half_plus_quality_minus_threshold_clipped_to_zero_one_by_default():
    assert ALPHA_CLIP_DEFAULT is True
    np.testing.assert_allclose(alpha_from_quality(Q, T, clip=False), RAW, atol=1e-6)
    clipped = alpha_from_quality(Q, T)
    np.testing.assert_allclose(clipped, np.clip(RAW, 0.0, 1.0), atol=1e-6)
    assert clipped[0] == 0.0 and clipped[-1] == 1.0 and alpha_from_quality(T, T) == 0.5
    assert alpha_from_quality(T + 0.25, T) == pytest.approx(0.75)
    assert alpha_from_quality(T - 0.75, T, clip=False) == pytest.approx(-0.25)


def test_alpha_is_the_same_for_numpy_torch_and_floats():
    torch = pytest.importorskip("torch")
    for clip in (True, False):
        expected = alpha_from_quality(Q, T, clip=clip)
        as_torch = alpha_from_quality(torch.from_numpy(Q), T, clip=clip)
        assert isinstance(as_torch, torch.Tensor) and np.array_equal(as_torch.numpy(), expected)
        as_floats = [alpha_from_quality(float(q), T, clip=clip) for q in Q]
        assert all(isinstance(a, float) for a in as_floats)
        assert as_floats == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize("clip", [True, False])
def test_manifest_alpha_uses_its_threshold_and_clip_setting(clip):
    manifest = Manifest(backbone="b", embedding_size=128, norm_mean=127.5, norm_std=128.0, iqa_threshold=T,
                        alpha_clip=clip)
    np.testing.assert_allclose(manifest.alpha(Q), alpha_from_quality(Q, T, clip=clip))
