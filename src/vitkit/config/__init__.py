"""Validated configurations (pydantic). This package imports no torch: the CLI builds its ``--help``
text from these fields (description and default) without loading the numerical stack."""
