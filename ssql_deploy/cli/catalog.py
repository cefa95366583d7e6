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
    """List the backbones."""
    from ssql_deploy.models import list_models

    table = Table(title="backbones (torchvision parameter names; stem picked by input size)")
    for col in ("name", "blocks", "base width", "description"):
        table.add_column(col)
    for spec in list_models():
        table.add_row(spec.name, "-".join(map(str, spec.layers)), str(spec.base_width), spec.description)
    results.print(table)
