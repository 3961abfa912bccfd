"""DDP: two gloo processes on CPU train the same adapters as one process with the same global batch.

What makes the runs comparable (see petal_train.fit): one seeded permutation per epoch, sharded by
DistributedSampler, so global batch k holds the same faces whatever the process count;
degradation keyed by (seed, epoch, sample index); identical initialisation on every rank; frozen
BatchNorm (no batch statistics); dropout set to 0 (a dropout mask is drawn per local batch, so
masks cannot agree between 1 and 2 processes).

The comparison runs in float64. In float32 the runs agree to ~1e-7 after the first step, but
AdamW's early updates are nearly lr * sign(gradient), so the few hundred adapter entries whose
gradient is ~0 flip with rounding noise and the second step differs by up to ~1e-3 relative in
single tensors (6e-5 over all adapters together). In float64 that noise is ~1e-16 and the two
runs agree to ~1e-12: any difference in data, sampling, gradient averaging or optimizer state
would show far above that.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist

from petal_train.checkpoint import load_checkpoint
from petal_train.fit import FitConfig, fit


@pytest.fixture(scope="module")
def four_faces(lfw_faces, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "ids"
    for label in range(4):
        path = root / f"person_{label}" / "0.png"
        path.parent.mkdir(parents=True)
        cv2.imwrite(str(path), cv2.cvtColor(lfw_faces.images[np.flatnonzero(lfw_faces.labels == label)[0]],
                                            cv2.COLOR_RGB2BGR))
    return root


def test_importing_the_trainer_sets_nothing_up_and_runs_single_process():
    from petal_train import distributed

    assert not dist.is_initialized()
    ctx = distributed.setup("cpu")
    assert ctx.world_size == 1 and not ctx.distributed and ctx.backend == "" and not dist.is_initialized()


def test_two_gloo_processes_train_the_same_adapters_as_one(four_faces, tmp_path):
    from petal_train.iqa import CNNIQA, save_iqa

    torch.manual_seed(0)
    save_iqa(CNNIQA(), tmp_path / "iqa.pth")
    common = dict(data=str(four_faces), iqa=str(tmp_path / "iqa.pth"), mode="petal", rank=2, max_steps=2, dropout=0.0,
                  precision="fp64", warmup_epochs=0.0, device="cpu", progress=False, log_every=1,
                  calibration_sample=8, head_init="embeddings")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes runs (cores / processes threads)
    try:
        fit(FitConfig(out=str(tmp_path / "one"), batch_size=2, **common))
    finally:
        torch.set_num_threads(threads)
    fit(FitConfig(out=str(tmp_path / "two"), batch_size=1, nproc=2, **common))

    one, two = load_checkpoint(tmp_path / "one" / "ckpt.pt"), load_checkpoint(tmp_path / "two" / "ckpt.pt")
    assert two.progress["world_size"] == 2 and one.progress["global_batch"] == two.progress["global_batch"] == 2
    assert one.iqa_threshold == two.iqa_threshold
    assert one.adapters.keys() == two.adapters.keys()
    for key, value in one.adapters.items():
        difference = (two.adapters[key] - value).norm() / value.norm()
        assert difference < 1e-9, f"{key} differs by {difference:.2e} (relative)"
    moved = [k for k in one.adapters if "lora_up" in k and one.adapters[k].abs().sum() > 0]
    assert len(moved) == len([k for k in one.adapters if "lora_up" in k])  # the comparison is not vacuous
    assert (two.head["weight"] - one.head["weight"]).norm() / one.head["weight"].norm() < 1e-9
