"""`petal-train fit`: what trains, what a run folder holds, resume, signals and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from petal_runtime.errors import PetalError
from petal_train.checkpoint import load_checkpoint
from petal_train.distributed import DistContext
from petal_train.fit import FitConfig, Trainer, fit, poly_warmup
from petal_train.lora import ADAPTER_KEY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tree(lfw_faces, tmp_path_factory) -> Path:
    """4 real identities x 2 aligned crops (pass through alignment unchanged)."""
    root = tmp_path_factory.mktemp("faces") / "ids"
    for label in range(4):
        for k, i in enumerate(np.flatnonzero(lfw_faces.labels == label)[:2]):
            path = root / f"person_{label}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(lfw_faces.images[i], cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def iqa_file(tmp_path_factory) -> Path:
    """A seeded CNNIQA saved as the trainer loads IQA weights (the shipped file is trained separately)."""
    from petal_train.iqa import CNNIQA, save_iqa

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("iqa") / "iqa.pth"
    save_iqa(CNNIQA(), path)
    return path


def _config(tree: Path, iqa: Path, out: Path, **overrides) -> FitConfig:
    options = dict(data=str(tree), out=str(out), iqa=str(iqa), device="cpu", progress=False, batch_size=2,
                   log_every=1, calibration_sample=16, warmup_epochs=0.0, head_init="random", rank=2)
    return FitConfig(**{**options, **overrides})


def _petal_train(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", "from petal_train.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_petal_trains_only_adapters_and_head_and_fills_the_run_folder(tiny_tree, iqa_file, tmp_path):
    from petal_train.calibrate import calibrate_threshold
    from petal_train.data import load_training_data
    from petal_train.iqa import load_iqa

    trainer = Trainer(_config(tiny_tree, iqa_file, tmp_path / "run", max_steps=2), DistContext())
    backbone = trainer.built.recognizer.backbone
    base_before = {k: v.clone() for k, v in backbone.state_dict().items() if ADAPTER_KEY not in k}
    head_before = trainer.head.weight.detach().clone()
    result = trainer.run()

    assert result.status == "max_steps" and result.step == 2
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())  # BN running stats included
    assert not torch.equal(trainer.head.weight, head_before)
    ups = [v for k, v in after.items() if "trainable_lora_up" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # zero-initialised, so they moved

    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt.adapters and all(ADAPTER_KEY in k for k in ckpt.adapters) and not ckpt.backbone_state
    assert ckpt.head["weight"].shape == (4, 128) and ckpt.lora.mode == "petal"
    assert ckpt.progress["global_step"] == 2 and ckpt.progress["status"] == "max_steps"
    # t is calibrated automatically, exactly as `petal-train calibrate` computes it, and stored.
    expected = calibrate_threshold(load_training_data(tiny_tree).images, load_iqa(iqa_file)[0], 16, 0).threshold
    assert ckpt.iqa_threshold == pytest.approx(expected, rel=1e-6)

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert {"loss", "accuracy", "alpha", "lr", "samples_per_s"} <= set(lines[0]) and lines[0]["loss"] > 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_identities"] == 4 and config["calibration"]["t"] == pytest.approx(ckpt.iqa_threshold)
    assert config["config"]["lr"] == 5e-4 and config["config"]["weight_decay"] == 0.1  # the paper's recipe


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_tree, iqa_file, tmp_path):
    straight = fit(_config(tiny_tree, iqa_file, tmp_path / "a", max_steps=2))
    interrupted = Trainer(_config(tiny_tree, iqa_file, tmp_path / "b", max_steps=2), DistContext())
    first_step = interrupted._step

    def step_then_sigterm(*batch):  # as if SIGTERM arrived during the first step
        out = first_step(*batch)
        interrupted.stop_signal = signal.SIGTERM
        return out

    interrupted._step = step_then_sigterm
    assert interrupted.run().status == "stopped"
    with pytest.raises(PetalError, match="--resume"):
        fit(_config(tiny_tree, iqa_file, tmp_path / "b", max_steps=2))
    with pytest.raises(PetalError, match="different mode"):
        fit(_config(tiny_tree, iqa_file, tmp_path / "b", max_steps=2, mode="lora", resume=True))
    resumed = fit(_config(tiny_tree, iqa_file, tmp_path / "b", max_steps=2, resume=True))

    assert straight.step == resumed.step == 2
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert a.iqa_threshold == b.iqa_threshold
    for key in a.adapters:
        torch.testing.assert_close(b.adapters[key], a.adapters[key], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.head["weight"], a.head["weight"], rtol=1e-6, atol=1e-9)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_full_mode_trains_batchnorm_and_stores_the_backbone(tiny_tree, iqa_file, tmp_path):
    trainer = Trainer(_config(tiny_tree, iqa_file, tmp_path / "run", mode="full", max_steps=1,
                              head_init="embeddings"), DistContext())
    # The head starts at each identity's clean embedding (mean over its images, normalised).
    data = trainer.data
    with torch.no_grad():
        emb = trainer.built.recognizer.eval()(torch.from_numpy(data.images.transpose(0, 3, 1, 2).astype(np.float32)),
                                              torch.ones(len(data), 1))
    centres = torch.nn.functional.normalize(torch.stack([emb[data.labels == c].mean(0) for c in range(4)]))
    torch.testing.assert_close(trainer.head.weight.detach(), centres, rtol=1e-4, atol=1e-5)
    bn = trainer.built.recognizer.backbone.blocks.conv_1.bn
    mean_before = bn.running_mean.clone()
    trainer.run()
    assert not torch.equal(bn.running_mean, mean_before)
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert not ckpt.adapters and "blocks.conv_1.bn.running_mean" in ckpt.backbone_state
    assert ckpt.iqa_sha256 == ""  # only petal mixes by quality


def test_sigterm_saves_a_checkpoint_before_exiting(tiny_tree, tmp_path):
    run = tmp_path / "run"
    process = _petal_train("fit", "--data", str(tiny_tree), "--out", str(run), "--mode", "frozen", "--epochs", "500",
                           "--batch-size", "2", "--log-every", "1", "--device", "cpu", "--no-progress")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().strip()) and process.poll() is None:
        assert time.monotonic() < deadline, "no training step within 180 s"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt.progress["status"] == "stopped" and ckpt.progress["global_step"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_a_one_line_error(tiny_tree, tmp_path):
    process = _petal_train("fit", "--data", str(tiny_tree), "--out", str(tmp_path / "run"), "--device", "cuda")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().startswith("error:") and "no usable GPU" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_training_input_is_refused_with_a_clear_message(tiny_tree, iqa_file, tmp_path):
    with pytest.raises(PetalError, match="does not exist"):
        fit(_config(tmp_path / "nowhere", iqa_file, tmp_path / "r0"))
    with pytest.raises(PetalError, match="do not fill one batch"):
        fit(_config(tiny_tree, iqa_file, tmp_path / "r1", batch_size=16))
    with pytest.raises(PetalError, match="rank 200 exceeds"):
        fit(_config(tiny_tree, iqa_file, tmp_path / "r2", mode="lora", rank=200))
    with pytest.raises(PetalError, match="unknown degradation family fog"):
        fit(_config(tiny_tree, iqa_file, tmp_path / "r4", exclude_families=("fog",)))
    with pytest.raises(PetalError, match="IQA weights not found"):
        fit(_config(tiny_tree, tmp_path / "missing.pth", tmp_path / "r3"))


def test_learning_rate_warms_up_linearly_then_decays_polynomially_to_zero():
    factor = poly_warmup(warmup_steps=4, total_steps=14, power=2.0)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.25) and factor(14) == 0.0
    values = [factor(s) for s in range(4, 15)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_a_calibration_file_from_petal_train_calibrate_gives_the_threshold(tmp_path):
    from petal_train.calibrate import Calibration
    from petal_train.fit import read_calibration

    Calibration(threshold=0.42, mean=0.3, std=0.12, sample=100, distinct_faces=100, seed=0, degraded=True,
                degradation="default").save(tmp_path / "cal.json")
    assert read_calibration(tmp_path / "cal.json")["t"] == 0.42
    (tmp_path / "bad.json").write_text('{"mean": 0.3}')
    with pytest.raises(PetalError, match="no threshold"):
        read_calibration(tmp_path / "bad.json")


@pytest.mark.parametrize("text", ['{"threshold": NaN}', '{"t": Infinity}', '{"threshold": -Infinity}',
                                  '{"t": 1' + '0' * 400 + '}'])
def test_a_calibration_threshold_that_is_not_finite_is_refused(tmp_path, text):
    """json.loads accepts NaN and Infinity; with a NaN t every comparison against it is silently false."""
    from petal_train.fit import read_calibration

    (tmp_path / "cal.json").write_text(text)
    with pytest.raises(PetalError, match="not a finite number"):
        read_calibration(tmp_path / "cal.json")


def test_frozen_centres_stay_where_they_started(tiny_tree, iqa_file, tmp_path):
    trainer = Trainer(_config(tiny_tree, iqa_file, tmp_path / "run", max_steps=1, freeze_centres=True), DistContext())
    head_before = trainer.head.weight.detach().clone()
    trainer.run()
    assert torch.equal(trainer.head.weight, head_before)


def _clean_drift(tree, iqa, out, **overrides) -> float:
    """Mean 1 - cos between the trained and the frozen embedding of the training faces, undegraded."""
    from petal_train.evaluate import load_model

    result = fit(_config(tree, iqa, out, epochs=100, max_steps=40, head_init="embeddings", seed=1, **overrides))
    images = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(tree.rglob("*.png"))])
    trained = load_model(result.checkpoint, iqa=str(iqa), device="cpu").embed(images)
    frozen = load_model(None, device="cpu").embed(images)
    return float(1.0 - (trained * frozen).sum(1).mean())


def test_distillation_holds_sharp_faces_where_the_frozen_model_puts_them(tiny_tree, iqa_file, tmp_path):
    """40 steps on 4 identities: the paper's recipe (the default) moves undegraded faces; frozen
    centres with distillation move them less."""
    paper = _clean_drift(tiny_tree, iqa_file, tmp_path / "paper")
    distilled = _clean_drift(tiny_tree, iqa_file, tmp_path / "distilled", distill=32.0, freeze_centres=True)
    assert paper > 0.01
    assert distilled < 0.8 * paper
