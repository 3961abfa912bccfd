"""PETALface's Swin ("swin_256new", the paper's Swin-B) as a native PyTorch module, without timm.

Input (RGB - 127.5) / 127.5 at 120x120, 6x6 patches -> 20x20 tokens of 384 channels, stages of
[2, 18, 2] blocks with [8, 16, 16] heads on 5x5 windows (20x20 -> 10x10 -> 5x5 tokens), then the
head BN1d(38400) - Dropout - Linear(38400 -> 512) - BN1d(512) on the flattened tokens.
Module names and buffers (`relative_position_index`, `attn_mask`, `absolute_pos_embed`) match the
official code, so its plain state-dict checkpoints load with `strict=True`.

Two things differ from the official code on purpose, neither changes a key or an output:
- Batch sizes are never read into Python: every reshape keeps the batch as -1, so a traced/ONNX
  graph takes any batch. Windows of one sample stay contiguous in the batch dimension (window
  `b * num_windows + w`), which the twin adapters rely on when they mix per sample (see lora.py).
- The official attention computes the shifted-window mask but never adds it (the masked logits go
  to a variable that is dropped), and its checkpoints were trained that way. `shift_mask=False`
  (the default) reproduces that; `shift_mask=True` gives textbook Swin for training from scratch.

Adapters: PETALface puts twin LoRA on every attention `qkv` (what `lora_targets` names here) and a
single, ungated LoRA on the head's Linear (`feature_layer.2`). `inject` applies one mode to all
targets, so that single head LoRA is left out: after `inject(mode="petal")` the state dict equals
the official `swin_256new_iqa` minus `feature_layer.2.trainable_lora_{down,up}.weight`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from petal_runtime.errors import PetalError

from ..registry import register_model
from .iresnet import load_weights_file

HEAD_DROPOUT = 0.25


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples during training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window * window, C], the windows of each sample contiguous.

    The batch is -1, never a Python int read off the tensor, so a traced graph keeps it dynamic.
    """
    _, h, w, c = x.shape
    x = x.reshape(-1, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, window * window, C] -> [B, H, W, C]; inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the (2w-1)^2 relative-position bias table (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[nW, window^2, window^2] of 0 / -100: which token pairs of a shifted window were neighbours."""
    regions = torch.zeros(1, h, w, 1)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (hs, ws) in enumerate((hs, ws) for hs in spans for ws in spans):
        regions[:, hs, ws, :] = label
    labels = window_partition(regions, window).squeeze(-1)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B * nW, N, C]; mask: [nW, N, N] or None."""
        n, heads = self.window * self.window, self.num_heads
        qkv = self.qkv(x).reshape(-1, n, 3, heads, self.dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            attn = attn.reshape(-1, mask.shape[0], heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(-1, heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(-1, n, self.dim)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """LN, (shifted) window attention, residual; LN, MLP, residual. Tokens: [B, H * W, C]."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, shift_mask: bool = False) -> None:
        super().__init__()
        if resolution <= window:  # one window covers the map: nothing to shift
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"a {resolution}x{resolution} token map does not split into {window}x{window} windows")
        self.resolution, self.window, self.shift, self.shift_mask = resolution, window, shift, shift_mask
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # A buffer even when unused (shift_mask=False): the official checkpoints carry it.
        self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.resolution, x.shape[-1]
        y = self.norm1(x).reshape(-1, r, r, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask if self.shift_mask else None)
        y = window_reverse(y, self.window, r, r)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(-1, r * r, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of twice the channels (LN over 4C, Linear 4C -> 2C)."""

    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.resolution, x.shape[-1]
        x = x.reshape(-1, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(-1, (r // 2) * (r // 2), 4 * c)))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then optional merging."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, window: int,
                 drop_path: Sequence[float], downsample: bool, shift_mask: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2,
                      drop_path=drop_path[i], shift_mask=shift_mask) for i in range(depth))
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv, then LayerNorm over the tokens."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked in eager mode only: under tracing the sizes are tensors, and the graph's
        # fixed-size ops reject a wrong size anyway.
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinPetal(nn.Module):
    """PETALface's Swin: patch embedding + absolute positions, Swin stages, LN, BN-Linear-BN head."""

    def __init__(self, img_size: int = 120, patch_size: int = 6, embed_dim: int = 384,
                 depths: Sequence[int] = (2, 18, 2), num_heads: Sequence[int] = (8, 16, 16), window: int = 5,
                 num_features: int = 512, drop_path_rate: float = 0.05, shift_mask: bool = False) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads need one entry per stage")
        resolution = img_size // patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution * resolution, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        dim = embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            start = sum(depths[:i])
            self.layers.append(BasicLayer(dim, resolution, depth, heads, window, rates[start:start + depth],
                                          downsample=not last, shift_mask=shift_mask))
            if not last:
                dim, resolution = dim * 2, resolution // 2
        self.norm = nn.LayerNorm(dim)
        flat = dim * resolution * resolution  # 1536 * 5 * 5 = 38400 for the paper's model
        self.feature_layer = nn.Sequential(nn.BatchNorm1d(flat), nn.Dropout(HEAD_DROPOUT),
                                           nn.Linear(flat, num_features), nn.BatchNorm1d(num_features))
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.absolute_pos_embed)
        for layer in self.layers:
            x = layer(x)
        return self.feature_layer(self.norm(x).flatten(1))  # token-major flatten, as the official head


@register_model(input_size=120, embedding_size=512, norm_mean=127.5, norm_std=127.5,
                lora_targets=("layers.*.blocks.*.attn.qkv",))
def swin_petal(pretrained: bool = False, weights: str | Path | None = None, *,
               embed_dim: int = 384, depths: Sequence[int] = (2, 18, 2), num_heads: Sequence[int] = (8, 16, 16),
               shift_mask: bool = False, drop_path_rate: float = 0.05) -> SwinPetal:
    """The paper's Swin (214 M parameters); `weights` is the path of an official swin_256new model.pt.

    The size arguments exist for small test variants; official weights need the defaults.
    """
    if pretrained and weights is None:
        raise PetalError("swin_petal has no downloadable weights: pass weights=<path to the official model.pt> "
                         "(or pretrained=False for a random init)")
    model = SwinPetal(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                      shift_mask=shift_mask, drop_path_rate=drop_path_rate)
    if weights is not None:
        load_weights_file(model, weights)
    return model.eval()
