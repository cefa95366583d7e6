"""The `ssql-deploy` command line: parse, build the stage's recipe, call one stage function, print.

The commands are registered here, in the order a user meets them and `--help` lists them.
"""

from ssql_deploy.cli import analyze, catalog, deploy, measure, train
from ssql_deploy.cli.app import app, main

for _name, _command in (
    ("datasets", catalog.datasets_cmd), ("models", catalog.models_cmd),
    ("pretrain", train.pretrain_cmd), ("finetune", train.finetune_cmd),
    ("analyze", analyze.analyze_cmd), ("quantize", deploy.quantize_cmd), ("export", deploy.export_cmd),
    ("bench", measure.bench_cmd), ("debug", analyze.debug_cmd), ("gate", measure.gate_cmd), ("run", measure.run_cmd),
):  # fmt: skip
    app.command(_name)(_command)

__all__ = ["app", "main"]
