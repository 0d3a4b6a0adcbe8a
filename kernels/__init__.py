"""Matmul kernels for sab-quantized linears (installed as ``vllm_sab.kernels``).

* :mod:`.chooser`: the priority list of kernels and :func:`choose` (which one runs a layer).
* :func:`cpu_linear` (:mod:`.cpu`): native C++ CPU kernels, AVX-512 / AVX2 / scalar,
  built on first use; the CPU serving path.
* :func:`triton_linear`: Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
  Imported lazily, so ``import vllm_sab.kernels`` works where Triton is absent; so is
  :func:`can_implement` (Triton's).
* :func:`reference_linear`: pure torch, any device; the oracle and the last-resort fallback.
* :func:`triton_available`: whether :func:`triton_linear` can run for a device.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from .cpu import cpu_linear
from .reference import reference_linear

__all__ = ["cpu_linear", "reference_linear", "triton_linear", "triton_available", "can_implement"]


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
    if name in ("triton_linear", "can_implement"):
        module = importlib.import_module(f"{__name__}.triton_kernel")
        globals()[name] = getattr(module, name)  # later lookups skip this hook
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
