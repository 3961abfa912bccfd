"""The PETALface model core: twin LoRA, injection, the SFace backbone, checkpoints, registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from petal_runtime.errors import PetalError
from petal_train.lora import (AlphaGate, TwinLoRAConv2d, TwinLoRALinear, adapter_state_dict,
                              inject)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.dw(self.conv(x)), 1))


def _randomise_up(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "trainable_lora_up" in name:
            nn.init.normal_(p, std=0.05)


def test_adapters_start_as_identity_and_keep_base_keys():
    base = TinyNet().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    expected = base(x)
    gate, report = inject(base, ("conv", "dw", "fc"), rank=4, mode="petal")
    with gate.bind(torch.tensor([[0.2], [0.9]])):
        assert torch.allclose(base(x), expected, atol=1e-6)  # up = 0 at start
    for key, value in before.items():
        assert torch.equal(base.state_dict()[key], value)
    assert report.adapted_layers == ("conv", "dw", "fc")


def test_twin_output_is_the_papers_mix_per_sample():
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    gate = AlphaGate()
    twin = TwinLoRALinear(layer, rank=3, scale=0.5, dropout=0.0, twin=True, gate=gate).eval()
    _randomise_up(twin)
    x = torch.randn(3, 12)
    alpha = torch.tensor([[0.0], [0.3], [1.0]])
    low = 0.5 * twin.trainable_lora_up(twin.trainable_lora_down(x))
    high = 0.5 * twin.trainable_lora_up2(twin.trainable_lora_down2(x))
    with gate.bind(alpha):
        out = twin(x)
    assert torch.allclose(out, layer(x) + (1 - alpha) * low + alpha * high, atol=1e-6)


def test_conv_twin_output_is_the_papers_mix_per_sample():
    """The conv layer mixes in rank space; the result must still be the paper's formula."""
    torch.manual_seed(0)
    base = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
    gate = AlphaGate()
    twin = TwinLoRAConv2d(base, rank=2, scale=0.5, dropout=0.0, twin=True, gate=gate).eval()
    _randomise_up(twin)
    x = torch.randn(3, 6, 9, 9)
    alpha = torch.tensor([[0.0], [0.3], [1.0]])
    low = 0.5 * twin.trainable_lora_up(twin.trainable_lora_down(x))
    high = 0.5 * twin.trainable_lora_up2(twin.trainable_lora_down2(x))
    a = alpha.reshape(-1, 1, 1, 1)
    with gate.bind(alpha):
        out = twin(x)
    torch.testing.assert_close(out, base(x) + (1 - a) * low + a * high, atol=1e-5, rtol=1e-5)


def test_conv_adapter_down_follows_base_geometry_and_up_is_1x1():
    base = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)
    conv = TwinLoRAConv2d(base, rank=8, scale=1.0, dropout=0.1, twin=True, gate=AlphaGate())
    down, up = conv.trainable_lora_down, conv.trainable_lora_up
    assert (down.kernel_size, down.stride, down.padding, down.groups) == ((3, 3), (2, 2), (1, 1), 1)
    assert down.out_channels == 8 and up.kernel_size == (1, 1) and up.out_channels == 32
    assert torch.count_nonzero(up.weight) == 0
    assert abs(down.weight.std().item() - 1 / 8) < 0.02  # down ~ N(0, 1/r)


def test_windowed_batches_mix_per_sample():
    """A layer whose batch is N * windows (Swin) still mixes by each sample's own alpha."""
    torch.manual_seed(0)
    gate = AlphaGate()
    twin = TwinLoRALinear(nn.Linear(8, 8), rank=2, scale=1.0, dropout=0.0, twin=True, gate=gate).eval()
    _randomise_up(twin)
    windows = torch.randn(2 * 4, 5, 8)  # 2 samples x 4 windows
    with gate.bind(torch.tensor([[0.0], [1.0]])):
        mixed = twin(windows)
    with gate.bind(torch.zeros(8, 1)):
        all_low = twin(windows)
    with gate.bind(torch.ones(8, 1)):
        all_high = twin(windows)
    assert torch.allclose(mixed[:4], all_low[:4], atol=1e-6)
    assert torch.allclose(mixed[4:], all_high[4:], atol=1e-6)


@pytest.mark.parametrize("mode,trainable_names", [
    ("petal", {"trainable_lora_down", "trainable_lora_up", "trainable_lora_down2", "trainable_lora_up2"}),
    ("lora", {"trainable_lora_down", "trainable_lora_up"}),
])
def test_modes_freeze_everything_but_adapters(mode, trainable_names):
    model = TinyNet()
    _, report = inject(model, ("fc",), rank=4, mode=mode)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == trainable_names
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < report.percent < 100


def test_full_and_frozen_modes_add_no_adapters():
    full, frozen = TinyNet(), TinyNet()
    _, full_report = inject(full, ("fc",), mode="full")
    _, frozen_report = inject(frozen, ("fc",), mode="frozen")
    assert full_report.trainable == full_report.total and frozen_report.trainable == 0
    assert not adapter_state_dict(full) and not adapter_state_dict(frozen)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 40}, "rank 40"),
    ({"mode": "qlora"}, "unknown mode"),
    ({"targets": ("nothing.*",)}, "no Linear or Conv2d"),
])
def test_injection_rejects_bad_settings(kwargs, message):
    args = {"targets": ("fc", "conv"), "rank": 4, **kwargs}
    with pytest.raises(PetalError, match=message):
        inject(TinyNet(), args.pop("targets"), **args)


def test_twin_adapters_without_alpha_say_how_to_call_them():
    model = TinyNet()
    inject(model, ("fc",), mode="petal")
    with pytest.raises(RuntimeError, match="PetalRecognizer"):
        model(torch.randn(1, 3, 16, 16))
