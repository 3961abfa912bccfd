"""Comparator (after Polygraphy's): the same real faces through a reference and a candidate runner.

The reference is the PyTorch model; candidates are ONNX Runtime sessions on the exported graphs
(FP32, FP16, INT8) and, on a GPU, TensorRT engines. Recognizer cases: alpha 0, 0.5 and 1 for the
whole batch, a batch of mixed per-sample alphas, and batch 1. IQA cases: the batch, batch 1, and
two other spatial sizes (its graph takes any). For each case the maximum absolute difference and
(for embeddings) the per-sample cosine are reported; an export is refused below the thresholds.

Alpha must matter: the embedding output has to be reachable from the `alpha` input in the graph,
and where the checkpoint's adapters change the embedding, the candidate's response to alpha (alpha
1 against alpha 0) has to match the reference's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from petal_runtime.backends.base import Runner, TensorInfo
from petal_runtime.contract import ALPHA_INPUT, EMBEDDING_OUTPUT, IMAGE_INPUT
from petal_runtime.errors import PetalError

# Minimum per-sample cosine to the PyTorch FP32 embeddings, by precision.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.95}
# IQA: largest allowed |quality difference|, by precision. Quality enters alpha = 0.5 + (q - t) one
# to one, so this is also the largest change of alpha the variant may cause.
MAX_QUALITY_ERROR = {"fp32": 1e-4, "fp16": 5e-3, "int8": 0.05}
# Below this the checkpoint's adapters do not move the embedding (e.g. freshly initialised ones).
ALPHA_EFFECT_FLOOR = 1e-4

Case = tuple[str, dict[str, np.ndarray]]


class TorchRunner(Runner):
    """A PyTorch module as a runner (CPU, eval mode, no grad): the comparator's reference."""

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str], output_name: str,
                 name: str = "pytorch") -> None:
        super().__init__(name)
        self.module = module
        self.input_names = list(input_names)
        self.output_name = output_name

    def activate_impl(self) -> None:
        self.module.eval()

    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, np.dtype(np.float32), None) for n in self.input_names]

    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(self.output_name, np.dtype(np.float32), None)]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feed[n], np.float32)) for n in self.input_names]
            return {self.output_name: self.module(*args).float().numpy()}

    def deactivate_impl(self) -> None:
        pass


def recognizer_cases(faces: np.ndarray) -> list[Case]:
    """faces: float32 [N, 3, S, S] RGB 0..255 (real aligned crops)."""
    n = len(faces)
    full = lambda a: np.full((n, 1), a, np.float32)  # noqa: E731
    mixed = np.linspace(0.0, 1.0, n, dtype=np.float32).reshape(n, 1) if n > 1 else full(0.3)
    return [("alpha=0", {IMAGE_INPUT: faces, ALPHA_INPUT: full(0.0)}),
            ("alpha=0.5", {IMAGE_INPUT: faces, ALPHA_INPUT: full(0.5)}),
            ("alpha=1", {IMAGE_INPUT: faces, ALPHA_INPUT: full(1.0)}),
            ("mixed alpha", {IMAGE_INPUT: faces, ALPHA_INPUT: mixed}),
            ("batch 1", {IMAGE_INPUT: faces[:1], ALPHA_INPUT: np.full((1, 1), 0.7, np.float32)})]


def iqa_cases(faces: np.ndarray) -> list[Case]:
    h, w = faces.shape[2:]
    cases = [(f"{h}x{w}", {IMAGE_INPUT: faces}),
             ("batch 1", {IMAGE_INPUT: faces[:1]}),
             (f"{(h + 1) // 2}x{(w + 1) // 2}", {IMAGE_INPUT: np.ascontiguousarray(faces[:, :, ::2, ::2])})]
    if h >= 32 and w >= 32:  # a non-square crop
        cases.append((f"{h - 16}x{w - 8}", {IMAGE_INPUT: np.ascontiguousarray(faces[:, :, 8:h - 8, 4:w - 4])}))
    return cases


@dataclass
class CaseResult:
    case: str
    batch: int
    max_abs_diff: float
    min_cosine: float | None = None  # embeddings only
    mean_cosine: float | None = None

    def line(self) -> str:
        text = f"{self.case:<12s} n={self.batch:<3d} max|diff| {self.max_abs_diff:.2e}"
        if self.min_cosine is not None:
            text += f"  cosine min {self.min_cosine:.6f} mean {self.mean_cosine:.6f}"
        return text


@dataclass
class Comparison:
    graph: str
    reference: str
    candidate: str
    precision: str
    results: list[CaseResult]
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # candidate, by case

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.results)

    @property
    def min_cosine(self) -> float | None:
        values = [r.min_cosine for r in self.results if r.min_cosine is not None]
        return min(values) if values else None

    @property
    def mean_cosine(self) -> float | None:
        values = [r.mean_cosine for r in self.results if r.mean_cosine is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> str:
        text = f"{self.graph} {self.candidate} vs {self.reference}: max|diff| {self.max_abs_diff:.2e}"
        if self.min_cosine is not None:
            text += f", cosine min {self.min_cosine:.6f} mean {self.mean_cosine:.6f}"
        return text

    def lines(self) -> list[str]:
        return [self.summary()] + ["    " + r.line() for r in self.results]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(1) / denom


class Comparator:
    """Runs the reference once over the cases; compares any number of candidates against it."""

    def __init__(self, graph: str, reference: Runner, cases: list[Case], output: str) -> None:
        self.graph = graph
        self.cases = cases
        self.output = output
        self.reference_name = reference.name
        with reference:
            self.reference = {name: reference.infer(feed)[output] for name, feed in cases}

    def compare(self, candidate: Runner, precision: str = "fp32") -> Comparison:
        results, outputs = [], {}
        with candidate:
            for name, feed in self.cases:
                got = np.asarray(candidate.infer(feed)[self.output], np.float32)
                want = self.reference[name]
                if got.shape != want.shape:
                    raise PetalError(f"{candidate.name} returned {self.output} of shape {got.shape} for case "
                                     f"{name}, PyTorch {want.shape}")
                if not np.all(np.isfinite(got)):
                    raise PetalError(f"{candidate.name} returned non-finite values for case {name}")
                outputs[name] = got
                result = CaseResult(name, len(got), float(np.abs(got - want).max()))
                if self.output == EMBEDDING_OUTPUT:
                    cos = _cosines(got, want)
                    result.min_cosine, result.mean_cosine = float(cos.min()), float(cos.mean())
                results.append(result)
        return Comparison(self.graph, self.reference_name, candidate.name, precision, results, outputs)

    def alpha_effect(self, outputs: dict[str, np.ndarray] | None = None) -> float:
        """max |embedding(alpha=1) - embedding(alpha=0)| of the reference (or of `outputs`)."""
        source = self.reference if outputs is None else outputs
        return float(np.abs(source["alpha=1"] - source["alpha=0"]).max())


def check_recognizer(comparator: Comparator, comparison: Comparison, min_cosine: float | None = None) -> None:
    """Refuse the candidate if its cosine to PyTorch is too low or it ignores alpha."""
    threshold = MIN_COSINE[comparison.precision] if min_cosine is None else min_cosine
    worst = min(comparison.results, key=lambda r: r.min_cosine)
    if worst.min_cosine < threshold:
        raise PetalError(f"{comparison.candidate} disagrees with PyTorch on real faces: cosine {worst.min_cosine:.6f} "
                         f"< {threshold} ({comparison.precision}, case {worst.case}); the export was not kept")
    want = comparator.alpha_effect()
    if want > ALPHA_EFFECT_FLOOR:
        got = comparator.alpha_effect(comparison.outputs)
        if got < 0.5 * want:
            raise PetalError(f"{comparison.candidate} does not respond to alpha (embedding change {got:.2e} between "
                             f"alpha 0 and 1, PyTorch {want:.2e}); the export was not kept")


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (no tie correction): does the candidate order faces by quality as PyTorch does?"""
    ra = np.argsort(np.argsort(a.reshape(-1))).astype(np.float64)
    rb = np.argsort(np.argsort(b.reshape(-1))).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


def check_iqa(comparator: Comparator, comparison: Comparison, max_error: float | None = None) -> float:
    """Refuse the candidate if its quality scores (and so alpha) stray; returns the rank correlation."""
    limit = MAX_QUALITY_ERROR[comparison.precision] if max_error is None else max_error
    case = comparator.cases[0][0]
    rho = rank_correlation(comparator.reference[case], comparison.outputs[case])
    if comparison.max_abs_diff > limit:
        raise PetalError(f"{comparison.candidate} disagrees with PyTorch on quality scores: max|diff| "
                         f"{comparison.max_abs_diff:.3e} > {limit} ({comparison.precision}; alpha would move as "
                         f"much); the export was not kept")
    return rho


__all__ = ["ALPHA_EFFECT_FLOOR", "CaseResult", "Comparator", "Comparison", "MAX_QUALITY_ERROR", "MIN_COSINE",
           "TorchRunner", "check_iqa", "check_recognizer", "iqa_cases", "rank_correlation", "recognizer_cases"]
