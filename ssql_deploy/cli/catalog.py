"""`ssql-deploy datasets` and `ssql-deploy models`: what the tool knows about."""

from rich.table import Table

from ssql_deploy.cli.app import user_errors
from ssql_deploy.progress import results


@user_errors("interrupted")
def datasets_cmd() -> None:
    """List the datasets and where each expects its files."""
    from ssql_deploy.data import list_datasets

    table = Table(title="datasets")
    for col in ("name", "classes", "input", "default --data-root", "expects under --data-root"):
        table.add_column(col)
    for spec in list_datasets():
        names = spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
        table.add_row(names, str(spec.num_classes or "from folders"), str(spec.input_size), str(spec.default_root or "-"), spec.expects)
    results.print(table)


@user_errors("interrupted")
def models_cmd() -> None:
    """List the backbones with their parameter counts (at 1000 classes, as torchvision counts them)."""
    from ssql_deploy.models import create_model, list_models

    table = Table(title="backbones (torchvision parameter names; small-input variant picked for inputs <= 64 px)")
    for col in ("name", "family", "parameters", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for spec in list_models():
        params = sum(p.numel() for p in create_model(spec.name, 1000).parameters())
        table.add_row(spec.name, spec.family, f"{params / 1e6:.2f} M" if params >= 1e5 else f"{params / 1e3:.1f} k", spec.description)
    results.print(table)
