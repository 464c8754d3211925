"""The ``vitkit`` command: typer + rich, thin. Every verb calls the Python API.

User errors (:class:`vitkit.errors.VitkitError`) print one line and exit with code 2; no traceback.
"""

import os
import sys
import warnings

import typer
from rich.markup import escape

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
    # soft_wrap: one line however long (paths); escape: '[...]' in a file or class name is not markup.
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _exit_code(code: object) -> int:
    """The process exit status for a ``SystemExit.code`` (None is success; a message is failure)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    console.print(str(code), highlight=False, markup=False)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m vitkit`` (also under torchrun).

    typer runs in standalone mode: it prints its own short usage message for every usage error
    (unknown option or verb, wrong type, missing argument, bad choice) and exits 2, exits 0 after
    ``--help`` and 130 on Ctrl-C. vitkit's own :class:`VitkitError` passes through typer untouched
    and becomes one ``error:`` line here. Nothing is caught by exception class from click: typer
    >= 0.2x vendors its own copy of click, whose classes the separately installed click package
    does not match (issue 28).
    """
    try:
        _register()
        warnings.showwarning = _one_line_warnings
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        app(args=argv, prog_name="vitkit", standalone_mode=True)
    except SystemExit as e:
        return _exit_code(e.code)
    except VitkitError as e:
        # escape: a user's '[/x]' in a path would otherwise raise rich's MarkupError here.
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:  # during start-up (imports), before typer handles it
        console.print("[red]interrupted[/]", highlight=False)
        return 130
    return 0


def run() -> None:
    sys.exit(main())
