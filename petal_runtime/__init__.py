"""PETAL runtime: detection, quality gate, recognition and gallery matching without torch."""
from .contract import CONTRACT_VERSION, Manifest, alpha_from_quality
from .errors import PetalError

__all__ = ["CONTRACT_VERSION", "Manifest", "PetalError", "alpha_from_quality"]
