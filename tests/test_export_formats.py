"""The export format table: suffixes, GPU needs, accepted options, and the CLI's use of it."""
from __future__ import annotations

import pytest

from petal_export.cli import cli, parse_batch
from petal_export.formats import FORMATS, OPTION_FLAGS, format_table, selected_formats, validate_options
from petal_runtime.backends.trt.loader import engine_candidates
from petal_runtime.contract import IQA_FILE, RECOGNIZER_FILE
from petal_runtime.errors import PetalError


def test_table_rows():
    assert set(FORMATS) == {"onnx", "onnx-fp16", "onnx-int8", "onnx-int8-qdq", "trt-fp16", "trt-int8"}
    assert FORMATS["onnx-int8-qdq"].filename("recognizer") == "recognizer.qdq.onnx"
    assert FORMATS["onnx"].filename("recognizer") == RECOGNIZER_FILE
    assert FORMATS["onnx"].filename("iqa") == IQA_FILE
    assert FORMATS["trt-int8"].filename("recognizer") == "recognizer.int8.engine"
    assert {f.name for f in FORMATS.values() if f.needs_gpu} == {"trt-fp16", "trt-int8"}
    assert {f.name for f in FORMATS.values() if f.is_engine} == {"trt-fp16", "trt-int8"}
    assert {f.name for f in FORMATS.values() if "calib" in f.options} == {"onnx-int8", "onnx-int8-qdq", "trt-int8"}
    assert FORMATS["onnx"].options == frozenset()
    with pytest.raises(ValueError):
        FORMATS["onnx"].filename("detector")


def test_engine_names_are_what_the_runtime_looks_for(tmp_path):
    for fmt in ("trt-fp16", "trt-int8"):
        (tmp_path / FORMATS[fmt].filename("recognizer")).write_bytes(b"x")
    assert [p.name for p in engine_candidates(tmp_path, "recognizer")] == ["recognizer.fp16.engine",
                                                                           "recognizer.int8.engine"]


@pytest.mark.parametrize("fp16,int8,names", [
    (False, False, ["onnx"]),
    (True, False, ["onnx", "onnx-fp16", "trt-fp16"]),
    (False, True, ["onnx", "onnx-int8", "onnx-int8-qdq", "trt-int8"]),
    (True, True, ["onnx", "onnx-fp16", "onnx-int8", "onnx-int8-qdq", "trt-fp16", "trt-int8"]),
])
def test_selected_formats(fp16, int8, names):
    assert [f.name for f in selected_formats(fp16, int8)] == names


@pytest.mark.parametrize("fp16,int8,option,ok", [
    (False, False, "calib", False),  # --calib without an INT8 format
    (True, False, "calib", False),
    (False, True, "calib", True),
    (False, False, "batch", False),  # --batch without an engine format
    (True, False, "batch", True),
    (False, False, "require_engine", False),
    (False, True, "require_engine", True),
])
def test_options_validated_against_the_row(fp16, int8, option, ok):
    formats = selected_formats(fp16, int8)
    if ok:
        validate_options(formats, [option])
    else:
        with pytest.raises(PetalError, match=OPTION_FLAGS[option]) as info:
            validate_options(formats, [option])
        assert "\n" not in str(info.value)


def test_format_rejects_option_it_does_not_accept():
    with pytest.raises(PetalError, match="--calib is not accepted by the selected formats \\(onnx, onnx-fp16"):
        validate_options([FORMATS["onnx"], FORMATS["onnx-fp16"]], ["calib"])
    validate_options([FORMATS["trt-int8"]], ["calib", "batch", "require_engine"])


def test_format_table_text():
    text = format_table()
    for name in FORMATS:
        assert name in text
    assert "--calib" in text and "<graph>.int8.engine" in text


@pytest.mark.parametrize("text,ok", [("1:8:32", (1, 8, 32)), ("4:4:4", (4, 4, 4)), ("8:1:32", None),
                                     ("0:1:2", None), ("1:8", None), ("a:b:c", None)])
def test_parse_batch(text, ok):
    if ok:
        assert parse_batch(text) == ok
    else:
        with pytest.raises(PetalError, match="--batch"):
            parse_batch(text)


@pytest.mark.parametrize("args,message", [
    (["--calib", "calibration"], "--calib is not accepted"),
    (["--fp16", "--calib", "calibration"], "add --int8"),
    (["--batch", "1:4:8"], "--batch is not accepted"),
    (["--require-engine"], "--require-engine is not accepted"),
    (["--fp16", "--batch", "9:4:8"], "1 <= MIN <= OPT <= MAX"),
])
def test_cli_rejects_options_before_any_work(tmp_path, args, message):
    from runtime_support import invoke

    result = invoke(cli, ["no-such-checkpoint.pt", "--out", tmp_path / "out", *args])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_cli_list_formats():
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["--list-formats"])
    assert result.exit_code == 0 and "trt-int8" in result.output
