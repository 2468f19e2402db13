"""The command line: instant help, no heavy imports until a command runs, inspect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergekit_fisher.cli import main
from mergekit_fisher.store import clear_cache, write_store


def test_cli_module_imports_nothing_heavy() -> None:
    code = "import sys, mergekit_fisher.cli as c; print(sorted(m for m in ('torch', 'mergekit', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_inspect_shows_provenance_and_verifies(tmp_path: Path) -> None:
    clear_cache()
    weights = {"w": torch.randn(4, 3)}
    write_store(
        tmp_path / "s",
        {"w": torch.rand(4, 3)},
        weights=weights,
        model="org/m",
        estimator={"mode": "sampled"},
    )
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "s"), "--verify", "--tensors"])
    assert result.exit_code == 0, result.output
    assert "org/m" in result.output and "sampled" in result.output and "verified" in result.output
    assert "statistic    fisher, full; stored as bfloat16" in result.output


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "mergekit-fisher"),
            "inspect",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_user_error_finds_ours_inside_a_wrapper() -> None:
    from mergekit_fisher.errors import FisherError, user_error

    ours = FisherError("store x: re-estimate it")
    try:
        try:
            raise ours
        except FisherError as inner:
            raise RuntimeError("executor failed") from inner
    except RuntimeError as outer:
        assert user_error(outer) is ours
    assert user_error(RuntimeError("a bug")) is None
