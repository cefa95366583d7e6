"""`quantize --bits auto --budget ...`: turn the run's sensitivity analysis into a QuantConfig, before anything is quantized.

The analysis must be of the very model being quantized (its manifest's input hash is compared
with the checkpoint), else the plan would be fitted to another network's layers.
"""

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ssql_deploy.analyze.allocate import Budget, solve
from ssql_deploy.analyze.stage import SENSITIVITY_FILE
from ssql_deploy.errors import UserError
from ssql_deploy.manifest import read_manifest
from ssql_deploy.models.registry import model_spec
from ssql_deploy.progress import console
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.run_layout import RunLayout


def load_sensitivity(run: Path, model_file: Path) -> dict[str, Any]:
    directory = RunLayout(run).analyze
    manifest = read_manifest(directory)
    if manifest is None or not (directory / SENSITIVITY_FILE).is_file():
        raise UserError(f"--bits auto needs a sensitivity analysis in {directory}", f"run `ssql-deploy analyze {run}` first")
    record = manifest.inputs.get("model")
    if record is None or not record.matches(model_file):
        raise UserError(f"the sensitivity analysis in {directory} was made for another model than {model_file}",
                        f"re-run `ssql-deploy analyze {run}`")  # fmt: skip
    return json.loads((directory / SENSITIVITY_FILE).read_text())


def plan(run: Path, model_file: Path, budget: Budget) -> tuple[QuantConfig, dict[str, Any]]:
    """The widths that minimise summed sensitivity within `budget`, and what the plan reaches (printed as a table)."""
    sensitivity = load_sensitivity(run, model_file)
    solved = solve(sensitivity, budget, model_spec(sensitivity["arch"]).stem)
    config: QuantConfig = solved.pop("config")
    table = Table(
        title=f"--bits auto within {budget}: {config.label} (summed {sensitivity['metric']} sensitivity {solved['objective']:.4g})"
    )
    for column in ("reached", "value"):
        table.add_column(column)
    for key in ("avg_wbits", "size_mb", "avg_abits"):
        if key in solved:
            table.add_row(key.replace("_", "-"), f"{solved[key]:g}")
    table.add_row("config", config.describe())
    console.print(table)
    return config, solved | {"metric": sensitivity["metric"], "analysed_bits": sensitivity["bits"]}
