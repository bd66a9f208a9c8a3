"""Library messages name the library's own arguments, not a command's flags: a Python caller of verify() is told
about seed, and `refformer verify` (which checks --seed itself, export_cli.check_seed) about --seed."""

import pytest
from click.testing import CliRunner

from refformer.export.verify import verify
from refformer.refimpl import RefformerError
from refformer.runtime.cli import main


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_verify_names_its_seed_argument(tmp_path, seed):
    with pytest.raises(RefformerError, match=r"^seed must be an integer >= 0, got "):
        verify(tmp_path, seed=seed)


def test_the_verify_command_names_its_seed_flag(tmp_path):
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path), "--seed", "-1"])
    assert result.exit_code == 1 and result.stderr == "error: --seed must be >= 0, got -1\n", result.output
