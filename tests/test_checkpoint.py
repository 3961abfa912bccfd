"""Adapter checkpoints hold adapters and head only, refuse another base, and are written atomically."""
from __future__ import annotations

import pytest
import torch

from petal_runtime.errors import PetalError
from petal_train.backbones.sface import base_weights_sha256
from petal_train.checkpoint import AdapterCheckpoint, load_checkpoint
from petal_train.lora import adapter_state_dict
from petal_train.model import build_recognizer


@pytest.fixture(scope="module")
def trained_like():
    built = build_recognizer("sface", mode="petal", rank=8)
    torch.manual_seed(1)
    for name, p in built.recognizer.backbone.named_parameters():
        if "trainable_lora_up" in name:
            torch.nn.init.normal_(p, std=0.01)
    return built


def _checkpoint(built, base_sha=None) -> AdapterCheckpoint:
    return AdapterCheckpoint(backbone="sface", base_sha256=base_sha or base_weights_sha256(), lora=built.lora,
                             adapters=adapter_state_dict(built.recognizer.backbone), iqa_sha256="ab" * 32,
                             iqa_threshold=0.71, head={"weight": torch.randn(5, 128)},
                             training={"epochs": 1})


def test_checkpoint_holds_adapters_and_head_but_not_the_base(trained_like, tmp_path):
    path = _checkpoint(trained_like).save(tmp_path / "ckpt.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["adapters"] and all("trainable_lora" in k for k in raw["adapters"])
    assert not raw["backbone_state"]
    assert path.stat().st_size < 10 * 1024 * 1024  # the base alone is 38 MB
    assert raw["iqa"] == {"sha256": "ab" * 32, "threshold": pytest.approx(0.71), "alpha_clip": True}


def test_round_trip_restores_the_same_recognizer(trained_like, tmp_path, aligned_batch):
    path = _checkpoint(trained_like).save(tmp_path / "ckpt.pt")
    fresh = build_recognizer("sface", mode="petal", rank=8)
    load_checkpoint(path).apply_to(fresh.recognizer.backbone, base_weights_sha256())
    image, alpha = torch.from_numpy(aligned_batch), torch.rand(len(aligned_batch), 1)
    with torch.no_grad():
        assert torch.allclose(fresh.recognizer.eval()(image, alpha), trained_like.recognizer.eval()(image, alpha))


def test_checkpoint_for_another_base_is_refused(trained_like, tmp_path):
    path = _checkpoint(trained_like, base_sha="0" * 64).save(tmp_path / "other.pt")
    fresh = build_recognizer("sface", mode="petal", rank=8)
    with pytest.raises(PetalError, match="wrong base weights"):
        load_checkpoint(path).apply_to(fresh.recognizer.backbone, base_weights_sha256())


def test_checkpoint_with_another_rank_is_refused(trained_like, tmp_path):
    path = _checkpoint(trained_like).save(tmp_path / "ckpt.pt")
    other = build_recognizer("sface", mode="petal", rank=4)
    with pytest.raises((PetalError, RuntimeError)):
        load_checkpoint(path).apply_to(other.recognizer.backbone, base_weights_sha256())


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04broken zip", b"just some text\n"])
def test_damaged_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(PetalError, match="not a readable PETAL checkpoint"):
        load_checkpoint(path)


def test_a_plain_state_dict_is_not_an_adapter_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(PetalError, match="not a PETAL adapter checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_whose_pickle_is_cut_inside_a_number_is_a_user_error(tmp_path):
    """Found by the reader fuzz test: torch's weights_only unpickler raises struct.error on a BININT cut short."""
    import zipfile

    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    torch.save({"format": "petal-adapter-checkpoint"}, whole)
    with zipfile.ZipFile(whole) as src, zipfile.ZipFile(cut, "w") as out:
        for info in src.infolist():
            out.writestr(info, b"\x80\x02J\x01" if info.filename.endswith("data.pkl") else src.read(info))
    with pytest.raises(PetalError, match="is not a readable PETAL"):
        load_checkpoint(cut)


def test_a_failed_save_leaves_no_file_behind(trained_like, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        _checkpoint(trained_like).save(tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_release_copy_is_small_and_loads_to_nearly_the_same_recognizer(trained_like, tmp_path, aligned_batch):
    full = _checkpoint(trained_like)
    path = full.for_release().save(tmp_path / "release.pt")
    assert path.stat().st_size < 5 * 1024 * 1024
    fresh = build_recognizer("sface", mode="petal", rank=8)
    load_checkpoint(path).apply_to(fresh.recognizer.backbone, base_weights_sha256())
    image, alpha = torch.from_numpy(aligned_batch[:4]), torch.rand(4, 1)
    with torch.no_grad():
        got = fresh.recognizer.eval()(image, alpha)
        want = trained_like.recognizer.eval()(image, alpha)
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999


def test_release_copy_keeps_the_recipe_but_not_the_training_machines_paths(trained_like):
    full = _checkpoint(trained_like)
    full.training = {"config": {"out": "/home/someone/runs/petal", "epochs": 8, "lr": 5e-4}}
    released = full.for_release()
    assert released.training["config"] == {"epochs": 8, "lr": 5e-4}
    assert released.head == {} and full.training["config"]["out"] == "/home/someone/runs/petal"


def test_an_adapter_scale_interpolates_between_the_frozen_base_and_the_trained_adapters(trained_like, lfw_faces,
                                                                                      tmp_path):
    from click.testing import CliRunner

    from petal_train.cli import cli
    from petal_train.evaluate import load_model

    from dataclasses import replace

    from petal_train.iqa import load_iqa

    path = replace(_checkpoint(trained_like), iqa_sha256=load_iqa()[1]).save(tmp_path / "ckpt.pt")
    faces = lfw_faces.images[:8]
    frozen, full = load_model(None, device="cpu").embed(faces), load_model(path, device="cpu").embed(faces)
    half = load_model(path, device="cpu", adapter_scale=0.5).embed(faces)
    moved = lambda e: 1 - (e * frozen).sum(1).mean()  # noqa: E731
    assert 0 < moved(half) < moved(full), "half the adapters move the embedding, less than all of them"
    with pytest.raises(PetalError, match=r"in \(0, 1\]"):
        load_checkpoint(path).with_adapter_scale(0.0)
    result = CliRunner().invoke(cli, ["release", str(path), "-o", str(tmp_path / "rel.pt"), "--adapter-scale", "0.5"])
    assert result.exit_code == 0, result.output
    released = load_checkpoint(tmp_path / "rel.pt")
    assert released.lora.scale == 0.5 * trained_like.lora.scale and released.training["adapter_scale"] == 0.5


def test_a_high_branch_scale_of_zero_leaves_faces_at_alpha_one_to_the_frozen_base(trained_like, lfw_faces, tmp_path):
    from dataclasses import replace

    from click.testing import CliRunner

    from petal_train.cli import cli
    from petal_train.evaluate import load_model
    from petal_train.iqa import load_iqa

    path = replace(_checkpoint(trained_like), iqa_sha256=load_iqa()[1]).save(tmp_path / "ckpt.pt")
    x = torch.from_numpy(lfw_faces.images[:4].transpose(0, 3, 1, 2).copy()).float()
    frozen = load_model(None, device="cpu").recognizer(x, torch.ones(4, 1))
    low_only = load_model(path, device="cpu", high_branch_scale=0.0).recognizer
    trained = load_model(path, device="cpu").recognizer
    with torch.no_grad():
        sharp, low = low_only(x, torch.ones(4, 1)), low_only(x, torch.zeros(4, 1))
        assert torch.allclose(sharp, frozen, atol=1e-5), "alpha = 1 runs the frozen base alone"
        assert torch.allclose(low, trained(x, torch.zeros(4, 1)), atol=1e-5), "the low branch is as trained"
        assert not torch.allclose(low, frozen, atol=1e-3)
    result = CliRunner().invoke(cli, ["release", str(path), "-o", str(tmp_path / "rel.pt"),
                                      "--adapter-scale", "0.5", "--high-branch-scale", "0.25"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "rel.pt").training["adapter_scale"] == {"low": 0.5, "high": 0.25}
    with pytest.raises(PetalError, match="high-branch scale"):
        load_checkpoint(path).with_adapter_scale(1.0, 1.5)
