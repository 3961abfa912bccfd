"""`petal-train grad-report`: first-iteration gradients of full fine-tuning against petal."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from petal_runtime.errors import PetalError


def test_grad_report_compares_full_fine_tuning_with_petal_on_real_faces(lfw_faces, tmp_path):
    from petal_train.cli import cli
    from petal_train.iqa import CNNIQA, save_iqa

    for label in range(3):
        for k, i in enumerate(np.flatnonzero(lfw_faces.labels == label)[:2]):
            path = tmp_path / "ids" / f"person_{label}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(lfw_faces.images[i], cv2.COLOR_RGB2BGR))
    torch.manual_seed(0)
    save_iqa(CNNIQA(), tmp_path / "iqa.pth")
    (tmp_path / "t.json").write_text(json.dumps({"t": 0.5}))

    result = CliRunner().invoke(cli, ["grad-report", "--data", str(tmp_path / "ids"), "--out", str(tmp_path / "g.png"),
                                      "--batch-size", "2", "--iqa", str(tmp_path / "iqa.pth"), "--calibration",
                                      str(tmp_path / "t.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "g.json").read_text())
    full, petal = report["modes"]["full"], report["modes"]["petal"]
    assert full["trainable_backbone_parameters"] == 9_642_880  # every SFace weight
    assert 0 < petal["trainable_backbone_parameters"] < full["trainable_backbone_parameters"] / 4
    # Up-projections start at zero, so on the first step only they receive gradient, never the base.
    assert 0 < petal["nonzero_gradients"] < petal["trainable_backbone_parameters"] / 2
    assert full["nonzero_gradients"] > 0.5 * full["trainable_backbone_parameters"]
    assert "blocks.conv_1" in full["layer_grad_l2"] and "pre_fc1" in petal["layer_grad_l2"]
    assert "full" in result.output and "petal" in result.output


def test_grad_report_wants_a_png_path(tmp_path):
    from petal_train.grad_report import gradient_report

    with pytest.raises(PetalError, match="PNG"):
        gradient_report("portraits", tmp_path / "report.txt")
