"""Validation of technique options: the registry's one validator (kept here for the old import path)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from vitkit.registry import parse_config

C = TypeVar("C", bound=BaseModel)


def parse_options(cls: type[C], value: C | dict[str, Any] | None, what: str) -> C:
    """``value`` as a ``cls`` instance; see :func:`vitkit.registry.parse_config`."""
    return parse_config(cls, value, what)
