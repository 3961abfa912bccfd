"""The TensorRT API the builder and runner use exists in the real bindings of each major version.

The fake `tensorrt` flavours (trt_fakes.py) record every public name petal_export.trt and
petal_runtime.backends.trt touch. This test downloads, once, the real `tensorrt-cu12-bindings`
wheels of the newest 10.x and 11.x (about 1.3 MB each; cached under the user cache folder,
~/.cache/petal/tensorrt-bindings), and checks those names against the names the binding exports.
The wheel's tensorrt*.so cannot be imported without NVIDIA's libraries, but pybind11 keeps every
class, method, property and enum-member name as a NUL-terminated string in the library, where the
linker may share a string's tail with a longer one (SOFTMAX inside RAGGED_SOFTMAX). So a name counts
as exported if it is an identifier string of the .so or the tail of one; names the wheel defines in
Python (tensorrt_bindings/__init__.py: __version__, nptype) are read from that file. The check is
necessary, not sufficient: a name can exist on another class than the one the code uses.

Skipped, with the reason, when the package index cannot be reached or PETAL_OFFLINE=1 / PIP_NO_INDEX
is set and nothing is cached.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

import trt_fakes
from petal_export.trt import EngineRequest, build_engine, recognizer_profile
from petal_runtime.backends.trt.loader import EngineFromFile
from petal_runtime.backends.trt.memory import get_memory
from petal_runtime.backends.trt.runner import TrtRunner

PACKAGE = "tensorrt-cu12-bindings"
PLATFORM, PYTHON = "manylinux_2_28_x86_64", "3.12"  # any one build: the exported names do not depend on it
IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "petal" / "tensorrt-bindings"


def bindings_wheel(major: int) -> Path:
    """The cached wheel of the newest `major`.x, downloaded with pip on first use; skips if unreachable."""
    folder = cache_folder()
    pattern = f"{PACKAGE.replace('-', '_')}-{major}.*.whl"
    cached = sorted(folder.glob(pattern))
    if cached:
        return cached[-1]
    if os.environ.get("PETAL_OFFLINE") == "1" or os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes"):
        pytest.skip(f"offline (PETAL_OFFLINE / PIP_NO_INDEX) and no {PACKAGE} {major}.x wheel cached in {folder}")
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", PLATFORM,
                   "--python-version", PYTHON, "--timeout", "15", "--retries", "1", "--disable-pip-version-check",
                   "-q", "-d", work, f"{PACKAGE}>={major},<{major + 1}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the package index did not answer within 300 s ({PACKAGE} {major}.x)")
        wheels = sorted(Path(work).glob(pattern))
        if done.returncode != 0 or not wheels:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            pytest.skip(f"cannot download {PACKAGE} {major}.x from the package index: "
                        f"{lines[-1] if lines else 'pip exit ' + str(done.returncode)}")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / wheels[-1].name
        shutil.move(str(wheels[-1]), folder / (wheels[-1].name + ".part"))
        os.replace(folder / (wheels[-1].name + ".part"), target)
    return target


def exported_names(wheel: Path) -> tuple[str, set[bytes], set[str]]:
    """(version, identifier strings of tensorrt*.so, top-level names of the package's __init__.py)."""
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        library = next(m for m in members if re.search(r"(^|/)tensorrt[^/]*\.so$", m))
        strings = {s for s in archive.read(library).split(b"\0") if IDENTIFIER.match(s)}
        init = next(m for m in members if m.endswith("/__init__.py") and m.count("/") == 1)
        tree = ast.parse(archive.read(init).decode())
    python = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            python.add(node.name)
        elif isinstance(node, ast.Assign):
            python |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    version = wheel.name.split("-")[1]
    return version, strings, python


def exports(strings: set[bytes], python: set[str], name: str) -> bool:
    encoded = name.encode()
    return name in python or any(s.endswith(encoded) for s in strings)


def names_used(version: str, tmp_path: Path, monkeypatch) -> set[str]:
    """Every public tensorrt name the builder (each path it takes on `version`) and the runner touch."""
    from petal_runtime.backends import trt as trt_backend

    used: set[str] = set()
    layers = [("/conv/Conv", "Conv", ["FLOAT"]), ("/norm/LayerNorm", "LayerNormalization", ["FLOAT"]),
              ("/Div_1", "Div", ["FLOAT"]), ("/Shape", "Shape", ["INT64"])]
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    onnx_file = tmp_path / "graph.onnx"
    onnx_file.write_bytes(b"unused: the fake network is given")
    # Every builder path of this major: strongly typed FP16 and INT8, and on 10.x the weak FP16 path (< 10.12).
    versions = [version] + ([trt_fakes.FLAVOURS["10.11"]] if version.startswith("10.") else [])
    for flavour in versions:
        for precision in ("fp16", "int8"):
            trt, _ = trt_fakes.install(monkeypatch, flavour, layers=layers)
            trt_fakes.USED.clear()
            request = EngineRequest("recognizer", onnx_file, "ab" * 32, precision, recognizer_profile((1, 8, 32), 112),
                                    fp32_layers=frozenset({"/Div_1"}))
            build_engine(request, tmp_path / f"{flavour}-{precision}.engine", get_memory(), log=lambda _: None)
            used |= trt_fakes.USED
    trt_fakes.install(monkeypatch, version)
    engine = trt_fakes.write_spec_engine(tmp_path, "recognizer.engine", trt_fakes.RECOGNIZER_SPEC, version)
    trt_fakes.USED.clear()
    import numpy as np

    with TrtRunner(EngineFromFile(engine), memory=get_memory()) as runner:
        runner.infer({"image": np.ones((3, 3, 112, 112), np.float32), "alpha": np.ones((3, 1), np.float32)})
    used |= trt_fakes.USED
    trt_backend._gpu.cache_clear()
    return used


@pytest.mark.parametrize("major", [10, 11])
def test_every_tensorrt_name_used_is_exported_by_the_real_bindings(major, tmp_path, monkeypatch):
    version, strings, python = exported_names(bindings_wheel(major))
    fake_version = trt_fakes.TRT10 if major == 10 else trt_fakes.TRT11
    used = names_used(fake_version, tmp_path, monkeypatch)
    assert {"Builder", "OnnxParser", "execute_async_v3", "set_tensor_address"} <= used  # the recording works
    missing = sorted(n for n in used if not exports(strings, python, n))
    assert not missing, f"the builder/runner use names {PACKAGE} {version} does not export: {missing}"
    print(f"{PACKAGE} {version}: all {len(used)} tensorrt names used by the builder and runner are exported")


@pytest.mark.parametrize("major", [10, 11])
def test_fake_flavour_follows_the_real_bindings(major):
    """The fake offers nothing the real bindings lack, and lacks what TensorRT 11 removed."""
    version, strings, python = exported_names(bindings_wheel(major))
    fake = trt_fakes.make_tensorrt(trt_fakes.TRT10 if major == 10 else trt_fakes.TRT11)
    extra = sorted(n for n in trt_fakes.surface(fake) if not exports(strings, python, n))
    assert not extra, f"the fake {major}.x tensorrt offers names {PACKAGE} {version} does not export: {extra}"
    removed_present = sorted(n for n in trt_fakes.REMOVED_IN_11 if exports(strings, python, n))
    if major == 11:
        assert not removed_present, f"{PACKAGE} {version} still exports {removed_present}: update REMOVED_IN_11"
    else:
        assert removed_present == sorted(trt_fakes.REMOVED_IN_11)  # still there in 10.x (deprecated)
