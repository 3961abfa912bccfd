"""iResNet-50/100 (arcface_torch layout, as in AdaFace and PETALface) as a native PyTorch module.

The module tree mirrors arcface_torch's `IResNet` name for name (`conv1`, `bn1`, `prelu`,
`layer1..4`, `bn2`, `fc`, `features`), so the released `model.pt` files, which are plain state
dicts, load with `strict=True`. Those weights cannot be downloaded here: the user brings the file.

Input: (RGB - 127.5) / 127.5 at 112x112. Output: 512-d embedding (not normalised).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from petal_runtime.errors import PetalError

from ..registry import register_model
from ..torch_files import load_torch_file

BN_EPS = 1e-5
FC_SPATIAL = 7 * 7  # 112 px halved four times


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """arcface_torch's IResNet with `layers` blocks per stage; every stage halves the resolution."""

    def __init__(self, layers: Sequence[int], num_features: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        channels = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            downsample = nn.Sequential(nn.Conv2d(channels, planes, 1, 2, bias=False),
                                       nn.BatchNorm2d(planes, eps=BN_EPS))
            stage = [IBasicBlock(channels, planes, 2, downsample)]
            stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            channels = planes
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * FC_SPATIAL, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's conv init (BN defaults already match), so random init behaves like theirs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def load_weights_file(model: nn.Module, weights: str | Path) -> None:
    """Load a plain state dict saved with torch.save into `model` (strict), as one-line errors.

    `weights_only=True` because the file comes from outside: unpickling arbitrary objects would run
    code. Shared by the backbones whose weights the user brings.
    """
    path = Path(weights)
    state = load_torch_file(path, "weights file", "PyTorch weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PetalError(f"{path} does not hold a plain state dict (name -> tensor)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})"
                           for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise PetalError(f"{path} does not fit {type(model).__name__}: {detail}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise PetalError(f"{path} does not fit {type(model).__name__}: {len(wrong)} tensors of the wrong shape "
                         f"(e.g. {k}: {tuple(state[k].shape)}, expected {tuple(own[k].shape)})")
    model.load_state_dict(state, strict=True)


def _build(layers: Sequence[int], pretrained: bool, weights: str | Path | None, name: str) -> IResNet:
    if pretrained and weights is None:
        raise PetalError(f"{name} has no downloadable weights: pass weights=<path to the official model.pt> "
                         "(or pretrained=False for a random init)")
    model = IResNet(layers)
    if weights is not None:
        load_weights_file(model, weights)
    return model.eval()


# LoRA on both 3x3 convs of every block (nearly all of the compute) and on the embedding layer.
# PETALface's own iresnet also adapts the stem conv and the 1x1 shortcuts; those stay frozen here
# (pass `targets` to build_recognizer to add them).
_LORA_TARGETS = ("layer*.*.conv1", "layer*.*.conv2", "fc")


@register_model(input_size=112, embedding_size=512, norm_mean=127.5, norm_std=127.5, lora_targets=_LORA_TARGETS)
def iresnet50(pretrained: bool = False, weights: str | Path | None = None) -> IResNet:
    """iResNet-50 ([3, 4, 14, 3] blocks); `weights` is the path of an official model.pt."""
    return _build((3, 4, 14, 3), pretrained, weights, "iresnet50")


@register_model(input_size=112, embedding_size=512, norm_mean=127.5, norm_std=127.5, lora_targets=_LORA_TARGETS)
def iresnet100(pretrained: bool = False, weights: str | Path | None = None) -> IResNet:
    """iResNet-100 ([3, 13, 30, 3] blocks); `weights` is the path of an official model.pt."""
    return _build((3, 13, 30, 3), pretrained, weights, "iresnet100")
