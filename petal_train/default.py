"""Where the shipped default adapter checkpoint lives: the one place that knows (no torch needed)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_CHECKPOINT_NAME = "default"  # what `petal-export default` and the demo's --checkpoint accept
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def default_checkpoint_path() -> Path:
    """petal_train/weights/sface_default.pt (it may be absent from a trimmed install)."""
    return WEIGHTS_DIR / "sface_default.pt"
