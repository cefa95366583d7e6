"""Command-line options built from the recipe fields they override, so flags and recipes cannot drift apart.

Every flag defaults to None ("not given": the recipe file or the stage's own default applies), so
typer cannot show the real default by itself. `recipe_option` reads it from the pydantic field and
writes it into the help, and a `Literal` field's values become the option's choices.
"""

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ssql_deploy.errors import UserError
from ssql_deploy.recipe import DataRecipe, Recipe


def describe_default(value: Any) -> str | None:
    """How a default reads on the command line: lists comma-separated, booleans yes/no, None as nothing."""
    if value is None or value is PydanticUndefined:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def recipe_option(recipe: type[BaseModel], field: str, text: str, flag: str | None = None, default: str | None = None) -> Any:
    """The typer.Option for `recipe.field`: `--field-name`, `text` and the field's default (or `default`, when it depends)."""
    shown = default if default is not None else describe_default(recipe.model_fields[field].default)
    return typer.Option(flag or "--" + field.replace("_", "-"), help=f"{text} [default: {shown}]" if shown else text, show_default=False)


RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="YAML recipe; flags given on the command line override its values.")]
DataRootOpt = Annotated[
    Path | None,
    recipe_option(
        DataRecipe, "data_root", "Directory holding the dataset files (see `ssql-deploy datasets`).", default="the dataset's default"
    ),
]
DownloadOpt = Annotated[
    bool | None, recipe_option(DataRecipe, "download", "Let torchvision download the dataset into --data-root.", "--download/--no-download")
]
SubsetOpt = Annotated[
    int | None, recipe_option(DataRecipe, "subset", "Use a fixed random subset of N images per split (fast runs).", default="all images")
]
WorkersOpt = Annotated[int | None, recipe_option(DataRecipe, "workers", "DataLoader worker processes.")]
InputSizeOpt = Annotated[
    int | None, recipe_option(DataRecipe, "input_size", "Input resolution.", default="32 for small-image sets, 224 otherwise")
]


def stage_data_option(recipe: type[Recipe]) -> Any:
    """--data for the stages after fine-tuning, which default to the dataset the model was trained on."""
    return recipe_option(recipe, "data", "Dataset (see `ssql-deploy datasets`).", default="the one the model was trained on")


def stage_root_option(recipe: type[Recipe]) -> Any:
    return recipe_option(recipe, "data_root", "Directory holding the dataset files.", default="the one the model was trained with")


def int_list(text: str | None, flag: str, example: str) -> list[int] | None:
    """'1,8,32' -> [1, 8, 32]; a malformed list names the flag and the value instead of failing inside int()."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}", f"for example {flag} {example}") from None
