"""Distributed data parallel, set up on request and never at import time.

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
with WORLD_SIZE > 1 it joins a process group, nccl on GPUs and gloo on CPU; without it the same
code runs as one process (the fallback), and every helper below degrades to a no-op. `launch()`
starts N local processes with that environment, for `petal-train fit --nproc N`, tests and
benchmarks; `torchrun -m petal_train.fit ...` works as well.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from petal_runtime.errors import PetalError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when single-process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks the GPU when there is one; `cuda` without a GPU is a user error."""
    if name not in DEVICES:
        raise PetalError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PetalError("--device cuda was given, but this machine has no usable GPU "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise PetalError(f"process {local_rank} needs GPU {local_rank}, "
                         f"but only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun (or `launch`) described, or run single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank if world > 1 else 0)
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, local_rank, world, dev, backend)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (pickled; for small things: a threshold, a config)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, ctx: DistContext, src: int = 0) -> torch.Tensor:
    if ctx.distributed:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / ctx.world_size


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on any: lets all ranks stop at the same step."""
    if not ctx.distributed:
        return flag
    box = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item() > 0)


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel over `module` (already on ctx.device), or the module itself."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)


def autocast(ctx: DistContext):
    """fp16 autocast on GPU (paired with `grad_scaler`), nothing on CPU."""
    if ctx.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(ctx: DistContext) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=ctx.amp)


# --------------------------------------------------------------------------------------------
# Local launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable, args: tuple, world: int, port: int) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    fn(*args)


def launch(fn: Callable, args: tuple, nproc: int) -> None:
    """Run `fn(*args)` in `nproc` local processes that find each other as torchrun's would.

    SIGTERM to this process is passed on to the workers (which save and stop); Ctrl-C reaches them
    through the terminal's process group, so this process only waits for them.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise PetalError(f"--nproc must be at least 1, got {nproc}")
    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        raise PetalError("already running under torchrun: drop --nproc (torchrun sets the process count)")
    context = mp.start_processes(_worker, args=(fn, args, nproc, free_port()), nprocs=nproc,
                                 join=False, start_method="spawn")

    def forward(signum, _frame):
        for process in context.processes:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, forward), (signal.SIGINT, signal.SIG_IGN))}
    try:
        try:
            while not context.join():
                pass
        except mp.ProcessExitedException as exc:
            if exc.exit_code in (130, 143):  # stopped by a signal after saving (see fit)
                raise SystemExit(exc.exit_code) from None
            raise PetalError(f"training process {exc.error_index} exited with code {exc.exit_code}") from None
        except mp.ProcessRaisedException as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "an error"
            if "PetalError" in last:
                raise PetalError(last.split("PetalError:", 1)[-1].strip()) from None
            raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
