"""Validated configurations (pydantic). This package imports no torch: the CLI builds its ``--help``
text from these fields (description and default) without loading the numerical stack."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def field_default(config: type[BaseModel], field: str) -> str | None:
    """The field's default as a user would type it, or None where it has none worth showing."""
    info = config.model_fields[field]
    if info.default is PydanticUndefined:
        return None if info.default_factory is None else str(info.default_factory()) or None
    if info.default is None:
        return None
    if isinstance(info.default, bool):
        return "on" if info.default else "off"
    return str(info.default)


def field_help(
    config: type[BaseModel], field: str, extra: str | None = None, *, show_bool: bool = True
) -> str:
    """``description [default: value]`` of a config field (the one place this text is written).
    ``show_bool=False``: no default for an on/off flag (typer shows which of its names is the default)."""
    info = config.model_fields[field]
    text = info.description or field.replace("_", " ")
    if extra:
        text = f"{text}; {extra}"
    if not show_bool and isinstance(info.default, bool):
        return text
    default = field_default(config, field)
    return f"{text} [default: {default}]" if default not in (None, "[]", "{}") else text


__all__ = ["field_default", "field_help"]
