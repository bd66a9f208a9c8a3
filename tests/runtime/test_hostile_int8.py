"""Issue 15's int8 path used as a hostile user would: int8 with the commands that batch lines they do not choose
(`refformer batch`, `refformer serve`) is refused in one line unless each line runs alone, with or without the
command's extra installed, before anything is written; and `batch --dtype int8 --batch-size 1` gives each line the
record `generate --dtype int8 --batch-size 1 --json` gives it."""

import importlib.util
import json
import sys

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main

from ..helpers import save_word_level_model

V = 40
TEXTS = [f"w{i} w{i + 3} w{i + 7}" for i in range(4, 10)]


pytestmark = pytest.mark.usefixtures("user_cache")  # tests/conftest.py: a per-user cache of its own


@pytest.fixture
def model(tmp_path):
    return save_word_level_model(tmp_path / "m", tmp_path, V)


def one_error(result):
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("args", [[], ["--batch-size", "16"], ["--batch-size", "2"]])
def test_batch_int8_needs_batch_size_1(model, tmp_path, args):
    """Ray Data's blocks decide which lines share a worker call, and int8 scales activations per batch: refused."""
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--model",
                                       str(model), "--dtype", "int8", *args])
    assert "--dtype int8 needs --batch-size 1" in one_error(result)
    assert not (tmp_path / "out").exists() and not (model / "onnx").exists()


@pytest.mark.parametrize("blocked, command", [("ray", "batch"), ("starlette", "serve")])
def test_int8_batching_is_refused_without_the_extra_too(model, tmp_path, monkeypatch, blocked, command):
    """The int8 refusal is an option check: it comes before the missing extra's install hint."""
    import refformer.runtime
    import refformer.runtime.generator as generator_module

    for name in [name for name in sys.modules if name.startswith(blocked + ".")] + [blocked]:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as when the extra is missing
    for module in ("serve", "ray_batch"):  # imported again, without the extra (`from refformer.runtime import serve`
        monkeypatch.delitem(sys.modules, f"refformer.runtime.{module}", raising=False)  # reads the attribute first)
        monkeypatch.delattr(refformer.runtime, module, raising=False)
    monkeypatch.setattr(generator_module, "Generator", lambda *a, **k: pytest.fail("the command went on to start"))
    (tmp_path / "in.txt").write_text("w4 w5\n")
    args = (["batch", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out")] if command == "batch"
            else ["serve", "--port", "0"])
    result = CliRunner().invoke(main, [*args, "--model", str(model), "--dtype", "int8"])
    assert "--dtype int8 needs --" in one_error(result)
    plain = CliRunner().invoke(main, [*args, "--model", str(model), "--dtype", "fp32"])
    assert "pip install" in one_error(plain)


def test_batch_help_offers_int8():
    result = CliRunner().invoke(main, ["batch", "--help"])
    assert result.exit_code == 0 and "fp32|fp16|int8" in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
def test_batch_int8_batch_size_1_records_equal_generate(model, tmp_path):
    """A local cluster of one worker (the command's own, removed at the end): each record is generate's."""
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--model",
                                       str(model), "--dtype", "int8", "--batch-size", "1", "--workers", "1",
                                       "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    records = sorted((json.loads(line) for part in sorted((tmp_path / "out").glob("part-*.jsonl"))
                      for line in part.read_text().splitlines()), key=lambda record: record["line"])
    alone = CliRunner().invoke(main, ["generate", "--input", str(tmp_path / "in.txt"), "--model", str(model),
                                      "--dtype", "int8", "--batch-size", "1", "--json", "--max-new-tokens", "6"])
    assert alone.exit_code == 0, alone.output
    expected = [json.loads(line) for line in alone.stdout.splitlines()]
    assert [{k: v for k, v in r.items() if k != "file"} for r in records] == expected
    assert (model / "onnx" / "int8" / "manifest.json").exists() and not (model / "onnx" / "fp32").exists()


def test_verify_refuses_a_set_folder_holding_another_set(model, tmp_path):
    """`export --out MODEL/onnx/int8-static4` without --static-length writes a plain int8 set under a static set's
    name; `verify --static-length 4` found it by name and checked no static graph, yet printed "all ... within". Now
    one line says what the folder holds; --onnx-dir still checks it as it is, and a matching folder passes."""
    onnx = model / "onnx"
    onnx.mkdir()
    runner = CliRunner()
    wrong = runner.invoke(main, ["export", "--model", str(model), "--dtype", "int8", "--out",
                                 str(onnx / "int8-static4")])
    assert wrong.exit_code == 0, wrong.output
    result = runner.invoke(main, ["verify", "--model", str(model), "--dtype", "int8", "--static-length", "4",
                                  "--provider", "cpu"])
    assert "holds the int8 export set, not the int8-static4 set" in one_error(result)
    as_it_is = runner.invoke(main, ["verify", "--model", str(model), "--onnx-dir", str(onnx / "int8-static4"),
                                    "--provider", "cpu"])
    assert as_it_is.exit_code == 0 and "within the int8 bound" in as_it_is.output, as_it_is.output
    right = runner.invoke(main, ["export", "--model", str(model), "--dtype", "int8", "--static-length", "4",
                                 "--out", str(onnx / "int8-static4")])
    assert right.exit_code == 0, right.output
    result = runner.invoke(main, ["verify", "--model", str(model), "--dtype", "int8", "--static-length", "4",
                                  "--provider", "cpu"])
    assert result.exit_code == 0 and "static" in result.output, result.output
