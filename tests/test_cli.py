"""The command line as documentation: every command's help shows each option's default and choices."""

import re

import pytest
from typer.testing import CliRunner

from ssql_deploy.cli import app

COMMANDS = ["datasets", "models", "pretrain", "finetune", "quantize", "export", "bench", "gate", "run"]
# Options that have no default to show: switches that are off unless given, repeatable gates, the recipe file itself.
NO_DEFAULT = {
    "--help",
    "--recipe",
    "--resume",
    "--ckpt",
    "--force",
    "--strict",
    "--min-top1",
    "--max-drop",
    "--max-latency-ms",
    "--min-speedup",
}
CHOICES = {"export": {"--engine": "ort|trt|openvino", "--ort-kernel": "auto|gemm|symmetric"}, "quantize": {"--calib": "minmax|percentile|mse|entropy"},
           "finetune": {"--mode": "linear|full", "--schedule": "step|cosine", "--stem": "auto|cifar|imagenet"}}  # fmt: skip


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"}, prog_name="ssql-deploy")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default(command: str) -> None:
    rows = [line for line in _help(command).splitlines() if re.match(r"^[│|]\s+--", line)]
    assert rows, "no options rendered"
    for row in rows:
        flag = row.split()[1]
        if flag not in NO_DEFAULT:
            assert "[default: " in row, row
    for flag, choices in CHOICES.get(command, {}).items():
        assert any(r.split()[1] == flag and f"<{choices}>" in r for r in rows), (flag, choices)


def test_text_in_brackets_survives() -> None:
    assert "[pretrain,] finetune" in CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"}).output
