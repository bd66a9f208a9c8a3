"""Library messages name the library's own arguments, not a command's flags, and each command says it in its own
terms: a Python caller of verify() is told about seed, `refformer verify` (which checks --seed itself,
export_cli.check_seed) about --seed; a text over the model's positions is refused by the Generator with truncate=True
as the remedy, by generate and batch with --truncate, by serve with none (tests/serve)."""

import json

import pytest
from click.testing import CliRunner

from refformer.export.verify import verify
from refformer.refimpl import RefformerError
from refformer.runtime.cli import main

from .test_generator import make_model, tokenizer_file  # noqa: F401  (fixture)


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_verify_names_its_seed_argument(tmp_path, seed):
    with pytest.raises(RefformerError, match=r"^seed must be an integer >= 0, got "):
        verify(tmp_path, seed=seed)


def test_the_verify_command_names_its_seed_flag(tmp_path):
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path), "--seed", "-1"])
    assert result.exit_code == 1 and result.stderr == "error: --seed must be >= 0, got -1\n", result.output


# ---------------------------------------------------------------- a text over the model's positions


LONG = " ".join(["Ich habe Hunger und wo ist der Bahnhof"] * 8)  # 183 tokens for the 47 the model holds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):  # noqa: F811
    path = tmp_path_factory.mktemp("messages") / "m"
    make_model(path, tokenizer_file, "encoder-decoder")  # max_positions 48: 47 source tokens and eos
    return str(path)


@pytest.mark.parametrize("text, problem", [
    (LONG, "input 1 has 183 tokens, more than the model's 47"),
    ("x" * 5000, "input 1 has 5000 characters, far more than the model's 47 tokens hold"),
])
def test_the_generator_names_its_truncate_argument_and_each_command_its_own(model_dir, text, problem):
    """Generator: truncate=True; generate (one text streamed, or lines in records) and batch: --truncate (batch runs
    through the same runtime/batch.generate_records); serve's "shorten it" is tested in tests/serve."""
    from refformer.runtime.errors import InputTooLong
    from refformer.runtime.generator import Generator

    with pytest.raises(InputTooLong) as raised:
        Generator(model_dir, provider="cpu").generate([text])
    assert str(raised.value) == f"{problem}; shorten it or create the Generator with truncate=True"
    assert raised.value.problem == problem and isinstance(raised.value, RefformerError)
    streamed = CliRunner().invoke(main, ["generate", "--model", model_dir, "--provider", "cpu", text])
    assert streamed.exit_code == 1 and streamed.stderr == f"error: {problem}; shorten it or pass --truncate\n"
    batched = CliRunner().invoke(main, ["generate", "--model", model_dir, "--provider", "cpu", "--json", "Hallo.",
                                        text, "--max-new-tokens", "2"])
    records = [json.loads(line) for line in batched.stdout.splitlines()]
    assert batched.exit_code == 1 and records[1] == {
        "line": 2, "error": f"{problem.replace('input 1', 'input 2')}; shorten it or pass --truncate"}


# ---------------------------------------------------------------- a set that cannot be exported in the dtype asked


def test_generate_refusing_a_dtype_says_use_fp32(tmp_path, tokenizer_file, monkeypatch):  # noqa: F811
    """int8 graphs beyond the int8 bound (the bound lowered to 1e-6 here), or weights beyond float16's range: the
    refusal says to use --dtype fp32 (generate, eval, serve and batch take it; the fp32 set may be there already),
    not to export it."""
    from refformer.export.contract import ERROR_BOUNDS
    from refformer.refimpl.io import load, save

    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    monkeypatch.setitem(ERROR_BOUNDS, "int8", 1e-6)
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "m"), "--dtype", "int8", "Hallo."])
    assert result.exit_code == 1 and result.stderr.endswith("beyond the int8 bound 1e-06; nothing was written: use "
                                                            "--dtype fp32\n"), result.output
    cfg, params = load(tmp_path / "m")
    params["decoder"]["embed_tokens"]["weight"][0, 0] = 1e5
    save(tmp_path / "big", cfg, params, tokenizer=tokenizer_file)
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "big"), "--dtype", "fp16", "Hallo."])
    assert result.exit_code == 1 and result.stderr.endswith("beyond float16's range (65504): use --dtype fp32\n"), \
        result.output
