"""`petal-train fit`: train quality-gated adapters (or a baseline) on a frozen face recognizer.

The paper's recipe by default: AdamW (lr 5e-4, weight decay 0.1), linear warm-up then polynomial
decay (power 2) stepped per iteration, batch 8 per process, an ArcFace or CosFace head (s = 64),
gradients clipped to norm 5 (as arcface_torch does). Only the adapters and the head train; the
frozen base's BatchNorm layers stay in eval mode so their running statistics never move (in `full`
mode everything trains, BatchNorm included). Per sample, alpha = alpha_from_quality(IQA score of
the degraded input, t); the IQA network is frozen and runs under no_grad. t comes from
--calibration or is calibrated before the first epoch exactly as `petal-train calibrate` does it
(mean + std of the IQA scores of a seeded sample of degraded training faces), and is stored in the
checkpoint.

A run folder holds:
- ckpt.pt: an AdapterCheckpoint (adapters and head; `full` stores the backbone) whose `progress`
  carries optimizer, scheduler, grad scaler, epoch, step and RNG state for --resume;
- metrics.jsonl: one JSON object per logged step (`"kind": "step"`) and per epoch (`"epoch"`),
  appended line by line (a line is written whole; --resume drops lines past the checkpoint);
- config.json: the resolved configuration, identities held out, threshold, data summary.

Reproducibility across process counts: the sample order is one seeded permutation per epoch,
sharded by DistributedSampler, so global batch k holds the same samples for 1 or N processes;
degradation is keyed by (seed, epoch, sample index); each rank reseeds torch's generator per step
from (seed, step, rank), which makes a resumed run continue exactly as an uninterrupted one.
Dropout masks still differ between a 1-process and an N-process run (a mask is drawn per local
batch), so that comparison is made with `--dropout 0`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from petal_runtime.contract import alpha_from_quality
from petal_runtime.errors import PetalError, exit_on_user_error
from petal_runtime.files import atomic_path, atomic_write_text, read_json, sha256_file
from petal_runtime.model_store import cache_dir

from . import distributed as D
from .checkpoint import AdapterCheckpoint, load_checkpoint
from .data import DegradedFaces, TrainingData, load_training_data
from .degrade import FAMILIES, DegradeConfig
from .heads import DEFAULT_SCALE, HEADS, build_head
from .lora import MODES, adapter_state_dict
from .model import BuiltRecognizer, build_recognizer
from .registry import get_spec

CHECKPOINT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
HEAD_INITS = ("embeddings", "random")
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# What a resumed run must share with the run it continues.
RESUME_KEYS = ("data", "backbone", "backbone_weights", "mode", "rank", "lora_scale", "head", "head_scale",
               "margin", "holdout_fraction", "seed", "p_clean", "p_plain", "distill", "freeze_centres",
               "exclude_families", "drop_eval_identities", "drop_dev_identities")


@dataclass
class FitConfig:
    data: str
    out: str
    backbone: str = "sface"
    backbone_weights: str | None = None
    mode: str = "petal"
    rank: int = 8
    lora_scale: float = 1.0
    dropout: float | None = None  # set every dropout (adapters and backbone); None keeps the defaults
    epochs: int = 1
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    batch_size: int = 8  # per process
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    poly_power: float = 2.0
    clip_grad: float = 5.0  # 0 disables
    head: str = "arcface"
    head_scale: float = DEFAULT_SCALE
    margin: float | None = None  # None: the head's default (ArcFace 0.5, CosFace 0.4)
    head_init: str = "embeddings"  # class centres start at each identity's clean embedding
    # Optional anti-forgetting terms (README, "What keeps sharp faces in place"): class centres held
    # at the frozen model's clean embeddings, and each sample's adapted embedding pulled toward the
    # frozen embedding of its clean crop with weight `distill`. Off by default: on the benchmark's
    # unseen identities the paper's recipe measured better at low resolution and equal on sharp faces.
    freeze_centres: bool = False
    distill: float = 0.0
    p_clean: float = 0.3  # probability a training sample is left undegraded
    p_plain: float = 0.0  # probability a degraded sample is only resized (DegradeConfig.p_plain)
    exclude_families: tuple[str, ...] = ()  # degradation families never drawn (leave-one-family-out)
    holdout_fraction: float = 0.0
    drop_eval_identities: bool = False  # train on the rest of a set that holds evaluation identities
    drop_dev_identities: bool = False  # also keep the development identities out (release choices are made on them)
    calibration: str | None = None
    iqa: str | None = None
    calibration_sample: int = 1000  # as `petal-train calibrate`
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # DataLoader workers; None: 0 on CPU, 4 on GPU
    log_every: int = 10
    save_every: int = 0  # also checkpoint every N steps (0: at epoch ends, stops and the finish only)
    resume: bool = False
    progress: bool = True
    nproc: int = 1  # local processes to launch (torchrun sets WORLD_SIZE itself)
    nnodes: int = 1  # machines in the job (launch on each: the same options, its own --node-rank)
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node rank 0, for --nnodes > 1 without torchrun
    rdzv_timeout: float = D.RDZV_TIMEOUT_S  # seconds every process waits for all the others to arrive
    dist_timeout: float = D.DIST_TIMEOUT_S  # seconds a collective may wait (rank 0 calibrating, a node aligning)
    precision: str = "fp32"  # fp64: CPU-only numerical checks (e.g. multi-process against one process)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise PetalError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.head not in HEADS:
            raise PetalError(f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        if self.head_init not in HEAD_INITS:
            raise PetalError(f"unknown head init {self.head_init!r}; choose one of: {', '.join(HEAD_INITS)}")
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise PetalError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("nproc", "nnodes"):
            if getattr(self, name) < 1:
                raise PetalError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nnodes:
            raise PetalError(f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, "
                             f"got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise PetalError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node rank 0's address, the same on "
                             "every node)")
        if self.rdzv_endpoint:
            D.parse_endpoint(self.rdzv_endpoint)
        if not (self.rdzv_timeout > 0 and self.dist_timeout > 0):
            raise PetalError("--rdzv-timeout and --dist-timeout must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise PetalError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise PetalError("--lr must be positive, --weight-decay and --warmup-epochs non-negative")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise PetalError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISIONS:
            raise PetalError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not 0.0 <= self.p_plain <= 1.0:
            raise PetalError(f"--p-plain must be in [0, 1], got {self.p_plain}")
        if self.distill < 0:
            raise PetalError(f"--distill must be non-negative, got {self.distill}")
        unknown = sorted(set(self.exclude_families) - set(FAMILIES) - {"grayscale"})
        if unknown:
            raise PetalError(f"unknown degradation famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                             f"choose from: {', '.join([*FAMILIES, 'grayscale'])}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "exclude_families" in values:  # a list once it has been through JSON
            values["exclude_families"] = tuple(values["exclude_families"])
        return cls(**values)


@dataclass
class FitResult:
    run_dir: Path
    status: str  # finished | max_steps | stopped
    epoch: int
    step: int
    signal: int | None = None
    rank: int = 0  # the global rank this result was returned on (every rank returns one)
    local_rank: int = 0

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE


def fit(config: FitConfig) -> FitResult:
    """Train in this process, in `config.nproc` local processes, or as one rank under torchrun."""
    config.validate()
    D.resolve_device(config.device)  # a GPU option on a machine without one fails before any work
    if config.nproc > 1 or config.nnodes > 1:
        report = D.result_file()
        try:
            D.launch(_fit_worker, (asdict(config), str(report)), config.nproc, config.nnodes, config.node_rank,
                     config.rdzv_endpoint)
            result = json.loads(report.read_text())
        finally:
            report.unlink(missing_ok=True)
        return FitResult(Path(config.out), result["status"], result["epoch"], result["step"], result["signal"],
                         result["rank"])
    return _train(config)


def _train(config: FitConfig) -> FitResult:
    """This process as one rank (of torchrun's, launch's, or the only one)."""
    ctx = D.setup(config.device, config.rdzv_timeout, config.dist_timeout)
    try:
        result = Trainer(config, ctx).run()
    finally:
        D.teardown(ctx)
    return replace(result, rank=ctx.rank, local_rank=ctx.local_rank)


def _fit_worker(config: dict, report: str) -> None:
    """One launched process: train as one rank, report to the launcher on this node (no shared disk needed)."""
    result = _train(FitConfig.from_dict(config))
    D.write_result(report, {"status": result.status, "epoch": result.epoch, "step": result.step,
                            "signal": result.signal, "rank": result.rank}, result.local_rank)
    if result.status == "stopped":
        sys.exit(SIGNAL_EXIT.get(result.signal, 143))


# --------------------------------------------------------------------------------------------


class _TrainModule(nn.Module):
    """Recognizer + margin head as one module, so DDP synchronises both."""

    def __init__(self, built: BuiltRecognizer, head: nn.Module, distill: float) -> None:
        super().__init__()
        self.recognizer, self.head, self.distill = built.recognizer, head, distill

    def forward(self, images: torch.Tensor, alpha: torch.Tensor, labels: torch.Tensor,
                teacher: torch.Tensor | None = None):
        """(loss, top-1 accuracy, distillation term: mean 1 - cos to the teacher, 0 without one)."""
        embedding = self.recognizer.embed(images, alpha)
        with torch.autocast(images.device.type, enabled=False):
            embedding = embedding.to(self.head.weight.dtype)
            loss, accuracy = self.head.loss(embedding, labels)
            if teacher is None:
                return loss, accuracy, torch.zeros((), device=loss.device)
            distance = (1.0 - (F.normalize(embedding, dim=1) * teacher.to(embedding.dtype)).sum(1)).mean()
            return loss + self.distill * distance, accuracy, distance.detach()


class _Batches(Sampler):
    """Batches of a DistributedSampler's shard; can start part-way into an epoch (resume)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler, self.batch_size, self.skip = sampler, batch_size, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(self.sampler)
        for k in range(self.skip, len(indices) // self.batch_size):
            yield indices[k * self.batch_size:(k + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size - self.skip


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay the pretrained ones."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def poly_warmup(warmup_steps: int, total_steps: int, power: float):
    """LR factor per step: linear warm-up to 1, then (1 - progress) ** power down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span) ** power

    return factor


def base_weights_sha256(backbone: str, weights: str | None) -> str:
    """The sha256 a checkpoint pins its base to: the weight file given, or the backbone's pinned one."""
    if weights:
        return sha256_file(weights)
    import importlib

    module = importlib.import_module(get_spec(backbone).builder.__module__)
    pinned = getattr(module, "base_weights_sha256", None)
    if pinned is None:
        raise PetalError(f"backbone {backbone} has no pinned weights: pass --backbone-weights")
    return pinned()


def read_calibration(path: str | Path) -> dict:
    """The threshold of a calibration file as `petal-train calibrate` writes it (`threshold`), or `t`."""
    data = read_json(path, f"calibration file {path} does not exist", f"{path} is not a JSON calibration file")
    for key in ("threshold", "t"):
        if isinstance(data, dict) and isinstance(data.get(key), (int, float)) and not isinstance(data[key], bool):
            if not abs(data[key]) < 1e300:  # NaN, Infinity (json accepts both) and ints too big for a float
                raise PetalError(f"{path}: the threshold `{key}` is {data[key]!r}, not a finite number")
            return {**data, "t": float(data[key]), "file": str(path)}
    raise PetalError(f"{path} has no threshold (a `threshold` or `t` number)")


def calibrate_on_training_data(data: TrainingData, iqa_net: nn.Module, sample: int, seed: int) -> dict:
    """t as `petal-train calibrate --data ... --sample N --seed S` computes it (CPU, seeded).

    Lazily decoded sets (RecordIO) are first narrowed to a seeded sample of at most `sample` faces.
    """
    images = data.images
    if not isinstance(images, np.ndarray):
        picks = np.sort(np.random.default_rng([seed, 0xCA11B]).choice(len(images), min(sample, len(images)),
                                                                        replace=False))
        images = np.stack([np.asarray(images[int(i)]) for i in picks])
    from .calibrate import calibrate_threshold

    result = calibrate_threshold(images, iqa_net, sample=sample, seed=seed, degrade=True)
    return {**asdict(result), "t": float(result.threshold), "method": "petal_train.calibrate"}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the trainer, which saves a checkpoint before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MetricsLog:
    """metrics.jsonl on rank 0: whole lines appended; on resume, lines past the checkpoint dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, config: FitConfig, ctx: D.DistContext) -> None:
        self.cfg, self.ctx = config, ctx
        self.out = Path(config.out)
        self.ckpt_path = self.out / CHECKPOINT_FILE
        self.stop_signal: int | None = None
        # Rank 0 reads the run folder and sends what it found: other nodes need not share its disk.
        self._check_run_folder_on_main()
        resume = D.on_main(self._resume_state, ctx)
        self._load_data()
        torch.manual_seed(config.seed)  # identical adapter and head initialisation on every rank
        self._build_model()
        self._load_gate(resume)
        self._init_weights(resume)
        self._build_optimizer()
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.elapsed, self.last_lr = 0.0, config.lr
        if resume is not None:
            self._load_progress(resume.progress)
        sampler = DistributedSampler(self.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
        self.batches = _Batches(sampler, config.batch_size)
        self.metrics = MetricsLog(self.out / METRICS_FILE, self.global_step if resume else None, ctx.is_main)
        self.ranks = D.describe_ranks(ctx)
        if ctx.is_main:
            atomic_write_text(self.out / CONFIG_FILE, json.dumps(self._config_record(), indent=2))

    # ---------------------------------------------------------------- setup helpers

    def _load_data(self) -> None:
        config, ctx = self.cfg, self.ctx

        def load() -> TrainingData:
            return load_training_data(config.data, config.holdout_fraction, config.seed,
                                      progress=config.progress and ctx.is_local_main,
                                      drop_eval_identities=config.drop_eval_identities,
                                      drop_dev_identities=config.drop_dev_identities)

        # Each node's local rank 0 aligns (and caches, on its own disk) first; the node's others read the cache.
        self.data: TrainingData = D.local_main_first(load, ctx)
        self._check_same_data()
        self.dataset = DegradedFaces(self.data.images, self.data.labels, seed=config.seed, p_clean=config.p_clean,
                                     config=DegradeConfig(exclude=tuple(config.exclude_families),
                                                          p_plain=config.p_plain),
                                     with_clean=config.distill > 0)
        self.global_batch = config.batch_size * ctx.world_size
        self.steps_per_epoch = (len(self.dataset) // ctx.world_size) // config.batch_size
        if self.steps_per_epoch == 0:
            raise PetalError(f"{len(self.dataset)} training images do not fill one batch of "
                             f"{config.batch_size} x {ctx.world_size} processes; lower --batch-size")
        self.total_steps = self.steps_per_epoch * config.epochs
        # The learning rate decays to zero where training stops: at --max-steps when that comes first.
        self.schedule_steps = min(self.total_steps, config.max_steps or self.total_steps)

    def _check_same_data(self) -> None:
        """Every rank must index the same faces: a node with another copy of --data is refused, naming it."""
        digest = hashlib.sha256("\0".join(self.data.names).encode())
        digest.update(self.data.labels.tobytes())
        mine = f"{len(self.data)} images of {self.data.num_classes} identities (sha256 {digest.hexdigest()[:12]})"
        seen = D.gather_object((self.ctx.node_rank, mine), self.ctx)
        odd = [(node, what) for node, what in seen if what != seen[0][1]]
        if odd:
            raise PetalError(f"--data {self.cfg.data} differs between nodes: node {seen[0][0]} has {seen[0][1]}, "
                             f"node {odd[0][0]} has {odd[0][1]}; give every node the same data set")

    def _build_model(self) -> None:
        config = self.cfg
        backbone_kwargs = {"weights": config.backbone_weights} if config.backbone_weights else {}
        self.built = build_recognizer(config.backbone, mode=config.mode, rank=config.rank, scale=config.lora_scale,
                                      dropout=config.dropout if config.dropout is not None else 0.1,
                                      **backbone_kwargs)
        if config.dropout is not None:
            for m in self.built.recognizer.modules():
                if isinstance(m, nn.Dropout):
                    m.p = config.dropout
        self.base_sha256 = base_weights_sha256(config.backbone, config.backbone_weights)
        self.head = build_head(config.head, self.built.spec.embedding_size, self.data.num_classes,
                               config.head_scale, config.margin)
        self.device, self.dtype = self.ctx.device, PRECISIONS[config.precision]
        if self.dtype != torch.float32 and self.device.type != "cpu":
            raise PetalError(f"--precision {config.precision} is for CPU numerical checks; use fp32 (AMP) on GPU")
        # channels_last: oneDNN (CPU) and cuDNN (AMP) run these convs about a third faster.
        self.built.recognizer.to(self.device, self.dtype, memory_format=torch.channels_last)
        self.head.to(self.device, self.dtype)

    def _load_gate(self, resume: AdapterCheckpoint | None) -> None:
        """The IQA network and the threshold t (petal mode): resumed, read, or calibrated on the training data."""
        config, ctx = self.cfg, self.ctx
        self.iqa, self.iqa_sha256, self.calibration = None, "", {}
        if config.mode == "petal":
            from .iqa import QualityScorer, load_iqa

            net, self.iqa_sha256 = load_iqa(config.iqa)
            if resume is not None:
                self.calibration = resume.training.get("calibration", {"t": resume.iqa_threshold})
            elif config.calibration:
                self.calibration = read_calibration(config.calibration)
            else:  # on rank 0, on the CPU, before the net moves to the device
                self.calibration = D.broadcast_object(calibrate_on_training_data(
                    self.data, net, config.calibration_sample, config.seed) if ctx.is_main else None, ctx)
            self.iqa = QualityScorer(net).to(self.device, self.dtype).eval().requires_grad_(False)
        self.threshold = float(self.calibration.get("t", 0.5))

    def _init_weights(self, resume: AdapterCheckpoint | None) -> None:
        config = self.cfg
        if resume is not None:
            resume.apply_to(self.built.recognizer.backbone, self.base_sha256)
            self.head.load_state_dict({k: v.to(self.device) for k, v in resume.head.items()})
        elif config.head_init == "embeddings":
            self.head.init_from_embeddings(self._cached_class_centres())
        if config.freeze_centres and config.mode != "frozen":  # frozen mode trains nothing but the centres
            self.head.weight.requires_grad_(False)
        # The teacher: the frozen recognizer itself (adapters bypassed), or a frozen copy in `full` mode.
        self.teacher = copy.deepcopy(self.built.recognizer).eval() if config.mode == "full" and config.distill else None

    def _build_optimizer(self) -> None:
        config = self.cfg
        self.module = _TrainModule(self.built, self.head, config.distill)
        self.model = D.wrap(self.module, self.ctx)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_warmup(warmup, self.schedule_steps, config.poly_power))
        self.scaler = D.grad_scaler(ctx=self.ctx)

    def _check_run_folder_on_main(self) -> None:
        """--resume where rank 0 sees no checkpoint but another node does: refused, not a fresh start.

        The run folder is global rank 0's; with torchrun's c10d rendezvous rank 0 is the node whose
        address sorts first, not necessarily the one that held it last time."""
        if not (self.cfg.resume and self.ctx.distributed):
            return
        found = D.gather_object((self.ckpt_path.is_file(), self.ctx.node_rank, socket.gethostname()), self.ctx)
        if not found[0][0] and any(has for has, _, _ in found):
            node, host = next((node, host) for has, node, host in found if has)
            raise PetalError(f"--resume: global rank 0 (node {found[0][1]}, {found[0][2]}) has no {self.ckpt_path}, "
                             f"but node {node} ({host}) has one: put --out on a disk every node shares, or make "
                             f"{host} node rank 0 again (torchrun --rdzv-backend static --node-rank 0, or a "
                             "--local-addr that sorts first)")

    def _resume_state(self) -> AdapterCheckpoint | None:
        exists = self.ckpt_path.is_file()
        if exists and not self.cfg.resume:
            raise PetalError(f"{self.ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        if not (exists and self.cfg.resume):
            if self.cfg.resume and self.ctx.is_main:
                print(f"no checkpoint in {self.out} yet: starting a new run", file=sys.stderr)
            return None
        checkpoint = load_checkpoint(self.ckpt_path)
        before = checkpoint.training.get("config", {})
        changed = [k for k in RESUME_KEYS if k in before and before[k] != getattr(self.cfg, k)]
        if changed:
            raise PetalError(f"--resume with a different {', '.join(changed)} than the run in {self.out} "
                             f"(was {', '.join(f'{k}={before[k]!r}' for k in changed)})")
        batch = checkpoint.progress.get("global_batch")
        if batch is not None and batch != self.cfg.batch_size * self.ctx.world_size:
            raise PetalError(f"the run in {self.out} used a global batch of {batch}; resume it with "
                             f"--batch-size x processes = {batch}")
        return checkpoint

    def _load_progress(self, progress: dict) -> None:
        self.optimizer.load_state_dict(progress["optimizer"])
        self.scheduler.load_state_dict(progress["scheduler"])
        # The schedule is this run's: resumed with another --max-steps, the next step's learning rate is
        # the new schedule's at that step (not the old one's, which is 0 where the old run stopped).
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        if progress.get("scaler"):
            self.scaler.load_state_dict(progress["scaler"])
        self.epoch, self.step_in_epoch = int(progress["epoch"]), int(progress["step_in_epoch"])
        self.global_step, self.elapsed = int(progress["global_step"]), float(progress.get("elapsed_s", 0.0))
        if "torch_rng" in progress:
            torch.set_rng_state(progress["torch_rng"])

    def _cached_class_centres(self) -> torch.Tensor:
        """`_class_centres`, cached per base weights and in-memory data set (every run on the same
        data shares them: minutes of forward passes on a CPU)."""
        images = self.data.images
        if not isinstance(images, np.ndarray) or self.ctx.distributed:
            return self._class_centres()
        digest = hashlib.sha256(self.base_sha256.encode())
        digest.update("\0".join(self.data.names).encode())
        digest.update(self.data.labels.tobytes())
        digest.update(np.ascontiguousarray(images[:, ::7, ::7]).tobytes())
        path = cache_dir().parent / "centres" / f"{self.cfg.backbone}-{digest.hexdigest()[:24]}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False)).to(self.device, self.dtype)
            except (OSError, ValueError):
                pass  # a damaged cache is computed again
        centres = self._class_centres()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, centres.float().cpu().numpy())
        return centres

    def _class_centres(self) -> torch.Tensor:
        """Each identity's mean clean embedding (up to 4 images), split over the ranks."""
        labels = self.data.labels
        picks = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(self.data.num_classes)])
        mine = picks[self.ctx.rank::self.ctx.world_size]
        sums = torch.zeros(self.data.num_classes, self.built.spec.embedding_size, device=self.device,
                           dtype=self.dtype)
        recognizer = self.built.recognizer.eval()
        starts = range(0, len(mine), 64)
        if self.cfg.progress and self.ctx.is_main:
            from tqdm import tqdm

            starts = tqdm(starts, desc="class centres", unit="batch")
        # Adapters bypassed: the centres are the frozen model's (a resumed or full run included).
        with torch.inference_mode(), self.built.gate.bypassed():
            for start in starts:
                chunk = mine[start:start + 64]
                images = torch.from_numpy(np.stack([np.asarray(self.data.images[int(i)]) for i in chunk])
                                          .transpose(0, 3, 1, 2)).to(self.device, self.dtype,
                                                                      memory_format=torch.channels_last)
                embedding = recognizer(images, torch.ones(len(chunk), 1, device=self.device)).to(self.dtype)
                sums.index_add_(0, torch.from_numpy(labels[chunk]).to(self.device), embedding)
        if self.ctx.distributed:
            torch.distributed.all_reduce(sums)
        return sums

    def _config_record(self) -> dict:
        return {"config": asdict(self.cfg), "world_size": self.ctx.world_size,
                "nnodes": len({r["node_rank"] for r in self.ranks}), "ranks": self.ranks,
                "global_batch": self.global_batch,
                "device": str(self.device), "backend": self.ctx.backend or "single-process",
                "layout": self.data.layout, "train_images": len(self.data), "train_identities": self.data.num_classes,
                "holdout_identities": self.data.holdout,
                "evaluation_identities_dropped": len(self.data.evaluation_dropped),
                "skipped": dict(self.data.skipped.reasons),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "calibration": self.calibration, "iqa_sha256": self.iqa_sha256, "base_sha256": self.base_sha256,
                "adapters": str(self.built.report), "torch": torch.__version__}

    # ---------------------------------------------------------------- training

    def _train_mode(self) -> None:
        self.module.train()
        if self.cfg.mode != "full":
            freeze_batchnorm(self.module)

    def _backward(self, images: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor | None = None):
        """Alpha from the frozen IQA, forward, backward; returns (loss, accuracy, alpha, distillation)."""
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.no_grad():
            images = images.to(self.dtype)
            if self.iqa is not None:
                alpha = alpha_from_quality(self.iqa(images), self.threshold)
            else:
                alpha = torch.ones(len(images), 1, device=self.device, dtype=self.dtype)
            teacher = self._teacher(clean) if clean is not None else None
        torch.manual_seed(self.cfg.seed + 1_000_003 * (self.global_step + 1) + 7919 * self.ctx.rank)
        with D.autocast(self.ctx):
            loss, accuracy, distance = self.model(images, alpha, labels, teacher)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, accuracy, alpha, distance

    @torch.no_grad()
    def _teacher(self, clean: torch.Tensor) -> torch.Tensor:
        """The frozen recognizer's L2-normalised embedding of the clean crops (eval mode: no dropout)."""
        clean = clean.to(self.device, self.dtype, memory_format=torch.channels_last)
        ones = torch.ones(len(clean), 1, device=self.device, dtype=self.dtype)
        if self.teacher is not None:
            return self.teacher(clean, ones)
        recognizer = self.built.recognizer
        recognizer.eval()
        try:
            with self.built.gate.bypassed(), D.autocast(self.ctx):
                return recognizer(clean, ones).to(self.dtype)
        finally:
            self._train_mode()

    def gradients(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradients of one training step on this batch, per trainable parameter; nothing moves."""
        self._train_mode()
        self._backward(images, labels)
        return {name: p.grad.detach().float().cpu() / self.scaler.get_scale() if self.scaler.is_enabled()
                else p.grad.detach().float().cpu()
                for name, p in self.module.named_parameters() if p.requires_grad and p.grad is not None}

    def _step(self, images: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """One optimizer step on (images, labels) or (images, clean images, labels)."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        clean, labels = rest if len(rest) == 2 else (None, rest[0])
        loss, accuracy, alpha, distance = self._backward(images, labels, clean)
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return torch.stack([loss.detach().float(), accuracy.float(), alpha.mean().float(), distance.float()])

    def run(self) -> FitResult:
        cfg, ctx = self.cfg, self.ctx
        restore = self._install_signal_handlers()
        workers = cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        try:
            if self.epoch >= cfg.epochs:
                return FitResult(self.out, "finished", self.epoch, self.global_step)
            if self._max_steps_reached():
                return FitResult(self.out, "max_steps", self.epoch, self.global_step)
            while self.epoch < cfg.epochs:
                self.dataset.set_epoch(self.epoch)
                self.batches.set_epoch(self.epoch, skip=self.step_in_epoch)
                loader = DataLoader(self.dataset, batch_sampler=self.batches, num_workers=workers,
                                    pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_sigint)
                bar = self._bar()
                self._train_mode()
                window, window_start, epoch_sum, epoch_n = [], time.perf_counter(), 0.0, 0
                for batch in loader:
                    t0 = time.perf_counter()
                    window.append(self._step(*batch))
                    self.global_step += 1
                    self.step_in_epoch += 1
                    self.elapsed += time.perf_counter() - t0
                    if bar is not None:
                        bar.update(1)
                    if self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                        stats = D.all_reduce_mean(torch.stack(window).mean(0), ctx).tolist()
                        now = time.perf_counter()
                        self._log("step", stats, len(window) * self.global_batch / (now - window_start))
                        epoch_sum, epoch_n = epoch_sum + stats[0] * len(window), epoch_n + len(window)
                        if bar is not None:
                            bar.set_postfix(loss=f"{stats[0]:.3f}", alpha=f"{stats[2]:.2f}")
                        window, window_start = [], now
                    if D.any_rank(self.stop_signal is not None, ctx):
                        return self._stop("stopped", bar)
                    if self._max_steps_reached() and self.step_in_epoch < self.steps_per_epoch:
                        return self._stop("max_steps", bar)
                    if cfg.save_every and self.global_step % cfg.save_every == 0:
                        self.save("running")
                if bar is not None:
                    bar.close()
                self.metrics.write({"kind": "epoch", "epoch": self.epoch, "step": self.global_step,
                                    "loss": epoch_sum / max(epoch_n, 1), "lr": self.last_lr,
                                    "elapsed_s": round(self.elapsed, 3)})
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                done = self.epoch == cfg.epochs
                self.save("finished" if done else "max_steps" if self._max_steps_reached() else "running")
                if not done and self._max_steps_reached():
                    D.barrier(ctx)
                    return FitResult(self.out, "max_steps", self.epoch, self.global_step)
            D.barrier(ctx)
            return FitResult(self.out, "finished", self.epoch, self.global_step)
        except PetalError:
            if self.global_step:  # e.g. a dataset file that became unreadable: keep the steps done so far
                self.save("failed")
            raise
        finally:
            restore()

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.max_steps) and self.global_step >= self.cfg.max_steps

    def _stop(self, status: str, bar) -> FitResult:
        if bar is not None:
            bar.close()
        self.save(status)
        D.barrier(self.ctx)  # nobody exits before rank 0 has written the checkpoint
        if status == "stopped" and self.ctx.is_main:
            print(f"stopped at epoch {self.epoch} step {self.global_step}: checkpoint saved to {self.ckpt_path}; "
                  "continue with --resume", file=sys.stderr)
        return FitResult(self.out, status, self.epoch, self.global_step, self.stop_signal)

    def _bar(self):
        if not (self.ctx.is_main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, unit="step",
                    desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True)

    def _log(self, kind: str, stats: list[float], samples_per_s: float) -> None:
        self.metrics.write({"kind": kind, "epoch": self.epoch, "step": self.global_step, "loss": stats[0],
                            "accuracy": stats[1], "alpha": stats[2], "distill": stats[3], "lr": self.last_lr,
                            "samples_per_s": round(samples_per_s, 3), "elapsed_s": round(self.elapsed, 3)})

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def request_stop(signum, _frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the save
            self.stop_signal = signum

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore

    # ---------------------------------------------------------------- checkpoint

    def save(self, status: str) -> None:
        if not self.ctx.is_main:
            return
        backbone = self.built.recognizer.backbone
        checkpoint = AdapterCheckpoint(
            backbone=self.cfg.backbone, base_sha256=self.base_sha256, lora=self.built.lora,
            adapters=_to_cpu(adapter_state_dict(backbone)), iqa_sha256=self.iqa_sha256,
            iqa_threshold=self.threshold, head=_to_cpu(dict(self.head.state_dict())),
            backbone_state=_to_cpu(dict(backbone.state_dict())) if self.cfg.mode == "full" else {},
            training={"config": asdict(self.cfg), "calibration": self.calibration,
                      "head": {"kind": self.cfg.head, "scale": self.head.scale, "margin": self.head.margin,
                               "num_classes": self.data.num_classes, "init": self.cfg.head_init},
                      "identities": list(self.data.names), "holdout_identities": list(self.data.holdout),
                      "layout": self.data.layout, "train_images": len(self.data)},
            progress={"status": status, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                      "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                      "global_batch": self.global_batch, "world_size": self.ctx.world_size,
                      "elapsed_s": self.elapsed, "optimizer": _to_cpu(self.optimizer.state_dict()),
                      "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                      "torch_rng": torch.get_rng_state()})
        checkpoint.save(self.ckpt_path)


# --------------------------------------------------------------------------------------------
# CLI


_DEFAULTS = FitConfig(data="", out="")


@click.command("fit")
@click.option("--data", required=True, help="Dataset folder (identity folders, TinyFace or RecordIO) or `portraits`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (ckpt.pt, metrics.jsonl).")
@click.option("--backbone", default=_DEFAULTS.backbone, show_default=True)
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False),
              help="Base weights for backbones PETAL cannot fetch.")
@click.option("--mode", type=click.Choice(MODES), default=_DEFAULTS.mode, show_default=True)
@click.option("--rank", default=_DEFAULTS.rank, show_default=True, help="Adapter rank.")
@click.option("--epochs", default=_DEFAULTS.epochs, show_default=True)
@click.option("--max-steps", type=int, help="Stop after this many steps in total (with a checkpoint); the learning "
                                            "rate decays to zero there.")
@click.option("--batch-size", default=_DEFAULTS.batch_size, show_default=True, help="Per process.")
@click.option("--lr", default=_DEFAULTS.lr, show_default=True)
@click.option("--weight-decay", default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--warmup-epochs", default=_DEFAULTS.warmup_epochs, show_default=True)
@click.option("--head", type=click.Choice(tuple(HEADS)), default=_DEFAULTS.head, show_default=True)
@click.option("--margin", type=float, help="Margin of the head (ArcFace 0.5, CosFace 0.4 by default).")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default=_DEFAULTS.head_init, show_default=True,
              help="Class centres start at each identity's clean embedding, or random.")
@click.option("--dropout", type=float, help="Set every dropout probability (adapters and backbone).")
@click.option("--p-clean", default=_DEFAULTS.p_clean, show_default=True,
              help="Probability a sample is left undegraded.")
@click.option("--p-plain", default=_DEFAULTS.p_plain, show_default=True,
              help="Probability a degraded sample is only resized, no other degradation (a third party's clean "
                   "downsample).")
@click.option("--distill", default=_DEFAULTS.distill, show_default=True,
              help="Weight of 1 - cos(adapted embedding, frozen embedding of the clean crop); 0: the paper's recipe.")
@click.option("--freeze-centres", is_flag=True,
              help="Hold the margin head's class centres at the frozen model's clean embeddings (where galleries "
                   "live) instead of training them (the paper).")
@click.option("--exclude-family", "exclude_families", multiple=True, type=click.Choice([*FAMILIES, "grayscale"]),
              help="A degradation family never drawn in training (repeatable; leave-one-family-out).")
@click.option("--drop-eval-identities", is_flag=True,
              help="Drop the evaluation identities (petal_train/splits/lfw_eval.txt) the data holds, instead of "
                   "refusing it.")
@click.option("--drop-dev-identities", is_flag=True,
              help="Also keep the development identities (petal_train/splits/lfw_dev.txt) out of training, so that "
                   "release choices can be made on them.")
@click.option("--holdout-fraction", default=_DEFAULTS.holdout_fraction, show_default=True,
              help="Identities kept out of training (seeded).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="Calibration JSON with the threshold t.")
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False), help="CNNIQA weights (default: the shipped ones).")
@click.option("--seed", default=_DEFAULTS.seed, show_default=True)
@click.option("--precision", type=click.Choice(tuple(PRECISIONS)), default=_DEFAULTS.precision, show_default=True,
              help="fp64: CPU-only numerical checks (a multi-process or multi-node run against one process).")
@click.option("--device", type=click.Choice(D.DEVICES), default=_DEFAULTS.device, show_default=True)
@click.option("--nproc", default=_DEFAULTS.nproc, show_default=True,
              help="Local processes (DDP); or launch with torchrun.")
@click.option("--nnodes", default=_DEFAULTS.nnodes, show_default=True,
              help="Machines in the job: run this command on each, with its own --node-rank (or use torchrun).")
@click.option("--node-rank", default=_DEFAULTS.node_rank, show_default=True, help="This machine's index, 0..nnodes-1.")
@click.option("--rdzv-endpoint", help="HOST:PORT of node rank 0, where every node meets (with --nnodes > 1).")
@click.option("--rdzv-timeout", default=_DEFAULTS.rdzv_timeout, show_default=True,
              help="Seconds each process waits for all the others to arrive before giving up.")
@click.option("--dist-timeout", default=_DEFAULTS.dist_timeout, show_default=True,
              help="Seconds a process may wait for the others after the rendezvous (e.g. a node aligning its data).")
@click.option("--workers", type=int, help="DataLoader workers per process (default 0 on CPU, 4 on GPU).")
@click.option("--log-every", default=_DEFAULTS.log_every, show_default=True)
@click.option("--save-every", default=_DEFAULTS.save_every, show_default=True, help="Also checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def fit_command(no_progress: bool, **options) -> None:
    """Train adapters (petal, lora), the whole backbone (full) or only the head (frozen)."""
    result = fit(FitConfig(progress=not no_progress, **options))
    if result.status == "stopped":
        sys.exit(SIGNAL_EXIT.get(result.signal, 143))
    if result.rank == 0:  # under torchrun every rank returns here, and every node's launcher
        click.echo(f"{result.status}: epoch {result.epoch}, step {result.step}; checkpoint {result.checkpoint}")


if __name__ == "__main__":  # torchrun --nproc-per-node N -m petal_train.fit --data ... --out ...
    exit_on_user_error(fit_command)()
