"""CNN-IQA (Kang et al., 2014), the quality gate of PETALface.

Same architecture and state-dict layout as pyiqa's `cnniqa` (7x7 conv 3->50, global max and min
pooling, fc 800-800-1, dropout 0.5), so a pyiqa weight file (`{'params': state_dict}`) loads
unchanged. Global pooling uses amax/amin so the exported graph keeps a dynamic spatial size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from petal_runtime.contract import IQA_MEAN, IQA_STD
from petal_runtime.errors import PetalError
from petal_runtime.files import sha256_file

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "iqa_faces.pth"


class CNNIQA(nn.Module):
    """Input: image normalised to [-1, 1] (as PETALface feeds it). Output: quality [N, 1]."""

    def __init__(self, ker_size: int = 7, n_kers: int = 50, n1_nodes: int = 800, n2_nodes: int = 800) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, n_kers, ker_size)
        self.fc1 = nn.Linear(2 * n_kers, n1_nodes)
        self.fc2 = nn.Linear(n1_nodes, n2_nodes)
        self.fc3 = nn.Linear(n2_nodes, 1)
        self.dropout = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.cat((h.amax(dim=(2, 3)), h.amin(dim=(2, 3))), dim=1)
        h = self.dropout(F.relu(self.fc1(h)))
        return self.fc3(F.relu(self.fc2(h)))


class QualityScorer(nn.Module):
    """Raw RGB pixels (0..255, [N, 3, H, W]) -> quality [N, 1]; what iqa.onnx contains."""

    def __init__(self, net: CNNIQA) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - IQA_MEAN) / IQA_STD)


def load_iqa(path: str | Path | None = None) -> tuple[CNNIQA, str]:
    """Load CNNIQA weights (pyiqa layout: {'params': state_dict}); returns the model and file sha256."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    if not path.is_file():
        raise PetalError(f"IQA weights not found at {path}; train them with `petal-train iqa train`")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        state = data["params"] if isinstance(data, dict) and "params" in data else data
        model = CNNIQA()
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise PetalError(f"{path} is not a CNNIQA weight file ({type(exc).__name__})") from None
    return model.eval(), sha256_file(path)


def save_iqa(model: CNNIQA, path: str | Path) -> None:
    from petal_runtime.files import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"params": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}, tmp)
