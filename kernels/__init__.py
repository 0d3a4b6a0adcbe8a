"""Matmul kernels for sab-quantized linears (installed as ``vllm_sab.kernels``).

* :func:`reference_linear`: pure torch, any device; the CPU serving path.
* :func:`triton_linear`: Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).
  Imported lazily, so ``import vllm_sab.kernels`` works where Triton is absent.
* :func:`triton_available`: whether :func:`triton_linear` can run for a device.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from .reference import reference_linear

__all__ = ["reference_linear", "triton_linear", "triton_available"]


def triton_available(device: torch.device | str) -> bool:
    """Whether :func:`triton_linear` can run on tensors of ``device``.

    True when Triton is importable and either ``device`` is CUDA or Triton's
    interpreter is on (``TRITON_INTERPRET=1``, which runs kernels on CPU
    tensors). Does not import Triton.

    Args:
        device: a ``torch.device`` or a string such as ``"cuda:0"``.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: only `triton_linear` pulls in Triton.
    if name == "triton_linear":
        module = importlib.import_module(f"{__name__}.triton_kernel")
        globals()["triton_linear"] = module.triton_linear  # later lookups skip this hook
        return module.triton_linear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
