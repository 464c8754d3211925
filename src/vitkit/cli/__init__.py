"""The ``vitkit`` command: typer + rich, thin. Every verb calls the Python API.

User errors (:class:`vitkit.errors.VitkitError`) print one line and exit with code 2; no traceback.
"""

import os
import sys
import warnings

import click
import typer

from vitkit.errors import VitkitError
from vitkit.progress import console

app = typer.Typer(
    name="vitkit",
    help="Train, adapt, compress, audit and deploy Vision Transformers (over timm).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register() -> None:
    """Import every module of this package: each adds its verbs to ``app`` (one module per verb group)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m vitkit`` (also under torchrun)."""
    _register()
    warnings.showwarning = _one_line_warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app(args=argv, standalone_mode=False)
    except VitkitError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        console.print("[red]aborted[/]")
        return 130
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    return 0


def run() -> None:
    sys.exit(main())
