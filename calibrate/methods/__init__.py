"""Binarization methods: one small unit each, all returning format v1 components.

A method is a callable object with a ``name`` and
``quantize(weight, stats) -> BinaryComponents``; the pipeline never
names a method, it looks it up here.
"""

from __future__ import annotations

from .base import CalibrationStats, Method, MethodOptions
from .arb import ARBRCMethod, ARBXMethod
from .billm import BiLLMMethod
from .bivlm import BiVLMMethod
from .prune import ATVPruneMethod, ATVPruneSABMethod
from .sab import SABMethod
from .sign import SignMethod
from .uniform2 import Uniform2Method
from .uniform3 import Uniform3Method

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (
        SignMethod,
        BiLLMMethod,
        ARBXMethod,
        ARBRCMethod,
        SABMethod,
        Uniform2Method,
        Uniform3Method,
        BiVLMMethod,
        ATVPruneMethod,
        ATVPruneSABMethod,
    )
}


def get_method(name: str, **options) -> Method:
    """Instantiate a method by name.

    Args:
        name: a key of :data:`METHODS` (the ``--method`` value).
        options: the method's options (``--option KEY=VALUE``), checked against
            its ``Options`` dataclass (:class:`~.base.MethodOptions`).

    Raises:
        ValueError: unknown name, listing the known ones; an option the method
            does not take, listing the ones it does; an option value out of
            range (naming the option and what it accepts).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    accepted = cls.Options.names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    return cls(**options)


__all__ = [
    "ATVPruneMethod",
    "ATVPruneSABMethod",
    "ARBRCMethod",
    "ARBXMethod",
    "BiLLMMethod",
    "BiVLMMethod",
    "METHODS",
    "CalibrationStats",
    "Method",
    "MethodOptions",
    "SABMethod",
    "SignMethod",
    "Uniform2Method",
    "Uniform3Method",
    "get_method",
]
