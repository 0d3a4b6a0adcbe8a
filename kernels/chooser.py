"""Which kernel runs a sab layer: a priority list, each entry able to say why not.

Kernels, best first (``KERNELS``):

==============  ==========================================================================
name            runs
==============  ==========================================================================
``cpu-avx512``  native CPU kernel, AVX-512 backend (``vllm_sab.kernels.cpu``)
``cpu-avx2``    native CPU kernel, AVX2 + FMA backend
``cpu-scalar``  native CPU kernel, portable scalar backend
``triton``      Triton kernels (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``)
``torch``       the pure-torch reference (any device; dequantizes on every call)
==============  ==========================================================================

:func:`choose` takes the first whose ``can_implement(device, dtype, profile, m)``
is true. The vLLM plugin calls it once per layer when the weights are loaded
and passes the chosen name to ``sab::linear``, so nothing is decided per call
(as vLLM's ``MPLinearKernel`` chooser does). ``SAB_KERNEL`` forces a kernel by
name (or ``cpu``: the best native backend), read when a layer is loaded; a
forced kernel that cannot run the layer is an error, never a silent fallback.

The native CPU kernels come first on CPU even when ``TRITON_INTERPRET=1`` is
set (the test suite sets it to run Triton on CPU tensors); force ``triton`` to
run the interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from vllm_sab import format as fmt

from . import cpu as _cpu
from .reference import SUPPORTED_DTYPES, reference_linear

#: Environment variable that forces a kernel (a name of ``KERNELS``, or ``cpu``).
FORCE_ENV = "SAB_KERNEL"

Runner = Callable[[torch.Tensor, Mapping[str, torch.Tensor], fmt.LayerProfile], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """One way to compute ``y = x @ W_hat^T`` for a sab layer.

    Attributes:
        name: the name ``SAB_KERNEL`` and ``sab::linear`` use.
        can_implement: ``(device, dtype, profile, m) -> (ok, reason)``; ``reason``
            is a one-line explanation when ``ok`` is false.
        run: ``(x [M, K], tensors, profile) -> [M, N]`` in ``x.dtype``.
    """

    name: str
    can_implement: Callable[[torch.device, torch.dtype, fmt.LayerProfile, int], tuple[bool, str]]
    run: Runner


# The compiled kernels read float16 row scales; the vLLM plugin widens float8 ones at load.
_WIDEN = "row scales are float8: widen them to float16 first (the vLLM plugin does at load)"


def _native(isa: str) -> Kernel:
    def can_implement(device: torch.device, dtype: torch.dtype, profile: fmt.LayerProfile, m: int):
        if device.type != "cpu":
            return False, f"native CPU kernel runs CPU tensors, not {device.type}"
        if dtype not in SUPPORTED_DTYPES:
            return False, f"activations must be float16, bfloat16 or float32, not {dtype}"
        why = _cpu.build_error()
        if why:
            return False, f"native CPU kernels did not build: {why}"
        if isa not in _cpu.available_isas():
            return False, f"this CPU lacks {isa} (has {', '.join(_cpu.available_isas())})"
        if profile.scale_dtype != "float16":
            return False, _WIDEN
        return True, ""

    def run(x, tensors, profile):
        return _cpu.cpu_linear(x, tensors, profile, isa)

    return Kernel(f"cpu-{isa}", can_implement, run)


def _triton_can_implement(device, dtype, profile, m):
    from . import triton_available

    if not triton_available(device):
        return False, "Triton is not importable, or the device is not CUDA and TRITON_INTERPRET != 1"
    from .triton_kernel import can_implement

    if profile.scale_dtype != "float16":
        return False, _WIDEN
    return can_implement(device, dtype, profile, m)


def _triton_run(x, tensors, profile):
    from .triton_kernel import triton_linear

    return triton_linear(x, tensors, profile)


def _torch_can_implement(device, dtype, profile, m):
    if dtype not in SUPPORTED_DTYPES:
        return False, f"activations must be float16, bfloat16 or float32, not {dtype}"
    return True, ""


def _torch_run(x, tensors, profile):
    return reference_linear(x, tensors, profile, check=False)


#: The priority list.
KERNELS: tuple[Kernel, ...] = (
    _native("avx512"),
    _native("avx2"),
    _native("scalar"),
    Kernel("triton", _triton_can_implement, _triton_run),
    Kernel("torch", _torch_can_implement, _torch_run),
)
BY_NAME: dict[str, Kernel] = {k.name: k for k in KERNELS}


def forced() -> str:
    """The kernel ``SAB_KERNEL`` forces ("" when unset).

    Raises:
        ValueError: ``SAB_KERNEL`` names no kernel.
    """
    name = os.environ.get(FORCE_ENV, "").strip().lower()
    if name and name != "cpu" and name not in BY_NAME:
        raise ValueError(f"{FORCE_ENV}={name!r}: expected one of {['cpu', *BY_NAME]} or unset")
    return name


def choose(
    device: torch.device | str, dtype: torch.dtype, profile: fmt.LayerProfile, m: int = 1, where: str = "layer"
) -> Kernel:
    """The first kernel of :data:`KERNELS` that can run this layer (or the forced one).

    Args:
        device: where the layer's tensors and activations live.
        dtype: activation dtype.
        profile: the layer's storage profile.
        m: a typical number of tokens (every kernel here serves every ``M``).
        where: the layer's name, for error messages.

    Returns:
        The chosen :class:`Kernel`.

    Raises:
        ValueError: ``SAB_KERNEL`` forces a kernel that cannot run this layer
            (the message gives its reason), or names no kernel.
    """
    device = torch.device(device)
    name = forced()
    if name:
        candidates = [k for k in KERNELS if k.name.startswith("cpu-")] if name == "cpu" else [BY_NAME[name]]
        reasons = []
        for k in candidates:
            ok, why = k.can_implement(device, dtype, profile, m)
            if ok:
                return k
            reasons.append(f"{k.name}: {why}")
        raise ValueError(f"{where}: {FORCE_ENV}={name} cannot run here ({'; '.join(reasons)})")
    for k in KERNELS:
        if k.name == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests; force it by name
        ok, _ = k.can_implement(device, dtype, profile, m)
        if ok:
            if device.type == "cpu" and not k.name.startswith("cpu-"):
                _cpu.extension()  # warns once that the native kernels are missing, and why
            return k
    raise AssertionError("the torch reference runs everywhere")  # pragma: no cover


def explain(device: torch.device | str, dtype: torch.dtype, profile: fmt.LayerProfile, m: int = 1) -> list[str]:
    """One line per kernel: whether it can run this layer here, and why not."""
    device = torch.device(device)
    out = []
    for k in KERNELS:
        ok, why = k.can_implement(device, dtype, profile, m)
        out.append(f"{k.name}: {'yes' if ok else 'no, ' + why}")
    return out
