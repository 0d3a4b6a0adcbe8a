"""The ``sab::linear`` custom op: y = x W_hat^T from format v1 tensors.

vLLM compiles decoder layers with ``torch.compile(fullgraph=True)`` and captures
CUDA graphs, so the kernel call is wrapped in an opaque custom op with a fake
(meta) implementation: Dynamo never traces into Triton or C++, and the op does
no host synchronisation. It lives in its own ``sab`` namespace so it cannot
collide with vLLM's or another plugin's ops (vllm#52802).

Dispatch: the op's ``kernel`` argument names an entry of
``vllm_sab.kernels.chooser.KERNELS`` (native CPU per instruction set, Triton,
torch reference). The vLLM plugin chooses it once per layer at load time;
:func:`linear` without a kernel chooses on first use per (device, dtype,
profile) and caches the choice. ``SAB_KERNEL`` forces one (see the chooser).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import format as fmt
from .kernels import chooser


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
    kernel: str,
) -> torch.Tensor:
    """y = x W_hat^T for one sab layer.

    Args:
        x: activations ``[..., K]`` (fp16, bf16 or fp32), any leading dims.
        packed .. offset: the layer's format v1 tensors (see ``vllm_sab.format``),
            validated at load time (not re-checked here); optional ones are None
            when the profile has no such part.
        block_size .. has_offset: the fields of the layer's ``LayerProfile``.
        kernel: a name of ``chooser.KERNELS`` (``cpu-avx512``, ``triton``, ``torch``, ...).

    Returns:
        ``[..., N]`` in ``x.dtype`` (no bias).

    Raises:
        KeyError: ``kernel`` names no kernel.
    """
    global call_count
    call_count += 1
    profile = _profile(block_size, zone_bits, salient, salient_zoned, col_scaled, has_offset)
    tensors = _tensors(packed, zone, residual, perm, scale, col_scale, offset)
    x2 = x.reshape(-1, x.shape[-1])
    y = chooser.BY_NAME[kernel].run(x2, tensors, profile)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@sab_linear.register_fake
def _(x, packed, zone, residual, perm, scale, col_scale, offset, block_size, zone_bits, salient,
      salient_zoned, col_scaled, has_offset, kernel):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@functools.lru_cache(maxsize=None)
def _chosen(device: torch.device, dtype: torch.dtype, profile: fmt.LayerProfile) -> str:
    return chooser.choose(device, dtype, profile).name


def choose_kernel(device: torch.device | str, dtype: torch.dtype, profile: fmt.LayerProfile, where: str = "layer") -> str:
    """Name of the kernel for a layer on ``device`` with ``dtype`` activations (see the chooser).

    Raises:
        ValueError: ``SAB_KERNEL`` forces a kernel that cannot run it.
    """
    return chooser.choose(device, dtype, profile, where=where).name


def linear(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], profile: fmt.LayerProfile, kernel: str | None = None
) -> torch.Tensor:
    """Call ``sab::linear`` with a tensor dict; ``x`` may have any leading dims.

    Args:
        x: ``[..., K]`` activations.
        tensors: ``{suffix: tensor}`` of the layer (format v1, already validated).
        profile: the layer's profile.
        kernel: a kernel name from :func:`choose_kernel`; None chooses (once per
            device, dtype and profile).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    if kernel is None:
        kernel = _chosen(x.device, x.dtype, profile)
    return torch.ops.sab.linear(x, *fmt.flat_layer(tensors, profile), kernel)
