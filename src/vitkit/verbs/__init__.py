"""The verbs: one registration per ``vitkit VERB``, from which the CLI and the pipeline are made.

A verb is an options class (pydantic: every field has a type, a default and a description, and is
the only validator) and a function that takes a validated instance and runs the stage
(:mod:`vitkit.stages`). From the registration:

- the CLI generates the typer command (``vitkit.cli.generate``): one option per field, its help
  from the description and default, positional arguments where the field says so;
- ``vitkit pipeline`` validates every stage of a YAML file against the options class before the
  first stage runs, then calls the verb's function (no command line in between).

Each module of this package registers the verbs of one group, at import; the modules import no
torch (the stage is imported inside the verb's function), so ``vitkit --help`` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from vitkit.errors import VitkitError
from vitkit.registry import parse_config


class VerbOptions(BaseModel):
    """Base of every verb's options: unknown fields are errors; values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)

    #: option name -> short flag (``{"output": "-o"}``)
    short: ClassVar[dict[str, str]] = {}


def argument(default: Any = ..., *, help: str) -> Any:
    """A positional command-line argument (``vitkit export RUN``)."""
    return Field(default, description=help, json_schema_extra={"argument": True})


def option(default: Any = None, *decls: str, help: str) -> Any:
    """An option; ``decls`` overrides the generated flag (``"--compile/--no-compile"``, ``"-q"``)."""
    extra = {"decls": list(decls)} if decls else None
    return Field(default, description=help, json_schema_extra=extra)


@dataclass(frozen=True)
class Verb:
    """One ``vitkit`` verb.

    ``run`` gets the validated options and prints what it wrote; it returns nothing. ``input`` names
    the field that takes the input run directory (or directories, for a list field) in a pipeline;
    ``produces`` says that the verb writes a new run directory to its ``output`` field, which later
    pipeline stages read (an analysis verb writes files, not a run).
    """

    name: str
    options: type[VerbOptions]
    run: Callable[[Any], None]
    panel: str
    input: str | None = None
    produces: bool = False

    @property
    def help(self) -> str:
        return (self.run.__doc__ or "").strip()

    def parse(self, values: dict[str, Any], where: str | None = None) -> VerbOptions:
        """``values`` (field name -> value) as validated options; one ``VitkitError`` line otherwise."""
        return parse_config(self.options, values, where or f"vitkit {self.name}")

    def arguments(self) -> list[str]:
        return [n for n, f in self.options.model_fields.items() if _extra(f).get("argument")]

    def takes(self, field: str) -> bool:
        return field in self.options.model_fields

    def command_line(self, values: dict[str, Any]) -> list[str]:
        """The ``vitkit`` arguments that mean ``values`` (field name -> value): what a pipeline stage
        records and shows, so that it can be rerun by hand."""
        args = self.arguments()
        argv = [self.name]
        for name in args:
            v = values.get(name)
            argv += [str(x) for x in v] if isinstance(v, list) else ([str(v)] if v is not None else [])
        for name, info in self.options.model_fields.items():
            if name in args or name not in values or values[name] is None:
                continue
            v = values[name]
            decls = [d for d in (_extra(info).get("decls") or []) if d.startswith("--")]
            on, _, off = (decls[0] if decls else "--" + name.replace("_", "-")).partition("/")
            if isinstance(v, bool):
                if v:
                    argv.append(on)
                elif off:
                    argv.append(off)
                elif info.default is not False:  # generated as --x/--no-x (see cli/generate.py)
                    argv.append("--no-" + on[2:])
                continue  # an off flag without a --no- form: off is its default, leave it out
            for item in v if isinstance(v, list) else [v]:
                argv += [on, str(item)]
        return argv


def _extra(field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


_VERBS: dict[str, Verb] = {}
_discovered = False


def register_verb(verb: Verb) -> Verb:
    if verb.input is not None and not verb.takes(verb.input):
        raise ValueError(f"verb '{verb.name}': input field '{verb.input}' is not an option")
    if verb.produces and not verb.takes("output"):
        raise ValueError(f"verb '{verb.name}' produces a run but has no 'output' option")
    _VERBS[verb.name] = verb
    return verb


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    # the package's folder, not ``import vitkit.verbs``: this module is the package
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__name__}.{info.name}")


def verbs() -> dict[str, Verb]:
    """Every registered verb by name."""
    _discover()
    return dict(_VERBS)


def get_verb(name: str) -> Verb:
    v = verbs().get(name)
    if v is None:
        raise VitkitError(f"unknown verb '{name}' (known: {', '.join(sorted(verbs()))})")
    return v
