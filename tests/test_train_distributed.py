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

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist

from petal_train.checkpoint import load_checkpoint
from petal_train.distributed import free_port
from petal_train.fit import FitConfig, fit

REPO = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------
# Two nodes: two torchrun launchers (nnodes 2, one process each, a c10d rendezvous on 127.0.0.1),
# each in its own folder with its own PETAL_HOME, as two machines that share no disk would be.

def _node_env(home: Path) -> dict:
    """A node's environment: its own cache folder (the models linked in), one thread per process."""
    from petal_runtime.model_store import cache_dir

    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(cache_dir())
    return {**os.environ, "PYTHONPATH": str(REPO), "PETAL_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _two_torchrun_nodes(nodes: list[Path], fit_args: list[str], timeout: float = 600) -> list[tuple[int, str]]:
    """Node 0 and node 1 of one job, started together; (returncode, stderr) of each launcher.

    With the c10d rendezvous torchrun numbers the nodes itself (--node-rank is ignored) in the order
    of their addresses: `--local-addr` 127.0.0.1 sorts before localhost, so nodes[0] is node rank 0."""
    port = free_port()
    processes = []
    for rank, (node, addr) in enumerate(zip(nodes, ("127.0.0.1", "localhost"))):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", "petal-test", "--rdzv-conf", "join_timeout=120", "--local-addr", addr,
                   "--monitor-interval", "0.1", "-m", "petal_train.cli", "fit", *fit_args]
        processes.append(subprocess.Popen(command, cwd=node, env=_node_env(node / "home"), text=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in processes]
    finally:
        for p in processes:  # a launcher left waiting for its peer after the other failed
            if p.poll() is None:
                p.terminate()  # torchrun passes SIGTERM on to its worker
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return [(p.returncode, e) for p, e in zip(processes, errors)]


def test_two_torchrun_nodes_train_write_once_and_resume_as_one_process_would(four_faces, tmp_path):
    from petal_train.iqa import CNNIQA, save_iqa

    torch.manual_seed(0)
    save_iqa(CNNIQA(), tmp_path / "iqa.pth")
    (tmp_path / "t.json").write_text(json.dumps({"threshold": 0.3}))
    common = dict(data=str(four_faces), iqa=str(tmp_path / "iqa.pth"), calibration=str(tmp_path / "t.json"),
                  mode="petal", rank=2, epochs=2, dropout=0.0, precision="fp64", warmup_epochs=0.0, device="cpu",
                  log_every=1)
    args = [arg for key, value in common.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    args += ["--batch-size", "1", "--out", "run", "--no-progress"]  # --out relative: in each node's own folder
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()

    # 4 faces, a global batch of 2: 2 steps an epoch, 4 in all; stop after 2 and resume to the end.
    first = _two_torchrun_nodes(nodes, [*args, "--max-steps", "2"])
    assert [rc for rc, _ in first] == [0, 0], first
    run = nodes[0] / "run"
    assert not (nodes[1] / "run").exists()  # node 1 wrote nothing of the run
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["nnodes"] == 2 and config["backend"] == "gloo"
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in config["ranks"]] == [(0, 0, 0), (1, 1, 0)]
    assert load_checkpoint(run / "ckpt.pt").progress["global_step"] == 2
    for node in nodes:  # each node aligned the set once, into its own cache
        assert len(list((node / "home" / "aligned").glob("*.npz"))) == 1

    second = _two_torchrun_nodes(nodes, [*args, "--max-steps", "4", "--resume"])
    assert [rc for rc, _ in second] == [0, 0], second
    assert not (nodes[1] / "run").exists()
    two = load_checkpoint(run / "ckpt.pt")
    assert two.progress["global_step"] == 4 and two.progress["world_size"] == 2
    assert two.progress["status"] == "finished" and two.progress["global_batch"] == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["kind"] == "step"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    # Resumed with another --max-steps, step 3 runs at the new schedule's rate (not the old one's 0).
    assert steps[2]["lr"] == pytest.approx(5e-4 * (1 - 2 / 4) ** 2)

    # The same stop and resume in one process with the same global batch gives the same adapters.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = dict(common, out=str(tmp_path / "one"), batch_size=2, progress=False)
        fit(FitConfig(max_steps=2, **reference))
        fit(FitConfig(max_steps=4, resume=True, **reference))
    finally:
        torch.set_num_threads(threads)
    one = load_checkpoint(tmp_path / "one" / "ckpt.pt")
    assert one.progress["global_step"] == 4 and one.iqa_threshold == two.iqa_threshold == 0.3
    for key, value in one.adapters.items():
        difference = (two.adapters[key] - value).norm() / value.norm()
        assert difference < 1e-9, f"{key} differs by {difference:.2e} (relative)"
    assert (two.head["weight"] - one.head["weight"]).norm() / one.head["weight"].norm() < 1e-9
    assert [m["lr"] for m in steps] == pytest.approx(
        [json.loads(line)["lr"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
         if json.loads(line)["kind"] == "step"])


def _petal_train_node(node: Path, *args: str) -> subprocess.Popen:
    """`petal-train fit` on one node, with petal-train's own launcher (--nnodes, --node-rank, --rdzv-endpoint)."""
    node.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "petal_train.cli", "fit", *args], cwd=node,
                            env=_node_env(node / "home"), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _one_line_error(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[ WARN:")]  # OpenCV's own
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_rendezvous_that_cannot_be_reached_is_a_one_line_error(four_faces, tmp_path):
    nowhere, alone = free_port(), free_port()
    args = ["--data", str(four_faces), "--out", "run", "--device", "cpu", "--nnodes", "2", "--rdzv-timeout", "2"]
    late = _petal_train_node(tmp_path / "late", *args, "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{nowhere}")
    first = _petal_train_node(tmp_path / "first", *args, "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{alone}")
    message = _one_line_error(late)
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{nowhere} within 2 s" in message
    message = _one_line_error(first)
    assert f"only 1 of 2 processes joined the rendezvous at 127.0.0.1:{alone} within 2 s" in message
    assert not (tmp_path / "first" / "run").exists() and not (tmp_path / "late" / "run").exists()


def test_resume_is_refused_where_rank_0_has_no_checkpoint_and_another_node_has(four_faces, tmp_path):
    """Two nodes that share no disk, node 1 holding the run: resuming must not quietly start again on node 0."""
    held = tmp_path / "node1" / "run"
    fit(FitConfig(data=str(four_faces), out=str(held), mode="frozen", max_steps=1, batch_size=2, device="cpu",
                  progress=False))
    before = load_checkpoint(held / "ckpt.pt").progress["global_step"]
    port = free_port()
    args = ["--data", str(four_faces), "--out", "run", "--mode", "frozen", "--batch-size", "1", "--device", "cpu",
            "--resume", "--no-progress", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-timeout", "120"]
    nodes = [_petal_train_node(tmp_path / f"node{rank}", *args, "--node-rank", str(rank)) for rank in (0, 1)]
    messages = [_one_line_error(process) for process in nodes]
    assert messages[0] == messages[1]  # the same error on both nodes
    assert "global rank 0 (node 0" in messages[0] and "but node 1" in messages[0] and "has one" in messages[0]
    assert not (tmp_path / "node0" / "run").exists()
    assert load_checkpoint(held / "ckpt.pt").progress["global_step"] == before
