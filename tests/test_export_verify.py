"""The comparator: what it reports, and what it refuses (disagreement, ignored alpha, bad quality)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from petal_export.onnx_export import alpha_reaches_output
from petal_export.verify import (Comparator, TorchRunner, check_iqa, check_recognizer, iqa_cases, rank_correlation,
                                 recognizer_cases)
from petal_runtime.backends.base import Runner, TensorInfo
from petal_runtime.errors import PetalError


class Gated(torch.nn.Module):
    """A stand-in recognizer whose embedding depends on alpha per sample."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.low, self.high = torch.nn.Linear(12, 6), torch.nn.Linear(12, 6)
        self.gain = gain

    def forward(self, image, alpha):
        x = image.reshape(len(image), -1)[:, :12] / 255.0
        return F.normalize(self.low(x) * (1 - alpha) + self.gain * self.high(x) * alpha, dim=1)


class Wrapped(Runner):
    """A candidate that runs a function of the inputs (to simulate a broken export)."""

    def __init__(self, fn, inputs, output) -> None:
        super().__init__("candidate")
        self.fn, self._inputs, self.output = fn, inputs, output

    def activate_impl(self): pass
    def deactivate_impl(self): pass
    def inputs(self): return [TensorInfo(n, np.dtype(np.float32), None) for n in self._inputs]
    def outputs(self): return [TensorInfo(self.output, np.dtype(np.float32), None)]
    def infer_impl(self, feed): return {self.output: self.fn(feed)}


@pytest.fixture
def faces():
    return np.random.default_rng(0).uniform(0, 255, (5, 3, 40, 40)).astype(np.float32)


def _comparator(model, faces):
    return Comparator("recognizer", TorchRunner(model, ["image", "alpha"], "embedding"), recognizer_cases(faces),
                      "embedding")


def test_cases_cover_alphas_and_batch_one(faces):
    cases = dict(recognizer_cases(faces))
    assert list(cases) == ["alpha=0", "alpha=0.5", "alpha=1", "mixed alpha", "batch 1"]
    assert np.unique(cases["mixed alpha"]["alpha"]).size == 5 and len(cases["batch 1"]["image"]) == 1
    sizes = [feed["image"].shape[2:] for _, feed in iqa_cases(faces)]
    assert sizes == [(40, 40), (40, 40), (20, 20), (24, 32)]
    assert len(iqa_cases(faces[:, :, :8, :8])) == 3  # too small to crop


def test_identical_candidate_passes(faces):
    model = Gated()
    comparator = _comparator(model, faces)
    same = Wrapped(lambda f: model(torch.from_numpy(f["image"]), torch.from_numpy(f["alpha"])).detach().numpy(),
                   ["image", "alpha"], "embedding")
    comparison = comparator.compare(same)
    check_recognizer(comparator, comparison)
    assert comparison.min_cosine == pytest.approx(1.0) and comparison.max_abs_diff < 1e-6
    assert "cosine min" in comparison.summary() and len(comparison.lines()) == 6


def test_disagreeing_candidate_refused(faces):
    model = Gated()
    comparator = _comparator(model, faces)
    other = Gated(gain=1.5)
    wrong = Wrapped(lambda f: other(torch.from_numpy(f["image"]), torch.from_numpy(f["alpha"])).detach().numpy(),
                    ["image", "alpha"], "embedding")
    with pytest.raises(PetalError, match="disagrees with PyTorch on real faces"):
        check_recognizer(comparator, comparator.compare(wrong))


def test_candidate_ignoring_alpha_refused(faces):
    """Adapters folded at one alpha: right at that alpha, blind to the input."""
    model = Gated()
    comparator = _comparator(model, faces)
    folded = Wrapped(lambda f: model(torch.from_numpy(f["image"]),
                                     torch.full((len(f["image"]), 1), 0.5)).detach().numpy(),
                     ["image", "alpha"], "embedding")
    comparison = comparator.compare(folded)
    with pytest.raises(PetalError, match="does not respond to alpha|disagrees"):
        check_recognizer(comparator, comparison, min_cosine=0.0)  # even with no cosine bound


def test_iqa_bound_in_alpha_units(faces):
    scorer = lambda image: image.mean((1, 2, 3)).reshape(-1, 1) / 255.0  # noqa: E731
    comparator = Comparator("iqa", TorchRunner(_Module(scorer), ["image"], "quality"), iqa_cases(faces), "quality")
    near = Wrapped(lambda f: scorer(torch.from_numpy(f["image"])).numpy() + 0.01, ["image"], "quality")
    comparison = comparator.compare(near, "int8")
    assert check_iqa(comparator, comparison) == pytest.approx(1.0)  # order kept
    with pytest.raises(PetalError, match="quality scores"):
        check_iqa(comparator, comparator.compare(near, "fp32"))


class _Module(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_rank_correlation():
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert rank_correlation(a, a * 2 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


def _graph(uses_alpha: bool) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4])
    alpha = helper.make_tensor_value_info("alpha", TensorProto.FLOAT, ["N", 1])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4])
    node = (helper.make_node("Mul", ["image", "alpha"], ["embedding"]) if uses_alpha
            else helper.make_node("Identity", ["image"], ["embedding"]))
    return helper.make_model(helper.make_graph([node], "g", [image, alpha], [out]))


def test_alpha_path_is_structural():
    assert alpha_reaches_output(_graph(True))
    assert not alpha_reaches_output(_graph(False))
