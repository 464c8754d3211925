"""Validation of technique options (Python dicts, YAML or ``--transform name:key=value`` strings)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vitkit.errors import VitkitError

C = TypeVar("C", bound=BaseModel)


def parse_options(cls: type[C], value: C | dict[str, Any] | None, what: str) -> C:
    """``value`` as a ``cls`` instance; a bad field raises a one-line :class:`VitkitError` naming
    ``what`` (the transform) and the field."""
    if isinstance(value, cls):
        return value
    try:
        return cls(**(value or {}))
    except ValidationError as e:
        parts = []
        for err in e.errors()[:3]:
            field = ".".join(str(x) for x in err["loc"]) or "(options)"
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.model_fields)
                parts.append(f"unknown option '{field}' (known: {known})")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                parts.append(f"option '{field}': {msg} (got {err.get('input')!r})")
        raise VitkitError(f"{what}: " + "; ".join(parts)) from e
