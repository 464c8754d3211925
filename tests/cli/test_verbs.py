"""Every registered verb (vitkit.verbs): its CLI command is generated from its options class, and the
command line the pipeline records for a set of values parses back to the same options."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vitkit.cli.generate import _command
from vitkit.verbs import Verb, verbs

VERBS = sorted(verbs())


def _stand_in(annotation) -> object:
    """A value of the field's type that is not its default."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return args[-1]
    if origin is list:
        return [_stand_in(args[0]), _stand_in(args[0])]
    if args and origin is not None:
        return _stand_in(args[0])
    return {Path: Path("some/dir"), int: 3, float: 0.25, str: "x", bool: True}.get(annotation)


def _capture(verb: Verb) -> tuple[typer.Typer, list]:
    got: list = []
    app = typer.Typer()
    app.command(verb.name)(_command(dataclasses.replace(verb, run=got.append)))

    @app.command("noop")  # two commands, so the verb's name is part of the command line
    def _noop() -> None: ...

    return app, got


def test_the_stage_verbs_are_registered():
    assert {"export", "bench", "report"} <= set(VERBS)


@pytest.mark.parametrize("name", VERBS)
def test_every_field_has_help_and_a_cli_option(name):
    verb = verbs()[name]
    assert verb.help, f"{name}: the run function needs a docstring (the command's help)"
    app, _ = _capture(verb)
    out = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for field, info in verb.options.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
        if field not in verb.arguments():
            assert "--" + field.replace("_", "-") in out.output or info.json_schema_extra, (name, field)


@pytest.mark.parametrize("defaults", [False, True], ids=["changed", "defaults"])
@pytest.mark.parametrize("name", VERBS)
def test_the_recorded_command_line_parses_back_to_the_same_options(name, defaults):
    """Every field set to a value other than its default (flags flipped), or every field at its
    default (an off flag is then left out): the command line means the same options."""
    verb = verbs()[name]
    fields = verb.options.model_fields
    required = {f: _stand_in(i.annotation) for f, i in fields.items() if i.is_required()}
    values = dict(required)
    if not defaults:
        for field, info in fields.items():
            v = (not info.default) if info.annotation is bool else _stand_in(info.annotation)
            if v is not None:
                values[field] = v
    try:
        expected = verb.parse(values)
    except Exception:  # validators tie some fields together: fall back to the required ones only
        expected = verb.parse(required)
    app, got = _capture(verb)
    argv = verb.command_line(expected.model_dump())
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 0, (argv, out.output)
    assert got == [expected], argv


def test_a_bad_value_is_one_line_naming_the_field():
    app, got = _capture(verbs()["export"])
    out = CliRunner().invoke(app, ["export", "runs/a", "--exporter", "tflite"])
    assert out.exit_code != 0 and not got
    assert "exporter" in str(out.exception) and "torchscript" in str(out.exception)
