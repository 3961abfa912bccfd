"""`petal-train eval`: rank-k / CMC, TAR at FAR, the folder and TinyFace protocols on real faces."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from petal_runtime.errors import PetalError
from petal_train.evaluate import (cmc_curve, far_key, identification, load_model, probe_ranks, run_eval,
                                  split_gallery_probe, tar_at_far, verification)


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# ------------------------------------------------------------------------------------------ metrics


def test_rank_is_the_position_of_the_best_genuine_gallery_entry():
    gallery = np.array([0, 1, 2, -1])  # -1: a distractor
    scores = np.array([[0.9, 0.1, 0.2, 0.3],   # probe of 0: rank 1
                       [0.8, 0.5, 0.9, 0.1],   # probe of 1: two entries score higher -> rank 3
                       [0.1, 0.2, 0.3, 0.3],   # probe of 2: tied with the distractor -> rank 2
                       [0.5, 0.4, 0.3, 0.2]])  # probe of 7: nobody in the gallery
    ranks = probe_ranks(scores, np.array([0, 1, 2, 7]), gallery)
    assert ranks.tolist() == [1, 3, 2, 0]
    curve = cmc_curve(ranks, 4)
    assert curve.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    result = identification(scores, np.array([0, 1, 2, 7]), gallery, ranks=(1, 2))
    assert result["rank-1"] == pytest.approx(1 / 3) and result["probes_without_match"] == 1
    assert len(result["cmc"]) == 20 and result["cmc"][-1] == 1.0


def test_tar_at_far_uses_the_impostor_quantile_and_refuses_too_few_impostors():
    impostor = np.linspace(0.0, 1.0, 10_001)[:-1]  # 10,000 impostor scores in [0, 1)
    genuine = np.array([0.995, 0.9995, 0.99995, 0.5])
    tar = tar_at_far(genuine, impostor)
    # FAR 1e-2 lets the top 100 impostors through: threshold 0.9899 -> 3 of 4 genuine accepted.
    assert tar[far_key(1e-2)] == 0.75 and tar[far_key(1e-3)] == 0.5 and tar[far_key(1e-4)] == 0.25
    assert tar_at_far(genuine, impostor[:500])[far_key(1e-3)] is None  # FAR 1e-3 needs >= 1000 pairs
    scores = np.array([[0.9, 0.2], [0.3, 0.8]])
    result = verification(scores, np.array([0, 1]), np.array([0, 1]))
    assert result["genuine_pairs"] == 2 and result["impostor_pairs"] == 2


def test_identities_with_one_image_cannot_be_probed(lfw_faces):
    singles = lfw_faces.subset(np.isin(np.arange(len(lfw_faces)), [np.flatnonzero(lfw_faces.labels == k)[0]
                                                                     for k in range(3)]))
    with pytest.raises(PetalError, match="two or more"):
        split_gallery_probe(singles)
    gallery, probes = split_gallery_probe(lfw_faces)
    assert len(gallery) == 10 and len(probes) == 90 and set(probes.labels) == set(range(10))


# ------------------------------------------------------------------------------------------ protocols


@pytest.fixture(scope="module")
def small_tree(lfw_faces, tmp_path_factory) -> Path:
    """5 real identities x 3 aligned crops."""
    root = tmp_path_factory.mktemp("eval") / "ids"
    for label in range(5):
        for k, i in enumerate(np.flatnonzero(lfw_faces.labels == label)[:3]):
            _write(root / lfw_faces.names[label] / f"{k}.png", lfw_faces.images[i])
    return root


def test_eval_of_the_frozen_base_on_real_faces_writes_json_and_cmc(small_tree, tmp_path):
    result = run_eval(str(small_tree), tmp_path / "out", probe_px=(12,), device="cpu")
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "cmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["protocol"] == "folders" and saved["gallery"] == 5 and saved["probes"] == 10
    clean, tiny = saved["conditions"]["clean"], saved["conditions"]["12px"]
    assert set(clean) >= {"rank-1", "rank-5", "rank-10", "rank-20", "cmc", far_key(1e-2), far_key(1e-4)}
    assert clean["rank-1"] >= 0.8  # SFace on clean aligned LFW faces
    assert tiny["rank-1"] <= clean["rank-1"]  # 12 px faces lose detail
    assert clean["rank-5"] == 1.0  # five identities
    assert clean[far_key(1e-4)] is None  # 40 impostor pairs cannot measure FAR 1e-4


def test_tinyface_protocol_counts_distractors_as_never_genuine(lfw_faces, tmp_path):
    root = tmp_path / "tinyface" / "Testing_Set"
    for label in range(3):
        picks = np.flatnonzero(lfw_faces.labels == label)
        _write(root / "Gallery_Match" / f"{label + 1}_1.png", lfw_faces.images[picks[0]])
        for k in (1, 2):
            _write(root / "Probe" / f"{label + 1}_{k + 1}.png", lfw_faces.images[picks[k]])
    for k, i in enumerate(np.flatnonzero(lfw_faces.labels >= 3)[::10]):
        _write(root / "Gallery_Distractor" / f"{k}.png", lfw_faces.images[i])
    result = run_eval(str(tmp_path / "tinyface"), tmp_path / "out", device="cpu")
    assert result["protocol"] == "tinyface" and result["probes"] == 6 and result["distractors"] == 7
    assert result["gallery"] == 10 and result["conditions"]["tinyface"]["probes"] == 6
    assert result["conditions"]["tinyface"]["rank-1"] >= 0.8
    with pytest.raises(PetalError, match="drop --probe-px"):
        run_eval(str(tmp_path / "tinyface"), tmp_path / "out2", probe_px=(16,), device="cpu")


def test_a_petal_checkpoint_needs_the_iqa_it_was_calibrated_with(tmp_path):
    from petal_train.backbones.sface import base_weights_sha256
    from petal_train.checkpoint import AdapterCheckpoint
    from petal_train.iqa import CNNIQA, save_iqa
    from petal_train.lora import adapter_state_dict
    from petal_train.model import build_recognizer
    from petal_runtime.files import sha256_file

    for seed in (0, 1):
        torch.manual_seed(seed)
        save_iqa(CNNIQA(), tmp_path / f"iqa{seed}.pth")
    built = build_recognizer("sface", mode="petal", rank=4)
    AdapterCheckpoint("sface", base_weights_sha256(), built.lora, adapter_state_dict(built.recognizer.backbone),
                      iqa_sha256=sha256_file(tmp_path / "iqa0.pth"), iqa_threshold=0.6).save(tmp_path / "ckpt.pt")
    model = load_model(tmp_path / "ckpt.pt", iqa=tmp_path / "iqa0.pth", device="cpu")
    assert model.mode == "petal" and model.iqa is not None and model.threshold == pytest.approx(0.6)
    with pytest.raises(PetalError, match="same --iqa"):
        load_model(tmp_path / "ckpt.pt", iqa=tmp_path / "iqa1.pth", device="cpu")


def test_eval_cli_prints_a_table_and_rejects_bad_probe_sizes(small_tree, tmp_path):
    from click.testing import CliRunner

    from petal_train.cli import cli

    result = CliRunner().invoke(cli, ["eval", "--data", str(small_tree), "--out", str(tmp_path / "o"),
                                      "--probe-px", "3", "--device", "cpu"])
    assert result.exit_code != 0 and "4..112" in str(result.exception)
    with pytest.raises(PetalError, match="identity-folder tree or a TinyFace root"):
        run_eval("portraits", tmp_path / "o", device="cpu")


def test_ten_fold_verification_is_perfect_on_separable_scores_and_chance_on_noise():
    from petal_train.evaluate import verification_accuracy

    rng = np.random.default_rng(0)
    same = np.arange(600) < 300
    separable = np.where(same, rng.uniform(0.5, 1.0, 600), rng.uniform(-0.2, 0.4, 600))
    assert verification_accuracy(separable, same)["accuracy"] == 1.0
    noise = verification_accuracy(rng.uniform(size=600), same)
    assert 0.4 < noise["accuracy"] < 0.6 and noise["folds"] == 10


def test_open_set_dir_counts_enrolled_probes_named_right_above_the_unenrolled_threshold():
    from petal_train.evaluate import open_set_identification

    gallery_labels = np.array([0, 1])
    # 100 unenrolled probes (label 7) score 0.00..0.99 against the gallery: at FAR 10 % the
    # threshold is the 11th highest, 0.89.
    unenrolled = np.stack([np.linspace(0, 0.99, 100), np.zeros(100)], axis=1)
    enrolled = np.array([[0.95, 0.1],   # right and above: detected and identified
                         [0.5, 0.1],    # right, below the threshold
                         [0.1, 0.97],   # right (label 1) and above
                         [0.99, 0.2]])  # above, but names the wrong identity (probe is 1)
    scores = np.concatenate([enrolled, unenrolled])
    labels = np.concatenate([[0, 0, 1, 1], np.full(100, 7)])
    result = open_set_identification(scores, labels, gallery_labels, fars=(0.1, 0.001))
    assert result["DIR@FAR=0.1"] == 0.5
    assert result["DIR@FAR=0.001"] is None  # fewer than 1/FAR unenrolled probes
    assert result["unenrolled_probes"] == 100 and result["enrolled_probes"] == 4
