"""A real Triton Inference Server for the tests: the `tritonserver` binary of the nvidia-pytriton wheel.

That wheel ships tritonserver with its Python backend only (no ONNX Runtime or TensorRT backend). The
tests therefore serve a variant of the exported repository in which each ONNX Runtime model is a
Python-backend model with the same config (names, dims, max_batch_size, dynamic batching, instance group,
parameters) that runs the same model.onnx with ONNX Runtime; the ensemble is served as exported.

The Python backend's stub embeds CPython and imports numpy through its own C extension, which needs
numpy < 2, so the server runs from its own small venv (nvidia-pytriton without its client-side
dependencies, numpy < 2, the ONNX Runtime of the test venv), built once from the package index into
$PETAL_HOME/triton (~/.cache/petal/triton). Where it cannot be installed the tests are skipped, saying why.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 (release 24.10)
NUMPY = "numpy<2"
START_TIMEOUT_S = 240.0
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"

MODEL_PY = '''"""Python-backend stand-in for Triton's ONNX Runtime backend: runs this version's model.onnx with ONNX
Runtime, one session call per dynamic batch (written by tests/triton_support.py)."""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        sizes = [len(f[self.inputs[0]]) for f in feeds]
        batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
        results = self.session.run(self.outputs, batch)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(r[start:start + size]))
                       for n, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def triton_home() -> Path:
    home = os.environ.get("PETAL_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "petal") / "triton"


def _onnxruntime_spec() -> str:
    try:
        return f"onnxruntime=={importlib.metadata.version('onnxruntime')}"
    except importlib.metadata.PackageNotFoundError:
        return "onnxruntime"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PY}" / "site-packages"


def _pip(venv: Path, *args: str) -> None:
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"pip install {' '.join(args)} failed: {lines[-1] if lines else done.returncode}")


def server_venv() -> Path:
    """The server's venv, built once (under a lock, into a temporary folder renamed into place)."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"venv-py{PY}-{PYTRITON}-{_onnxruntime_spec()}")
    venv = triton_home() / name
    if (venv / ".complete").is_file():
        return venv
    triton_home().mkdir(parents=True, exist_ok=True)
    with open(triton_home() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").is_file():
            return venv
        build = Path(tempfile.mkdtemp(prefix=name + ".", dir=triton_home()))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(build)], check=True, capture_output=True, timeout=300)
            _pip(build, "--no-deps", PYTRITON)
            _pip(build, NUMPY, _onnxruntime_spec())
            server = _site_packages(build) / "pytriton" / "tritonserver"
            stub = server / "python_backend_stubs" / PY / "triton_python_backend_stub"
            if not stub.is_file():
                raise RuntimeError(f"{PYTRITON} has no Python backend stub for Python {PY}")
            shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
            (build / ".complete").write_text(f"{PYTRITON} {NUMPY} {_onnxruntime_spec()}\n")
            os.rename(build, venv)  # the venv only ever runs as bin/python -m ..., so the move is harmless
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
    return venv


def require_server_venv() -> Path:
    """server_venv(), or a skip that says why it cannot be installed here."""
    try:
        venv = server_venv()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the tritonserver of {PYTRITON} cannot be installed here: {exc}")
    stub = _site_packages(venv) / "pytriton" / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True,
                            env={**os.environ, "LD_LIBRARY_PATH": str(_site_packages(venv) / "nvidia_pytriton.libs")})
    missing = [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]
    if missing:
        pytest.skip(f"the Python backend stub of {PYTRITON} for Python {PY} needs {', '.join(missing)}, "
                    f"which this machine lacks (e.g. apt-get install libpython{PY})")
    return venv


def python_backend_variant(repository: Path, out: Path) -> Path:
    """A copy of the exported repository in which every ONNX Runtime model runs on the Python backend
    (same config otherwise, plus model.py); TensorRT plans, which need a GPU, are left out."""
    shutil.copytree(repository, out)
    for config_path in sorted(out.glob("*/config.pbtxt")):
        text = config_path.read_text()
        if 'backend: "tensorrt"' in text:
            shutil.rmtree(config_path.parent)
            continue
        if 'backend: "onnxruntime"' not in text:
            continue  # the ensemble, served as exported
        config_path.write_text(text.replace('backend: "onnxruntime"', 'backend: "python"', 1))
        for version in (p for p in config_path.parent.iterdir() if p.is_dir()):
            (version / "model.py").write_text(MODEL_PY)
    return out


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalTritonServer:
    """tritonserver on 127.0.0.1 (HTTP and gRPC on free ports), started and stopped by the tests."""

    def __init__(self, venv: Path, repository: Path, log_dir: Path) -> None:
        self.venv, self.repository, self.log_dir = venv, repository, log_dir
        self.http_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = log_dir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def _prefix(self) -> str:
        return f"petaltest{os.getpid()}x{self.starts}x"

    def start(self, timeout: float = START_TIMEOUT_S) -> "LocalTritonServer":
        site = _site_packages(self.venv)
        server = site / "pytriton" / "tritonserver"
        env = {**os.environ, "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
               "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        env.pop("PYTHONPATH", None)
        self.starts += 1
        command = [str(server / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                   f"--backend-directory={server / 'backends'}", "--http-address=127.0.0.1",
                   f"--http-port={self.http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
                   f"--backend-config=python,shm-region-prefix-name={self._prefix()}", "--log-verbose=0"]
        log = open(self.log_path, "a")
        log.write(f"\n===== start {self.starts}: {' '.join(command)}\n")
        log.flush()
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(line for line in text if not line.startswith(("|", "+")))[-6000:] if text else ""

    def kill(self) -> None:
        """SIGKILL the server (its process group: the Python backend stubs too), as a crash would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, grace=15.0)

    def _signal(self, sig: int, grace: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        for stale in Path("/dev/shm").glob(f"petaltest{os.getpid()}x*"):  # regions a killed stub left
            with contextlib.suppress(OSError):
                stale.unlink()


__all__ = ["LocalTritonServer", "MODEL_PY", "PYTRITON", "free_port", "python_backend_variant",
           "require_server_venv", "server_venv", "triton_home"]
