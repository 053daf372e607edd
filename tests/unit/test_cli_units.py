from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rma_ray import cli

runner = CliRunner()


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("600", 600)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(cli.CliError):
        cli.parse_duration(text)


def test_probe_prints_capabilities_json() -> None:
    result = runner.invoke(cli.app, ["probe"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cpu_cores"] >= 1 and "qualifies_for" in data and isinstance(data["gpus"], list)


def test_invite_refuses_unknown_tier() -> None:
    result = runner.invoke(cli.app, ["invite", "create", "--tier", "quantum"])
    assert isinstance(result.exception, cli.CliError)
    assert "unknown tier" in str(result.exception)
