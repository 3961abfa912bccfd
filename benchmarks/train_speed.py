"""Training speed: samples per second for each mode, one process against N data-parallel processes.

On CPU: one process (torch's default threads; also pinned to one thread, which shows how much a
busy machine punishes intra-op threading) against N gloo processes (cores / N threads each), the
same per-process batch, so the N-process run trains N times the global batch per step. On a
machine with GPUs: one GPU against all of them with nccl (AMP on). Every run is a real
`petal-train fit` (data loading, on-the-fly degradation, IQA gate, margin head, AdamW, DDP
synchronisation); setup (model build, calibration, head init) is excluded, and so are the first
--warmup steps. Samples/s is the median over the measured steps of global batch / step time, read
from the runs' metrics.jsonl. Prints a markdown table (and --json writes the numbers).

    python benchmarks/train_speed.py                          # all modes, this CPU, 1 vs 2 processes
    python benchmarks/train_speed.py --modes petal,frozen --steps 6
    python benchmarks/train_speed.py --device cuda            # 1 GPU vs all GPUs (nccl)

The machine's load average is printed before and after: numbers from a busy machine are lower and
noisier, and the ratio is only meaningful when nothing else competes for the cores.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("frozen", "lora", "petal", "full")


from machine import cpu_name, load_average  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

def _iqa_weights(work: Path, given: str | None) -> str:
    """The IQA file to gate with: given, shipped, or a seeded untrained CNNIQA (speed is the same)."""
    from petal_train.iqa import DEFAULT_WEIGHTS, CNNIQA, save_iqa

    if given:
        return given
    if DEFAULT_WEIGHTS.is_file():
        return str(DEFAULT_WEIGHTS)
    import torch

    torch.manual_seed(0)
    save_iqa(CNNIQA(), work / "iqa.pth")
    return str(work / "iqa.pth")


def measure(mode: str, nproc: int, *, data: str, batch_size: int, steps: int, warmup: int, device: str,
            iqa: str, calibration: str, work: Path, threads: int | None = None) -> dict:
    """One `fit` run; `threads` pins the intra-op threads of a single-process run."""
    import torch

    from petal_train.fit import FitConfig, fit

    out = work / f"{mode}-{nproc}-{threads or 'default'}"
    config = FitConfig(data=data, out=str(out), mode=mode, batch_size=batch_size, epochs=10_000,
                       max_steps=warmup + steps, log_every=1, head_init="random", iqa=iqa, calibration=calibration,
                       device=device, progress=False, nproc=nproc)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        fit(config)
    finally:
        torch.set_num_threads(previous)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if r.get("kind") == "step" and r["step"] > warmup]
    run = json.loads((out / "config.json").read_text())
    return {"mode": mode, "processes": nproc, "threads": threads, "backend": run["backend"],
            "global_batch": run["global_batch"],
            "samples_per_s": statistics.median(rates), "steps_measured": len(rates), "wall_s": round(wall, 1),
            "adapters": run["adapters"]}


def _table(rows: list[dict], nproc: int, backend: str, threads: int) -> str:
    """One row per mode: 1 process (default threads), 1 process (1 thread, CPU only), N processes."""
    by_mode: dict[str, dict] = {}
    for row in rows:
        key = "many" if row["processes"] > 1 else ("one_thread" if row["threads"] == 1 else "one")
        by_mode.setdefault(row["mode"], {})[key] = row
    pinned = any("one_thread" in runs for runs in by_mode.values())
    head = (["mode", "trainable (backbone)", f"1 process, {threads} threads"]
            + (["1 process, 1 thread"] if pinned else []))
    head += [f"{nproc} {backend} processes", f"{nproc} processes / 1 process"] if nproc > 1 else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rate(row):
        return f"{row['samples_per_s']:.2f}" if row else "n/a"

    for mode, runs in by_mode.items():
        one, many = runs.get("one"), runs.get("many")
        trainable = one["adapters"].split(", ", 1)[-1].split(" parameters")[0] if one else "?"
        cells = [mode, trainable, rate(one)] + ([rate(runs.get("one_thread"))] if pinned else [])
        if nproc > 1:
            ratio = f"{many['samples_per_s'] / one['samples_per_s']:.2f}x" if one and many else "n/a"
            cells += [rate(many), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command()
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--data", default="portraits", show_default=True, help="Training data (any `petal-train fit --data`).")
@click.option("--batch-size", default=8, show_default=True, help="Per process (the paper's recipe).")
@click.option("--steps", default=3, show_default=True, help="Measured steps per run.")
@click.option("--warmup", default=1, show_default=True, help="Steps discarded first.")
@click.option("--nproc", type=int, help="Processes of the parallel run (default: 2 on CPU, all GPUs on cuda).")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--one-thread/--no-one-thread", default=True, show_default=True,
              help="On CPU, also time one process pinned to 1 thread (shows oversubscription on a busy machine).")
@click.option("--iqa", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the numbers here.")
def main(modes, data, batch_size, steps, warmup, nproc, device, one_thread, iqa, json_out) -> None:
    import torch

    from petal_runtime.files import atomic_write_text
    from petal_train.distributed import resolve_device

    resolve_device(device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    nproc = nproc or (gpus if device == "cuda" else 2)
    backend = "nccl" if device == "cuda" else "gloo"
    threads = torch.get_num_threads()
    header = (f"device: {torch.cuda.get_device_name(0) + f' x{gpus}' if gpus else cpu_name()}, "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"batch {batch_size} per process, {steps} measured steps after {warmup} warm-up")
    print(header)
    print(f"load average before: {load_average()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gate = _iqa_weights(work, iqa)
        calibration = work / "t.json"
        calibration.write_text(json.dumps({"t": 0.5}))  # the threshold does not change the speed
        plan = [(1, None)] + ([(1, 1)] if one_thread and device == "cpu" and threads > 1 else [])
        plan += [(nproc, None)] if nproc > 1 else []
        for mode in [m.strip() for m in modes.split(",") if m.strip()]:
            for processes, pinned in plan:
                row = measure(mode, processes, data=data, batch_size=batch_size, steps=steps, warmup=warmup,
                              device=device, iqa=gate, calibration=str(calibration), work=work, threads=pinned)
                rows.append(row)
                print(f"  {mode} x{processes}{' (1 thread)' if pinned else ''}: {row['samples_per_s']:.2f} samples/s "
                      f"(global batch {row['global_batch']}, {row['wall_s']} s with setup)", flush=True)
    print(f"load average after: {load_average()}\n")
    print(_table(rows, nproc, backend, threads))
    if nproc == 1:
        print("\n(one device only: no parallel run to compare)")
    if json_out:
        atomic_write_text(json_out, json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    from petal_runtime.errors import exit_on_user_error

    exit_on_user_error(main)()
