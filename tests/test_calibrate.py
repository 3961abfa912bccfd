"""The quality threshold: t = mean + std of IQA scores over a seeded sample of training faces."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from petal_runtime.errors import PetalError
from petal_train.calibrate import Calibration, calibrate_threshold, score_quality
from petal_train.cli import cli
from petal_train.iqa import DEFAULT_WEIGHTS, load_iqa

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CALIBRATION = REPO / "calibration" / "sface_portraits.json"


@pytest.fixture(scope="module")
def iqa():
    return load_iqa()


@pytest.mark.shared
def test_threshold_is_mean_plus_std_of_the_scored_sample(lfw_faces, iqa):
    model, _ = iqa
    # All faces, undegraded: the sample is a permutation of the set, so its statistics are the set's.
    result = calibrate_threshold(lfw_faces.images, model, sample=len(lfw_faces), seed=3, degrade=False)
    scores = score_quality(model, lfw_faces.images).astype(np.float64)
    assert result.mean == pytest.approx(scores.mean(), abs=1e-6)
    assert result.std == pytest.approx(scores.std(), abs=1e-6)
    assert result.threshold == pytest.approx(scores.mean() + scores.std(), abs=1e-6)
    assert result.distinct_faces == len(lfw_faces) and result.degradation == "none"


@pytest.mark.shared
def test_threshold_is_seeded_and_degraded_faces_score_lower(lfw_faces, iqa):
    model, _ = iqa
    first = calibrate_threshold(lfw_faces.images, model, sample=50, seed=0)
    again = calibrate_threshold(lfw_faces.images, model, sample=50, seed=0)
    other = calibrate_threshold(lfw_faces.images, model, sample=50, seed=1)
    assert first.threshold == again.threshold and first.mean == again.mean
    assert other.threshold != first.threshold
    assert first.threshold == pytest.approx(first.mean + first.std)
    assert first.degraded and first.sample == 50
    clean = calibrate_threshold(lfw_faces.images, model, sample=50, seed=0, degrade=False)
    assert clean.mean > first.mean
    # More draws than faces: sampled with replacement, each draw degraded on its own.
    many = calibrate_threshold(lfw_faces.images, model, sample=120, seed=0)
    assert many.sample == 120 and many.distinct_faces <= len(lfw_faces)


@pytest.mark.shared
def test_too_small_a_sample_is_a_user_error(lfw_faces, iqa):
    with pytest.raises(PetalError):
        calibrate_threshold(lfw_faces.images, iqa[0], sample=1, seed=0)


def test_calibration_json_round_trip_and_damaged_file(tmp_path):
    calib = Calibration(threshold=0.7, mean=0.5, std=0.2, sample=10, distinct_faces=10, seed=0, degraded=True,
                        degradation="x", iqa_sha256="ab" * 32, data="portraits", date="2026-01-01T00:00:00+00:00")
    path = calib.save(tmp_path / "c.json")
    assert Calibration.load(path) == calib
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "partial.json").write_text(json.dumps({"threshold": 0.7}))
    for bad in ("bad.json", "partial.json", "absent.json"):
        with pytest.raises(PetalError):
            Calibration.load(tmp_path / bad)


@pytest.mark.shared
def test_calibrate_command_writes_every_field(tmp_path, lfw_faces):
    data = tmp_path / "faces"
    for k, (face, label) in enumerate(zip(lfw_faces.images[:30], lfw_faces.labels[:30])):
        folder = data / lfw_faces.names[label]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{k}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    out = tmp_path / "calibration" / "lfw.json"
    result = CliRunner().invoke(cli, ["calibrate", "--data", str(data), "--sample", "40", "--seed", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert set(written) == {f.name for f in fields(Calibration)}
    _, sha = load_iqa()
    assert written["iqa_sha256"] == sha and written["sample"] == 40 and written["seed"] == 0
    assert written["threshold"] == pytest.approx(written["mean"] + written["std"])
    assert written["data"] == str(data) and written["date"]
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_shipped_calibration_matches_the_shipped_weights():
    calib = Calibration.load(SHIPPED_CALIBRATION)
    _, sha = load_iqa(DEFAULT_WEIGHTS)
    assert calib.iqa_sha256 == sha
    assert calib.threshold == pytest.approx(calib.mean + calib.std)
    assert calib.sample >= 1000 and calib.degraded and "portraits" in calib.data
