"""The degradation families: what surveillance footage does to a face, seeded and composable."""
from __future__ import annotations

import numpy as np
import pytest

from petal_train.degrade import (FAMILIES, DegradeConfig, Degradation, apply_degradation, degrade, family_probe,
                                 sample_degradation)


@pytest.fixture(scope="module")
def face(lfw_faces):
    return lfw_faces.images[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_changes_a_real_face_and_keeps_its_shape(face, family):
    out = apply_degradation(face, Degradation(10_000, {family: 0.7}), np.random.default_rng(0))
    assert out.shape == face.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - face.astype(int)).mean() > 1.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heavier_severity_moves_a_face_further(face, family):
    def change(severity):
        out = apply_degradation(face, Degradation(10_000, {family: severity}), np.random.default_rng(1))
        return np.abs(out.astype(int) - face.astype(int)).mean()

    assert change(1.0) > change(0.1)


def test_degradation_is_seeded(face):
    a, da = degrade(face, np.random.default_rng([3, 1]))
    b, db = degrade(face, np.random.default_rng([3, 1]))
    assert da == db and np.array_equal(a, b)


def test_an_excluded_family_is_never_drawn():
    config = DegradeConfig(exclude=("turbulence", "video"), p_family=0.9)
    draws = [sample_degradation(np.random.default_rng(k), config) for k in range(300)]
    assert not any({"turbulence", "video"} & set(d.families) for d in draws)
    assert any("defocus" in d.families for d in draws)


def test_severity_grows_as_the_face_shrinks_and_as_families_join():
    assert Degradation(8).severity() > Degradation(24).severity() > Degradation(48).severity() == 0.0
    assert Degradation(24, {"noise": 0.5}).severity() > Degradation(24).severity()


@pytest.mark.parametrize("family", ["downsample-nearest", "downsample-lanczos", "grayscale", "motion"])
def test_family_probes_are_low_resolution_versions_of_the_face(face, family):
    probe = family_probe(face, family, 16, np.random.default_rng(0))
    assert probe.shape == face.shape
    # Little detail survives a 16 px face: the probe is much smoother than the original.
    detail = lambda img: np.abs(np.diff(img.astype(int), axis=1)).mean()  # noqa: E731
    assert detail(probe) < 0.7 * detail(face)
    if family == "grayscale":
        assert np.array_equal(probe[..., 0], probe[..., 1])


def test_plain_faces_are_only_resized_at_the_asked_rate_and_leave_the_default_stream_alone():
    draws = [sample_degradation(np.random.default_rng(i), DegradeConfig(p_plain=0.3)) for i in range(2000)]
    plain = np.mean([not d.families for d in draws])
    # 0.3 asked, plus the 0.7 ** 9 = 4 % the composition leaves plain by itself
    assert 0.3 <= plain <= 0.38, plain
    # p_plain 0 draws nothing extra: the benchmark's probes (default composition) stay what they were
    assert all(sample_degradation(np.random.default_rng(i)) == sample_degradation(
        np.random.default_rng(i), DegradeConfig(p_plain=0.0)) for i in range(200))
    assert not sample_degradation(np.random.default_rng(1), DegradeConfig(p_plain=1.0)).families
