"""Distributed data parallel, set up on request and never at import time.

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT): with WORLD_SIZE > 1 it joins a process group, nccl on GPUs and gloo on
CPU; without it the same code runs as one process (the fallback), and every helper below degrades
to a no-op. `launch()` starts N local processes with that environment, for `petal-train fit
--nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`, tests and benchmarks;
`torchrun -m petal_train.cli fit ...` works as well, on one node or several.

Ranks: the global rank says who writes files (rank 0 alone), the local rank which GPU a process
takes and who fills a node's caches (local rank 0 of every node, `local_main_first`). Under
torchrun the rendezvous is torchrun's (`--rdzv-conf join_timeout=...`); without it rank 0 hosts a
TCP store at MASTER_ADDR:MASTER_PORT and every process waits at most `rdzv_timeout` seconds for
all of them to arrive, then fails with one line that names the address. `timeout` bounds every
collective after that (ranks waiting while rank 0 calibrates or a node aligns its data).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from petal_runtime.errors import PetalError

DEVICES = ("auto", "cpu", "cuda")
RDZV_TIMEOUT_S = 600.0  # as torchrun's c10d join_timeout
DIST_TIMEOUT_S = 1800.0  # gloo's default; nccl's own (10 min) is short for a node aligning a large set


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when single-process
    node_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0 of its node: fills the node's caches before the node's other processes read them."""
        return self.local_rank == 0

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


def setup(device: str = "auto", rdzv_timeout: float = RDZV_TIMEOUT_S,
          timeout: float = DIST_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun (or `launch`) described, or run single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    node_rank = int(os.environ.get("GROUP_RANK", str(rank // max(local_world, 1))))
    dev = resolve_device(device, local_rank if world > 1 else 0)
    if world <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif not os.environ.get("OMP_NUM_THREADS"):  # set (torchrun sets 1 for several per node): torch follows it
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        _join(backend, rank, world, dev, rdzv_timeout, timeout)
    return DistContext(rank, local_rank, world, dev, backend, node_rank, local_world)


def _join(backend: str, rank: int, world: int, dev: torch.device, rdzv_timeout: float, timeout: float) -> None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise PetalError(f"WORLD_SIZE is {world} but MASTER_ADDR or MASTER_PORT is not set: launch with torchrun "
                         "or petal-train fit --nproc / --nnodes")
    where, device_id = f"{addr}:{port}", dev if dev.type == "cuda" else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun met every node; its store is up
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout),
                                    device_id=device_id)
        except (RuntimeError, ValueError, OSError) as exc:
            raise PetalError(f"rank {rank} could not join the process group at {where} ({_first_line(exc)}); "
                             "on a cluster, start node rank 0's torchrun with --local-addr set to an address "
                             "the other nodes reach") from None
        return
    # Checked from Python first: the store's own failures come with a C++ stack trace on stderr.
    problem = _port_free(int(port)) if rank == 0 else _reachable(addr, int(port), rdzv_timeout)
    if problem is None:
        try:
            store = dist.TCPStore(addr, int(port), world, is_master=rank == 0, wait_for_workers=False,
                                  timeout=timedelta(seconds=rdzv_timeout), multi_tenant=True)
        except (RuntimeError, ValueError, OSError) as exc:
            problem = _first_line(exc)
    if problem is not None:
        if rank == 0:
            raise PetalError(f"rank 0 could not open the rendezvous on port {port} ({problem}); choose another "
                             "port in --rdzv-endpoint") from None
        raise PetalError(f"rank {rank} could not reach the rendezvous at {where} within {rdzv_timeout:g} s "
                         f"({problem}); is node rank 0 running there, with that port open to this machine?") from None
    _wait_for_everyone(store, rank, world, where, rdzv_timeout)
    store.set_timeout(timedelta(seconds=timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout),
                            device_id=device_id)


def _wait_for_everyone(store, rank: int, world: int, where: str, rdzv_timeout: float) -> None:
    """Each process checks in at rank 0's store; all wait until `world` have, for at most rdzv_timeout."""
    deadline = time.monotonic() + rdzv_timeout
    try:
        joined = store.add("petal/joined", 1)
        while joined < world:
            if time.monotonic() > deadline:
                raise PetalError(f"only {joined} of {world} processes joined the rendezvous at {where} within "
                                 f"{rdzv_timeout:g} s (this is rank {rank}): start every node's command with the "
                                 "same --nnodes and --rdzv-endpoint, or raise --rdzv-timeout")
            time.sleep(0.05)
            joined = store.add("petal/joined", 0)
    except (RuntimeError, OSError) as exc:  # rank 0 gave up and its store went away
        raise PetalError(f"rank {rank} lost the rendezvous at {where} before all {world} processes joined "
                         f"({_first_line(exc)})") from None


def _port_free(port: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _reachable(addr: str, port: int, timeout: float) -> str | None:
    """None once a TCP connection to addr:port succeeds within `timeout` s, else why the last try failed."""
    deadline, reason = time.monotonic() + timeout, "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return reason
        try:
            socket.create_connection((addr, port), timeout=min(left, 5.0)).close()
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) as --rdzv-endpoint takes it."""
    host, sep, port = endpoint.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PetalError(f"--rdzv-endpoint must be HOST:PORT (node rank 0's address and a free port), got {endpoint!r}")
    return host, int(port)


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


def on_main(fn: Callable[[], Any], ctx: DistContext) -> Any:
    """fn() on rank 0 alone, its result on every rank; a PetalError it raises is raised on every rank
    (the others would otherwise wait for rank 0 until the timeout)."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except PetalError as exc:
            if not ctx.distributed:
                raise
            error = str(exc)
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise PetalError(error)
    return result


def local_main_first(fn: Callable[[], Any], ctx: DistContext) -> Any:
    """fn() on local rank 0 of every node first (it fills that node's caches, on that node's disk), then
    on the node's other processes; a PetalError on any node's first process is raised on every rank."""
    result, error = None, None
    if ctx.is_local_main:
        try:
            result = fn()
        except PetalError as exc:
            if not ctx.distributed:
                raise
            error = f"rank {ctx.rank} (node {ctx.node_rank}): {exc}"
    errors = [e for e in gather_object(error, ctx) if e is not None]
    if errors:
        raise PetalError(errors[0])
    return result if ctx.is_local_main else fn()


def gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's object, in rank order, on every rank (pickled; small things)."""
    if not ctx.distributed:
        return [obj]
    box: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(box, obj)
    return box


def describe_ranks(ctx: DistContext) -> list[dict]:
    """Who took part: rank, node rank, local rank, host and device of every process."""
    mine = {"rank": ctx.rank, "node_rank": ctx.node_rank, "local_rank": ctx.local_rank,
            "host": socket.gethostname(), "device": str(ctx.device)}
    return gather_object(mine, ctx)


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


def _worker(local_rank: int, fn: Callable, args: tuple, nproc: int, nnodes: int, node_rank: int,
            addr: str, port: int) -> None:
    os.environ.update({"RANK": str(node_rank * nproc + local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc),
                       "GROUP_RANK": str(node_rank), "MASTER_ADDR": addr, "MASTER_PORT": str(port)})
    fn(*args)


def launch(fn: Callable, args: tuple, nproc: int, nnodes: int = 1, node_rank: int = 0,
           endpoint: str | None = None) -> None:
    """Run `fn(*args)` in `nproc` local processes that find each other as torchrun's would.

    With `nnodes` > 1 this is node `node_rank` of a job whose node rank 0 hosts the rendezvous at
    `endpoint` (HOST:PORT; a static rendezvous, as torchrun's default): global ranks
    node_rank * nproc ... + nproc - 1 of nnodes * nproc. SIGTERM to this process is passed on to the
    workers (which save and stop); Ctrl-C reaches them through the terminal's process group, so this
    process only waits for them.
    """
    import torch.multiprocessing as mp

    if nproc < 1:
        raise PetalError(f"--nproc must be at least 1, got {nproc}")
    if not 0 <= node_rank < nnodes:
        raise PetalError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        raise PetalError("already running under torchrun: drop --nproc and --nnodes (torchrun sets the process count)")
    if nnodes > 1 and not endpoint:
        raise PetalError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node rank 0's address, the same on every node)")
    addr, port = parse_endpoint(endpoint) if endpoint else ("127.0.0.1", free_port())
    context = mp.start_processes(_worker, args=(fn, args, nproc, nnodes, node_rank, addr, port), nprocs=nproc,
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


def result_file() -> Path:
    """A temporary file a launched worker writes its result into (see `write_result`)."""
    fd, path = tempfile.mkstemp(prefix="petal-result-", suffix=".json")
    os.close(fd)
    return Path(path)


def write_result(path: str | Path, result: dict, local_rank: int) -> None:
    """Local rank 0 reports to the launcher on its own node (every node has one; no shared disk needed)."""
    if local_rank == 0:
        Path(path).write_text(json.dumps(result))
