"""Binarization methods: one small unit each, all returning format v1 components.

A method is a callable object with a ``name`` and
``quantize(weight, profile_args) -> BinaryComponents``; the pipeline never
names a method, it looks it up here.
"""

from __future__ import annotations

from .base import Method
from .sign import SignMethod

METHODS: dict[str, type[Method]] = {SignMethod.name: SignMethod}


def get_method(name: str, **options) -> Method:
    """Instantiate a method by name.

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "SignMethod", "get_method"]
