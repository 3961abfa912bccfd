"""iresnet50 / iresnet100 / swin_petal: what the registry promises about them.

- They build with random init and give 512-d embeddings at their input size.
- Their state dicts are key- and shape-identical to the official PETALface checkpoints, so those
  load with strict=True (checked against the key lists in shared/fixtures, without the weights).
- Weights are never downloaded: `pretrained=True` needs a file, and a bad file is a one-line error.
- Twin adapters respond to alpha per sample, also through Swin's windowed attention.
- The ONNX graph exported at batch 2 runs at other batch sizes and matches PyTorch.

The full Swin has 214 M parameters; it is built once (module fixture) for the layout and
parameter-count checks, and a reduced variant (depths [2, 2, 2], embed 96) stands in elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from petal_runtime.errors import PetalError
from petal_train.backbones.iresnet import IResNet
from petal_train.lora import PetalRecognizer, inject
from petal_train.registry import create_model, get_spec

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_state_dict_keys.json"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_file(), reason=f"official key lists not found at {FIXTURES}")
SMALL_SWIN = {"depths": (2, 2, 2), "embed_dim": 96}  # keeps shifted windows in stages 0 and 1


def official_layout(name: str) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, shape in json.loads(FIXTURES.read_text())[name]}


def random_state(layout: dict[str, tuple[int, ...]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of the official shapes, dtypes from our model (integer buffers stay integer).

    Uniform in [0, 1) so BN running variances stay non-negative.
    """
    return {k: torch.rand(shape) if like[k].is_floating_point() else torch.zeros(shape, dtype=like[k].dtype)
            for k, shape in layout.items()}


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def twin_recognizer(model: nn.Module, name: str, seed: int = 0) -> PetalRecognizer:
    """Inject petal adapters with nonzero `up` weights, so alpha visibly changes the output."""
    spec = get_spec(name)
    gate, _ = inject(model, spec.lora_targets, rank=8, mode="petal")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "trainable_lora_up" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return PetalRecognizer(model, gate, spec.norm_mean, spec.norm_std).eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope="module")
def full_swin() -> nn.Module:
    return create_model("swin_petal")


# --- registry and weights ----------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [("iresnet50", 112), ("iresnet100", 112), ("swin_petal", 120)])
def test_registered_with_pixel_normalisation_and_512d(name: str, size: int) -> None:
    spec = get_spec(name)
    assert (spec.input_size, spec.embedding_size, spec.norm_mean, spec.norm_std) == (size, 512, 127.5, 127.5)
    assert spec.lora_targets


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100", "swin_petal"])
def test_pretrained_without_weights_asks_for_a_file(name: str) -> None:
    with pytest.raises(PetalError, match="weights="):
        create_model(name, pretrained=True)


def test_bad_weights_files_are_one_line_errors(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    for path, message in ((tmp_path / "absent.pt", "does not exist"), (damaged, "not a readable"),
                          (wrong, "does not fit")):
        with pytest.raises(PetalError, match=message) as caught:
            create_model("iresnet50", weights=path)
        assert "\n" not in str(caught.value)


@needs_fixtures
def test_iresnet50_loads_an_official_layout_file_strictly(tmp_path: Path) -> None:
    model = create_model("iresnet50")
    layout = official_layout("r50")
    assert list(shapes(model).items()) == list(layout.items())
    state = random_state(layout, model.state_dict())
    torch.save(state, tmp_path / "model.pt")
    loaded = create_model("iresnet50", pretrained=True, weights=tmp_path / "model.pt")
    assert torch.equal(loaded.state_dict()["fc.weight"], state["fc.weight"])


@needs_fixtures
def test_iresnet100_matches_the_official_layout() -> None:
    model = create_model("iresnet100")
    layout = official_layout("r100")
    assert list(shapes(model).items()) == list(layout.items())
    model.load_state_dict(random_state(layout, model.state_dict()), strict=True)


# --- forward -----------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("name,kwargs", [("iresnet50", {}), ("swin_petal", SMALL_SWIN)])
def test_forward_gives_one_512d_embedding_per_image(name: str, kwargs: dict) -> None:
    spec = get_spec(name)
    model = create_model(name, **kwargs)
    x = (images(2, spec.input_size) - spec.norm_mean) / spec.norm_std
    out = model(x)
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_swin_rejects_a_wrong_input_size() -> None:
    with pytest.raises(ValueError, match="120x120"):
        create_model("swin_petal", **SMALL_SWIN)(torch.zeros(1, 3, 112, 112))


@torch.no_grad()
def test_swin_reproduces_the_official_unmasked_shift_unless_asked() -> None:
    """Official checkpoints were trained with the shifted-window mask computed but never added."""
    model = create_model("swin_petal", **SMALL_SWIN)
    x = images(1, 120) / 127.5 - 1
    before = model(x)
    masked = create_model("swin_petal", shift_mask=True, **SMALL_SWIN)
    masked.load_state_dict(model.state_dict(), strict=True)
    for name, buffer in model.named_buffers():
        if name.endswith("attn_mask"):
            buffer.fill_(-1e4)
    torch.testing.assert_close(model(x), before)
    assert (masked(x) - before).abs().max() > 1e-4


# --- the full Swin: official layout, adapters, trainable share ----------------------------------

@needs_fixtures
@torch.no_grad()
def test_full_swin_loads_official_layout_and_takes_petal_adapters(full_swin: nn.Module) -> None:
    layout = official_layout("swin_256new")
    assert list(shapes(full_swin).items()) == list(layout.items())  # buffers included
    full_swin.load_state_dict(random_state(layout, full_swin.state_dict()), strict=True)
    assert full_swin(images(1, 120) / 127.5 - 1).shape == (1, 512)

    _, report = inject(full_swin, get_spec("swin_petal").lora_targets, rank=8, mode="petal")
    official = official_layout("swin_256new_iqa")
    # The official single (ungated) LoRA on the head's Linear is left out; see swin.py.
    head_lora = {k for k in official if k.startswith("feature_layer.2.trainable_lora")}
    assert head_lora == {"feature_layer.2.trainable_lora_down.weight", "feature_layer.2.trainable_lora_up.weight"}
    assert shapes(full_swin) == {k: v for k, v in official.items() if k not in head_lora}
    assert len(report.adapted_layers) == 2 + 18 + 2
    expected = sum(np.prod(v) for k, v in official.items() if "trainable_lora" in k and k not in head_lora)
    assert report.trainable == expected == 1_130_496
    assert 0.5 < report.percent < 0.6
    print(f"\nswin_petal {report}")


def test_iresnet50_injection_reports_its_trainable_share() -> None:
    model = create_model("iresnet50")
    _, report = inject(model, get_spec("iresnet50").lora_targets, rank=8, mode="petal")
    convs = [m for name, m in model.named_modules() if name.endswith((".conv1", ".conv2")) and "layer" in name]
    per_branch = sum(c.in_channels * 8 * 9 + 8 * c.out_channels for c in convs) + 25088 * 8 + 8 * 512
    assert len(report.adapted_layers) == len(convs) + 1 == 2 * (3 + 4 + 14 + 3) + 1
    assert report.trainable == 2 * per_branch
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < report.percent < 10 and f"{report.percent:.2f}%" in str(report)
    print(f"\niresnet50 {report}")


# --- twin adapters -----------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("name,make", [
    ("swin_petal", lambda: create_model("swin_petal", **SMALL_SWIN)),
    ("iresnet50", lambda: IResNet((1, 1, 1, 1)).eval()),  # the registered targets on a shallow stack
])
def test_twin_adapters_mix_per_sample_by_alpha(name: str, make) -> None:
    rec = twin_recognizer(make(), name)
    size = get_spec(name).input_size
    x = images(1, size).repeat(2, 1, 1, 1)
    low, high = rec(x[:1], torch.zeros(1, 1)), rec(x[:1], torch.ones(1, 1))
    assert (low - high).abs().max() > 1e-3, "alpha has no effect"
    # One batch with alpha 0 and 1: each sample gets its own mix, also across Swin's windows.
    both = rec(x, torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(both, torch.cat([low, high]), atol=1e-5, rtol=1e-4)


# --- ONNX with a dynamic batch -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("swin_petal", SMALL_SWIN), ("iresnet50", {})])
def test_onnx_exported_at_batch_2_runs_at_batch_1_and_3(name: str, kwargs: dict, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    rec = twin_recognizer(create_model(name, **kwargs), name)
    size = get_spec(name).input_size
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(rec, (images(2, size), torch.tensor([[0.2], [0.8]])), str(path), dynamo=False,
                      input_names=["image", "alpha"], output_names=["embedding"], opset_version=17,
                      dynamic_axes={"image": {0: "N"}, "alpha": {0: "N"}, "embedding": {0: "N"}})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    x, alpha = images(3, size, seed=1), torch.tensor([[0.0], [0.5], [1.0]])
    with torch.no_grad():
        expected = rec(x, alpha).numpy()  # eval BN: samples are independent, so row 0 is batch 1's answer
    out3 = session.run(None, {"image": x.numpy(), "alpha": alpha.numpy()})[0]
    out1 = session.run(None, {"image": x[:1].numpy(), "alpha": alpha[:1].numpy()})[0]
    assert out3.shape == (3, 512) and out1.shape == (1, 512)
    np.testing.assert_allclose(out3, expected, atol=1e-4)
    np.testing.assert_allclose(out1, expected[:1], atol=1e-4)
