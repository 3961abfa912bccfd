"""petal-serve's config: one line naming the mistake, before anything starts; the example config loads."""
from __future__ import annotations

import pytest

from petal_runtime.errors import PetalError
from petal_runtime.serve.cli import serve_cli
from petal_runtime.serve.config import EXAMPLE_CONFIG, ServeConfig
from runtime_support import invoke


@pytest.fixture
def files(tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "door.mp4").write_bytes(b"")
    (tmp_path / "gallery.npy").write_bytes(b"")
    return tmp_path


BASE = '[service]\nmodels = "exported"\ngallery = "gallery.npy"\n[[source]]\nname = "door"\nurl = "door.mp4"\n'


def load(tmp_path, text: str) -> ServeConfig:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return ServeConfig.load(path)


def test_example_config_loads_and_has_the_defaults(files):
    config = load(files, EXAMPLE_CONFIG)
    assert config.service.models == str(files / "exported") and config.source[0].url == str(files / "door.mp4")
    assert config.http.host == "127.0.0.1" and config.service.max_wait_ms == 20.0
    assert config.sinks.stdout.enabled and config.sinks.webhook.url == "" and config.sinks.file.path == ""
    # Every key the example shows (commented or not) is one the dataclasses know.
    keys = [line.lstrip("# ").split(" = ")[0] for line in EXAMPLE_CONFIG.splitlines()
            if " = " in line and line.lstrip("# ")[:1].isalpha()]
    text = "\n".join(line.lstrip("# ") if " = " in line else line for line in EXAMPLE_CONFIG.splitlines()
                     if not line.startswith("# [[source]]") and "gate" not in line and "192.0.2" not in line)
    text = text.replace('path = "events.jsonl"', f'path = "{files / "events.jsonl"}"')
    full = load(files, text)
    assert len(keys) > 40 and full.service.threshold == 0.35 and full.sinks.webhook.headers


def test_defaults_are_defined_once(files):
    config = load(files, BASE)
    assert config.service.far is None and config.source[0].detect_every == 4 and config.http.port == 8321


@pytest.mark.parametrize("text, message", [
    (BASE + "[http]\nprot = 80\n", "unknown key 'prot' in [http]"),
    (BASE.replace("[[source]]", "[sinks.kafka]\nhost = 'x'\n[[source]]"), "unknown key 'kafka' in [sinks]"),
    (BASE.replace("[[source]]", "[sinks.mqtt]\nhost = 'x'\nqos = 3\n[[source]]"), "qos must be 0, 1 or 2"),
    (BASE.replace("[[source]]", "[sinks.mqtt]\ntopic = 'petal/#'\n[[source]]"), "without + or #"),
    (BASE.replace("[[source]]", "[sinks.mqtt]\ntopic = 'petal/{camera}'\n[[source]]"),
     "is not a template of {source} and {type}"),
    (BASE + "colour = 1\n", "unknown key 'colour' in [source.door]"),
    ("verbose = true\n" + BASE, "unknown key 'verbose' in the top level"),
    (BASE + '[[source]]\nname = "door"\nurl = "door.mp4"\n', "name 'door' is used twice"),
    (BASE + "min_face = 'big'\n", "source.door.min_face must be an integer"),
    (BASE + "detect_every = 0\n", "detect_every must be positive"),
    (BASE + "realtime = 1\n", "realtime must be true or false"),
    (BASE.replace('url = "door.mp4"', 'url = "nowhere.mp4"'), "nowhere.mp4 not found"),
    (BASE.replace('name = "door"', 'name = "a b"'), "name must be"),
    (BASE.replace("[[source]]", "far = 2.0\n[[source]]"), "far must lie strictly between 0 and 1"),
    (BASE.replace("[[source]]", "[http]\nport = 70000\n[[source]]"), "port must be 0-65535"),
    (BASE.replace("[[source]]", "[sinks.webhook]\nurl = 'ftp://x'\n[[source]]"), "http:// or https://"),
    (BASE + "reconnect_backoff_s = [5.0, 1.0]\n", "reconnect_backoff_s"),
    ('[service]\nmodels = "exported"\ngallery = "gallery.npy"\n', "names no source"),
    ('[[source]]\nname = "door"\nurl = "door.mp4"\n', "[service] models is required"),
    (BASE + "url = 'twice'\n", "not valid TOML"),
])
def test_config_mistakes_are_one_line(files, text, message):
    with pytest.raises(PetalError) as info:
        load(files, text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(files / "serve.toml") in str(info.value)


def test_cli_prints_the_example_and_refuses_a_bad_config(files):
    result = invoke(serve_cli, ["--example-config"])
    assert result.exit_code == 0 and result.output == EXAMPLE_CONFIG
    (files / "bad.toml").write_text(BASE + "[http]\nprot = 80\n")
    result = invoke(serve_cli, [files / "bad.toml"])
    assert result.exit_code == 2 and "unknown key 'prot' in [http]" in result.output
    result = invoke(serve_cli, [files / "missing.toml"])
    assert result.exit_code == 2 and "not found" in result.output


def test_serve_imports_no_torch():
    import subprocess
    import sys

    from runtime_support import REPO

    code = ("import sys\n"
            "for name in ('petal_runtime.serve', 'petal_runtime.serve.cli', 'petal_runtime.serve.service'):\n"
            "    __import__(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'petal_train', 'petal_export'))\n"
            "assert not bad, bad\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_mqtt_sink_without_paho_is_one_line(files, monkeypatch):
    import sys

    from petal_runtime.serve.sinks import build_sinks

    config = load(files, BASE.replace("[[source]]", "[sinks.mqtt]\nhost = '127.0.0.1'\n[[source]]"))
    assert config.sinks.mqtt.topic == "petal/{source}/{type}" and config.sinks.mqtt.qos == 1
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)  # as if paho-mqtt were not installed
    with pytest.raises(PetalError, match=r"needs paho-mqtt, which is not installed: pip install 'petal\[mqtt\]'"):
        build_sinks(config.sinks)
