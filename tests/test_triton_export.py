"""petal-export --triton: the model repository (layout, configs, parameters, the IQA with alpha folded in,
variants), what it refuses, and how the runtime reads a repository's parameters back. No server here:
test_triton_server.py serves the repository through a real tritonserver."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import runtime_support as rs
from petal_export.cli import cli
from petal_export.triton import TritonOptions, check_target, is_petal_repository, write_repository
from petal_runtime.backends.triton import TritonUrl
from petal_runtime.backends.triton.repository import (ENSEMBLE_MODEL, IQA_MODEL, PARAM_MODELS_SHA256,
                                                      RECOGNIZER_MODEL, served)
from petal_runtime.contract import CONTRACT_VERSION, Manifest
from petal_runtime.errors import PetalError
from petal_runtime.files import sha256_file
from petal_runtime.models import fingerprint


@pytest.fixture(scope="module")
def repository(models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    lines: list[str] = []
    result = write_repository(models_dir, out, TritonOptions(batch=(1, 4, 16), instances=2), log=lines.append)
    return out, result, lines


def parse_config(text: str) -> dict:
    """The parts of a config.pbtxt the tests read (a small reader for what petal_export.triton writes)."""
    params = {key: json.loads(f'"{value}"') for key, value in
              re.findall(r'parameters \{ key: "([^"]+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', text)}
    tensors = {kind: [(name, [int(d) for d in dims.split(",")]) for name, dims in
                      re.findall(r'\{ name: "([^"]+)" data_type: TYPE_FP32 dims: \[ ([^\]]+) \] \}', block)]
               for kind, block in re.findall(r'^(input|output) \[\n(.*?)\n\]', text, re.M | re.S)}
    steps = re.findall(r'model_name: "([^"]+)"', text)
    maps = re.findall(r'(input|output)_map \{ key: "([^"]+)" value: "([^"]+)" \}', text)
    scalar = dict(re.findall(r'^(name|backend|platform|max_batch_size): "?([^"\n]+)"?$', text, re.M))
    return {**scalar, "params": params, "input": tensors.get("input", []), "output": tensors.get("output", []),
            "steps": steps, "maps": maps}


def test_layout_and_configs(repository, models_dir):
    out, result, lines = repository
    assert sorted(p.name for p in out.iterdir()) == [ENSEMBLE_MODEL, IQA_MODEL, RECOGNIZER_MODEL]
    assert (out / IQA_MODEL / "1" / "model.onnx").is_file() and (out / RECOGNIZER_MODEL / "1" / "model.onnx").is_file()
    assert (out / ENSEMBLE_MODEL / "1").is_dir()  # an ensemble's version folder is empty
    iqa = parse_config((out / IQA_MODEL / "config.pbtxt").read_text())
    rec = parse_config((out / RECOGNIZER_MODEL / "config.pbtxt").read_text())
    face = parse_config((out / ENSEMBLE_MODEL / "config.pbtxt").read_text())
    assert (iqa["backend"], rec["backend"], face["platform"]) == ("onnxruntime", "onnxruntime", "ensemble")
    assert iqa["input"] == [("image", [3, -1, -1])] and iqa["output"] == [("quality", [1]), ("alpha", [1])]
    assert rec["input"] == [("image", [3, 112, 112]), ("alpha", [1])] and rec["output"] == [("embedding", [128])]
    assert face["input"] == [("image", [3, 112, 112])]
    assert face["output"] == [("embedding", [128]), ("quality", [1]), ("alpha", [1])]
    assert face["steps"] == [IQA_MODEL, RECOGNIZER_MODEL]
    assert face["maps"] == [("input", "image", "image"), ("output", "quality", "quality"),
                            ("output", "alpha", "alpha"), ("input", "image", "image"), ("input", "alpha", "alpha"),
                            ("output", "embedding", "embedding")]
    for config in (iqa, rec, face):
        assert config["max_batch_size"] == "16"
    text = (out / RECOGNIZER_MODEL / "config.pbtxt").read_text()
    assert "dynamic_batching { preferred_batch_size: [ 4, 16 ] max_queue_delay_microseconds: 2000 }" in text
    assert "instance_group [ { count: 2 kind: KIND_AUTO } ]" in text
    assert "dynamic_batching" not in (out / ENSEMBLE_MODEL / "config.pbtxt").read_text()
    assert any("petal_iqa" in line for line in lines) and "wrote Triton repository" in lines[-1]


def test_parameters_carry_the_contract_and_the_digests(repository, models_dir):
    out, result, _ = repository
    manifest = Manifest.load(models_dir)
    prints = fingerprint(models_dir)
    for name in (IQA_MODEL, RECOGNIZER_MODEL, ENSEMBLE_MODEL):
        params = parse_config((out / name / "config.pbtxt").read_text())["params"]
        assert json.loads(params["petal.contract_version"]) == CONTRACT_VERSION
        assert params[PARAM_MODELS_SHA256] == prints.models_sha256
        assert json.loads(params["petal.files"]) == manifest.files
        assert json.loads(params["petal.iqa_threshold"]) == manifest.iqa_threshold
        if name != ENSEMBLE_MODEL:
            model_file = out / name / "1" / "model.onnx"
            assert params["petal.model_sha256"] == sha256_file(model_file) == result.models[name]["sha256"]
    rec = parse_config((out / RECOGNIZER_MODEL / "config.pbtxt").read_text())["params"]
    assert rec["petal.model_sha256"] == manifest.files["recognizer.onnx"]  # the recognizer is copied as is
    assert rec["petal.source_file"] == "recognizer.onnx"


def test_iqa_with_alpha_follows_the_contract(repository, models_dir):
    from export_support import ort_session

    out, _, _ = repository
    manifest = Manifest.load(models_dir)
    folded, plain = ort_session(out / IQA_MODEL / "1" / "model.onnx"), ort_session(models_dir / "iqa.onnx")
    assert [o.name for o in folded.get_outputs()] == ["quality", "alpha"]
    rng = np.random.default_rng(3)
    for size in (112, 40, 17):
        faces = rng.uniform(0, 255, (5, 3, size, size)).astype(np.float32)
        faces[0] = 128.0  # a flat grey face scores low: alpha near its lower end
        quality, alpha = folded.run(["quality", "alpha"], {"image": faces})
        np.testing.assert_array_equal(quality, plain.run(["quality"], {"image": faces})[0])
        np.testing.assert_allclose(alpha, manifest.alpha(quality), atol=1e-6)
        assert alpha.shape == (5, 1) and (alpha >= 0).all() and (alpha <= 1).all()


def test_rewrites_a_petal_repository_and_refuses_other_folders(repository, models_dir, tmp_path):
    out, _, _ = repository
    assert is_petal_repository(out)
    check_target(out)  # an earlier PETAL repository may be written again
    check_target(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    other = tmp_path / "other"
    (other / "my_model").mkdir(parents=True)
    (other / "my_model" / "config.pbtxt").write_text('name: "my_model"\n')
    with pytest.raises(PetalError, match="not a PETAL Triton repository"):
        check_target(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PetalError, match="not a folder"):
        check_target(tmp_path / "file")

    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / RECOGNIZER_MODEL / "1" / "model.onnx").write_bytes(b"stale")
    write_repository(models_dir, again, log=None)
    assert sha256_file(again / RECOGNIZER_MODEL / "1" / "model.onnx") == Manifest.load(models_dir).files[
        "recognizer.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_cli_refuses_a_foreign_folder_before_exporting(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = rs.invoke(cli, ["no-such-checkpoint.pt", "--out", tmp_path / "out", "--triton", other])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"error: --triton {other} is a non-empty folder")
    assert not (tmp_path / "out").exists() and [p.name for p in other.iterdir()] == ["notes.txt"]
    result = rs.invoke(cli, ["no-such-checkpoint.pt", "--out", tmp_path / "out", "--triton-instances", "2"])
    assert result.exit_code == 2 and "--triton-instances is not accepted" in result.output
    assert "(add --triton DIR)" in result.output
    result = rs.invoke(cli, ["no-such-checkpoint.pt", "--out", tmp_path / "o", "--triton", tmp_path / "o"])
    assert result.exit_code == 2 and "a folder of its own" in result.output


def test_list_formats_shows_the_repository():
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["--list-formats"])
    assert result.exit_code == 0 and "triton" in result.output and "--triton-instances" in result.output


def test_variants_fp16_plan_and_int8_onnx(models_dir, tmp_path):
    """A TensorRT engine becomes a plan (the PETAL header stripped, the engine's profile bounding
    max_batch_size) and an ONNX variant an ONNX Runtime model; a stand-in engine, since no GPU is here."""
    from petal_runtime.backends.trt.loader import EngineHeader, write_engine_file

    folder = tmp_path / "export"
    shutil.copytree(models_dir, folder)
    engine = b"serialized-engine-bytes"
    header = EngineHeader("10.13.0", "NVIDIA L4", "8.9", extra={"profile": {"image": [[1, 3, 112, 112],
                                                                                     [8, 3, 112, 112],
                                                                                     [24, 3, 112, 112]]}})
    write_engine_file(folder / "recognizer.fp16.engine", engine, header)
    shutil.copyfile(folder / "recognizer.onnx", folder / "recognizer.int8.onnx")
    manifest = Manifest.load(folder)
    manifest.files["recognizer.fp16.engine"] = sha256_file(folder / "recognizer.fp16.engine")
    manifest.files["recognizer.int8.onnx"] = sha256_file(folder / "recognizer.int8.onnx")
    (folder / "manifest.json").write_text(manifest.to_json())
    result = write_repository(folder, tmp_path / "repo", log=None)

    plan = tmp_path / "repo" / "petal_recognizer_fp16"
    assert (plan / "1" / "model.plan").read_bytes() == engine
    config = parse_config((plan / "config.pbtxt").read_text())
    assert (config["platform"], config["backend"], config["max_batch_size"]) == ("tensorrt_plan", "tensorrt", "24")
    assert config["params"]["petal.tensorrt_version"] == "10.13.0"
    assert json.loads(config["params"]["petal.precision"]) == "fp16"
    assert any("profile maximum" in note for note in result.notes)
    int8 = parse_config((tmp_path / "repo" / "petal_recognizer_int8" / "config.pbtxt").read_text())
    assert int8["backend"] == "onnxruntime" and int8["params"]["petal.source_file"] == "recognizer.int8.onnx"
    # the ensemble keeps the FP32 recognizer; its batch bound is that model's
    face = parse_config((tmp_path / "repo" / ENSEMBLE_MODEL / "config.pbtxt").read_text())
    assert face["steps"] == [IQA_MODEL, RECOGNIZER_MODEL] and face["max_batch_size"] == "32"


# ----------------------------------------------------------------------------- reading a repository back


def _configs(repository_dir, names=(IQA_MODEL, RECOGNIZER_MODEL)) -> dict:
    """Configs as the server returns them: {"parameters": {key: {"string_value": ...}}}."""
    return {name: {"parameters": {k: {"string_value": v} for k, v in
                                  parse_config((repository_dir / name / "config.pbtxt").read_text())["params"].items()}}
            for name in names}


def test_served_reads_what_the_export_wrote(repository, models_dir):
    out, _, _ = repository
    got = served(_configs(out), "http://server:8000")
    prints = fingerprint(models_dir)
    assert (got.recognizer_sha256, got.iqa_sha256, got.models_sha256) == (
        prints.recognizer_sha256, prints.iqa_sha256, prints.models_sha256)
    assert got.manifest.iqa_threshold == Manifest.load(models_dir).iqa_threshold


@pytest.mark.parametrize("change,message", [
    (lambda c: c[RECOGNIZER_MODEL]["parameters"].pop("petal.contract_version"), "is not a PETAL model"),
    (lambda c: c[IQA_MODEL]["parameters"]["petal.contract_version"].update(string_value='"0"'),
     "contract version 0, this runtime speaks 1"),
    (lambda c: c[RECOGNIZER_MODEL]["parameters"][PARAM_MODELS_SHA256].update(string_value="f" * 64),
     "come from different exports"),
    (lambda c: c[IQA_MODEL]["parameters"]["petal.embedding_size"].update(string_value='"x"'), "embedding_size"),
])
def test_served_refuses_foreign_or_mixed_repositories(repository, change, message):
    out, _, _ = repository
    configs = _configs(out)
    change(configs)
    with pytest.raises(PetalError, match=message) as info:
        served(configs, "http://server:8000")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,protocol,ssl,address", [
    ("http://127.0.0.1:8000", "http", False, "127.0.0.1:8000"),
    ("localhost:9000", "http", False, "localhost:9000"),
    ("https://triton.example:8443", "http", True, "triton.example:8443"),
    ("grpc://10.0.0.2", "grpc", False, "10.0.0.2:8001"),
    ("http://[::1]:8000", "http", False, "[::1]:8000"),
])
def test_triton_urls(text, protocol, ssl, address):
    url = TritonUrl.parse(text)
    assert (url.protocol, url.ssl, url.address) == (protocol, ssl, address)


@pytest.mark.parametrize("text", ["", "ftp://host:1", "http://host:8000/v2/models", "http://host:port"])
def test_bad_triton_urls(text):
    with pytest.raises(PetalError, match="Triton URL|empty"):
        TritonUrl.parse(text)
