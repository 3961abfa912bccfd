"""The runtime must not need torch: on a device it has only numpy, onnxruntime or TensorRT, PyAV,
OpenCV and click. Checked in a fresh interpreter, so modules the tests themselves import do not hide
an import that slipped in."""
from __future__ import annotations

import subprocess
import sys

from runtime_support import REPO

RUNTIME_MODULES = ["petal_runtime", "petal_runtime.cli", "petal_runtime.pipeline", "petal_runtime.gallery",
                   "petal_runtime.tracking", "petal_runtime.openset", "petal_runtime.sources", "petal_runtime.annotate",
                   "petal_runtime.models", "petal_runtime.models_cli",
                   "petal_runtime.backends", "petal_runtime.backends.onnxrt", "petal_runtime.backends.trt",
                   "petal_runtime.backends.trt.memory", "petal_runtime.backends.trt.loader",
                   "petal_runtime.backends.trt.runner", "petal_runtime.backends.ort_gpu",
                   "petal_runtime.backends.ort_gpu.loader", "petal_runtime.backends.ort_gpu.runner",
                   "petal_runtime.backends.triton", "petal_runtime.backends.triton.loader",
                   "petal_runtime.backends.triton.runner", "petal_runtime.backends.triton.repository"]
FORBIDDEN = ("torch", "petal_train", "petal_export", "torchvision")


def test_runtime_imports_no_torch():
    code = (
        "import sys, importlib\n"
        f"for name in {RUNTIME_MODULES!r}: importlib.import_module(name)\n"
        "from petal_runtime.backends import backends\n"
        "assert set(backends()) == {'onnxruntime', 'tensorrt', 'onnxruntime-gpu', 'triton'}, backends()\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_cli_help_runs_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails loudly\n"
        "from petal_runtime.cli import run_cli, gallery_cli\n"
        "from click.testing import CliRunner\n"
        "for cmd, args in ((run_cli, ['--help']), (gallery_cli, ['build', '--help'])):\n"
        "    r = CliRunner().invoke(cmd, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
