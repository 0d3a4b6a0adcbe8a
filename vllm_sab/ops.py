"""The ``sab::linear`` custom op: y = x W_hat^T from format v1 tensors.

vLLM compiles decoder layers with ``torch.compile(fullgraph=True)`` and captures
CUDA graphs, so the kernel call is wrapped in an opaque custom op with a fake
(meta) implementation: Dynamo never traces into Triton, and the op does no
host synchronisation. It lives in its own ``sab`` namespace so it cannot
collide with vLLM's or another plugin's ops (vllm#52802).

Dispatch: CUDA tensors go to the Triton kernel, everything else (CPU serving)
to the torch reference; ``SAB_KERNEL=torch`` or ``SAB_KERNEL=triton`` forces
one (``triton`` on CPU needs ``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import format as fmt
from .kernels import reference_linear, triton_available

_FORCED_KERNEL = os.environ.get("SAB_KERNEL", "").strip().lower()
if _FORCED_KERNEL not in ("", "torch", "triton"):
    raise ValueError(f"SAB_KERNEL must be 'torch' or 'triton', got {_FORCED_KERNEL!r}")


def _tensors(packed, zone, residual, perm, scale, col_scale, offset) -> dict[str, torch.Tensor]:
    named = {
        fmt.PACKED: packed,
        fmt.ZONE: zone,
        fmt.RESIDUAL: residual,
        fmt.PERM: perm,
        fmt.SCALE: scale,
        fmt.COL_SCALE: col_scale,
        fmt.OFFSET: offset,
    }
    return {k: v for k, v in named.items() if v is not None}


#: Number of ``sab::linear`` executions in this process (tests read it to prove
#: that vLLM really ran the sab path; one integer add per call).
call_count = 0


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``sab::linear`` runs the Triton kernel for an input on ``x.device``."""
    if _FORCED_KERNEL == "torch":
        return False
    if _FORCED_KERNEL == "triton":
        return True
    return x.is_cuda and triton_available(x.device)


# A model has a handful of distinct profiles; rebuilding (and re-validating) one
# per call would put Python work on every linear of every decode step.
_profile = functools.lru_cache(maxsize=None)(fmt.LayerProfile)


@torch.library.custom_op("sab::linear", mutates_args=())
def sab_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    zone: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    perm: Optional[torch.Tensor],
    scale: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    block_size: int,
    zone_bits: int,
    salient: int,
    salient_zoned: bool,
    col_scaled: bool,
    has_offset: bool,
) -> torch.Tensor:
    """y = x W_hat^T for one sab layer.

    Args:
        x: activations ``[M, K]`` (fp16, bf16 or fp32).
        packed .. offset: the layer's format v1 tensors (see ``vllm_sab.format``);
            optional ones are None when the profile has no such part.
        block_size .. has_offset: the fields of the layer's ``LayerProfile``.

    Returns:
        ``[M, N]`` in ``x.dtype`` (no bias).
    """
    global call_count
    call_count += 1
    profile = _profile(block_size, zone_bits, salient, salient_zoned, col_scaled, has_offset)
    tensors = _tensors(packed, zone, residual, perm, scale, col_scale, offset)
    if use_triton(x):
        from .kernels import triton_linear

        return triton_linear(x, tensors, profile)
    return reference_linear(x, tensors, profile, check=False)


@sab_linear.register_fake
def _(x, packed, zone, residual, perm, scale, col_scale, offset, block_size, zone_bits, salient,
      salient_zoned, col_scaled, has_offset):
    return x.new_empty((x.shape[0], packed.shape[0]))


def linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], profile: fmt.LayerProfile) -> torch.Tensor:
    """Call ``sab::linear`` with a tensor dict; ``x`` may have any leading dims.

    Args:
        x: ``[..., K]`` activations.
        tensors: ``{suffix: tensor}`` of the layer (format v1, already validated).
        profile: the layer's profile.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.sab.linear(
        x2,
        tensors[fmt.PACKED],
        tensors.get(fmt.ZONE),
        tensors.get(fmt.RESIDUAL),
        tensors.get(fmt.PERM),
        tensors[fmt.SCALE],
        tensors.get(fmt.COL_SCALE),
        tensors.get(fmt.OFFSET),
        profile.block_size,
        profile.zone_bits,
        profile.salient,
        profile.salient_zoned,
        profile.col_scale,
        profile.offset,
    )
    return y.reshape(*x.shape[:-1], y.shape[-1])
