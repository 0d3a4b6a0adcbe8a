"""Pure-torch reference of a sab-quantized linear (also the CPU serving path)."""

from __future__ import annotations

from typing import Mapping

import torch

from vllm_sab import format as fmt

#: Activation dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference_linear(
    x: torch.Tensor, tensors: Mapping[str, torch.Tensor], profile: fmt.LayerProfile, *, check: bool = True
) -> torch.Tensor:
    """``y = x @ W_hat^T`` from a layer's packed format-v1 tensors (no bias).

    ``W_hat`` is ``format.dequantize(tensors, profile)`` (float32 ``[N, K]``,
    original column order); the product is computed in float32 and rounded
    once to ``x.dtype``. Bias, if any, is the caller's.

    Args:
        x: activations ``[..., K]`` (any number of leading dims), float16,
            bfloat16 or float32, on the device of ``tensors``.
        tensors: ``{suffix: tensor}`` of one layer, as :func:`format.pack` or a
            checkpoint gives them (``format.tensor_specs`` lists shapes/dtypes).
        profile: the layer's storage profile.
        check: validate the tensors first; serving passes False because the
            plugin validated them at load time.

    Returns:
        ``[..., N]`` tensor of ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: ``x`` is not float16/bfloat16/float32.
        ValueError: ``x.shape[-1]`` is not the layer's ``K``, or ``x`` is on
            another device than the packed weight.
        format.FormatError: the tensors do not follow ``profile``.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"reference_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    packed = tensors.get(fmt.PACKED)
    if packed is not None and packed.dim() == 2 and x.shape[-1] != packed.shape[1] * fmt.WORD_BITS:
        raise ValueError(
            f"reference_linear: x has K={x.shape[-1]} input features, the layer has "
            f"K={packed.shape[1] * fmt.WORD_BITS}"
        )
    if packed is not None and packed.device != x.device:
        raise ValueError(f"reference_linear: x is on {x.device}, the packed weight on {packed.device}")
    w = fmt.dequantize(tensors, profile, check=check)  # float32 [N, K]; raises FormatError
    # matmul broadcasts over leading dims; .float() is free for float32 x.
    return torch.matmul(x.float(), w.t()).to(x.dtype)
