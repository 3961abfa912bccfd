"""Helpers for the exporter tests: checkpoints whose adapters matter, IQA weights, face folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Adapter `up` weights ~ N(0, UP_STD): the embedding moves visibly with alpha (cosine between alpha 0
# and 1 below 0.99 on real faces), as trained adapters do, without drowning the base model.
UP_STD = 0.004
RANK = 4


def make_iqa(path: Path, seed: int = 0) -> Path:
    import torch

    from petal_train.iqa import CNNIQA, save_iqa

    torch.manual_seed(seed)
    save_iqa(CNNIQA(), path)
    return path


def make_checkpoint(path: Path, iqa_path: Path | None = None, base_sha256: str | None = None,
                    mode: str = "petal", up_std: float = UP_STD, threshold: float = 0.02) -> Path:
    """An SFace PETAL checkpoint with nonzero adapters (so alpha changes the embedding)."""
    import torch

    from petal_runtime.files import sha256_file
    from petal_runtime.model_store import SFACE
    from petal_train.checkpoint import AdapterCheckpoint
    from petal_train.lora import adapter_state_dict
    from petal_train.model import build_recognizer

    built = build_recognizer("sface", mode=mode, rank=RANK)
    generator = torch.Generator().manual_seed(0)
    for name, p in built.recognizer.backbone.named_parameters():
        if "trainable_lora_up" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * up_std)
    checkpoint = AdapterCheckpoint("sface", base_sha256 or SFACE.sha256, built.lora,
                                   adapter_state_dict(built.recognizer.backbone),
                                   iqa_sha256=sha256_file(iqa_path) if iqa_path else "", iqa_threshold=threshold)
    return checkpoint.save(path)


def write_faces(folder: Path, faces_nchw: np.ndarray) -> Path:
    """Aligned faces (float32 NCHW 0..255) as 112x112 PNGs, which the exporter takes as aligned."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(faces_nchw):
        rgb = np.clip(face.transpose(1, 2, 0), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"face_{i:02d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones too) with its content, to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)
