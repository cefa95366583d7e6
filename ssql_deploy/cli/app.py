"""The typer app and the one wrapper every command shares: a user's mistake is one line, never a traceback.

Every user mistake surfaces as a `UserError` and is printed as one line with its fix, exit code 2
(1 for a check that fails, such as an export that does not match its simulation); Ctrl-C says what
the interrupted stage kept, exit code 130.
"""

import functools
import os
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from ssql_deploy import __version__
from ssql_deploy.errors import UserError
from ssql_deploy.progress import console

# Markdown help keeps text in brackets ("[default: ...]", "[pretrain,]") that rich markup would eat.
app = typer.Typer(
    name="ssql-deploy",
    help="Fine-tune, quantize, export and measure SSQL-pretrained vision backbones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
F = TypeVar("F", bound=Callable[..., Any])

# The base install runs `bench --evalset` on a board; the rest needs an extra (pyproject.toml).
EXTRAS = {"torch": "train", "torchvision": "train", "onnx": "train", "matplotlib": "train", "scipy": "train",
          "onnxruntime": "runtime", "openvino": "openvino"}  # fmt: skip
TRAINING_KEPT = "finished epochs are saved; continue with the same command and --resume"


def user_errors(on_interrupt: str) -> Callable[[F], F]:
    """Turn a UserError into one red line and its exit code (no traceback); Ctrl-C into `on_interrupt`, exit 130."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UserError as exc:
                console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            except ModuleNotFoundError as exc:
                extra = EXTRAS.get((exc.name or "").split(".")[0])
                if extra is None:
                    raise
                said = escape(
                    f"this command needs {exc.name}, which is not installed here; install it with: pip install 'ssql-deploy[{extra}]'"
                )
                console.print(f"[bold red]error:[/] {said}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print(f"[yellow]interrupted[/]: {escape(on_interrupt)}", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def is_main_process() -> bool:
    """Under torchrun only rank 0 prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def _version(value: bool) -> None:
    if value:
        print(f"ssql-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune, quantize, export and measure SSQL-pretrained vision backbones."""


def main() -> None:
    app(prog_name="ssql-deploy")
