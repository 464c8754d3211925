"""Typer commands generated from the verb registrations (:mod:`vitkit.verbs`): one option per field
of a verb's options class, help from its description and default. Nothing here is re-declared by hand.

Types: typer wants ``typing.Optional``/``typing.List`` and cannot show a ``Literal``, so a field's
annotation is mapped to what typer understands (a ``Literal`` becomes ``str``: the options class
validates the choice and says which values it takes).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Literal, Optional

import typer

from vitkit.cli.options import Arg, Opt
from vitkit.config import field_help
from vitkit.verbs import Verb, VerbOptions, _extra, verbs


def _typer_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return type(args[0]) if args else str
    if origin in (list, tuple, typing.List):  # noqa: UP006
        return typing.List[_typer_type(args[0]) if args else str]  # noqa: UP006
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        members = [a for a in args if a is not type(None)]
        inner = _typer_type(members[0]) if members else str
        return Optional[inner] if type(None) in args else inner  # noqa: UP045
    return annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parameters(options: type[VerbOptions]) -> list[inspect.Parameter]:
    params = []
    for name, info in options.model_fields.items():
        extra = _extra(info)
        help_text = field_help(options, name, show_bool=False)
        required = info.is_required()
        annotation = _typer_type(info.annotation)
        if extra.get("argument"):
            default = Arg(... if required else info.default, help=help_text)
        else:
            decls = list(extra.get("decls") or [])
            if not any(d.startswith("--") for d in decls):
                decls.insert(0, _flag(name))
            if name in options.short:
                decls.append(options.short[name])
            is_bool = info.annotation is bool
            if is_bool and info.default is True and not any("/" in d for d in decls):
                decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
            # Options without a value of their own are None here: the options class's default applies,
            # and a pipeline file and the command line mean the same thing by a missing option.
            cli_default = ... if required else (info.default if is_bool else None)
            if not is_bool and not required and typing.get_origin(annotation) is not typing.Union:
                annotation = Optional[annotation]  # noqa: UP045 - typer needs typing.Optional
            default = Opt(cli_default, *decls, help=help_text)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    return params


def _command(verb: Verb) -> Any:
    def command(**values: Any) -> None:
        given = {k: v for k, v in values.items() if v is not None and v != []}
        verb.run(verb.parse(given))

    command.__signature__ = inspect.Signature(_parameters(verb.options))  # type: ignore[attr-defined]
    command.__doc__ = verb.help
    command.__name__ = verb.name.replace("-", "_")
    return command


def add_verb_commands(app: typer.Typer) -> None:
    """One command per registered verb on ``app``."""
    for verb in verbs().values():
        app.command(verb.name, rich_help_panel=verb.panel)(_command(verb))
