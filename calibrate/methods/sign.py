"""``sign``: XNOR-style binarization with one scale per row and block."""

from __future__ import annotations

import torch

from vllm_sab.format import BinaryComponents, LayerProfile, tensor_specs

from .base import CalibrationStats, Method


class SignMethod(Method):
    """W_hat = alpha * sign(W), one alpha per (row, block of ``block_size`` columns).

    Math (XNOR-Net, Rastegari et al. 2016, eq. 3-4; BiLLM arXiv 2402.04291
    eq. 2): for a block ``w`` of ``B`` weights, ``argmin_a ||w - a sign(w)||^2``
    is ``a = ||w||_1 / B``. ``sign(0)`` is taken as +1. Data-free.

    Returns components with profile ``LayerProfile(block_size)``: 1 sign bit
    per weight plus one fp16 scale per 128 weights = 1.125 true bits/weight.
    """

    name = "sign"

    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> BinaryComponents:
        """Binarize ``weight``.

        Args:
            weight: float32 ``[N, K]``.
            stats: ignored (data-free).

        Raises:
            FormatError: K is not a multiple of the block size.
        """
        profile = LayerProfile(block_size=self.block_size)
        n, k = weight.shape
        w = weight.float()
        tensor_specs(profile, n, k)  # raises the clear error for a bad K before the view below
        alpha = w.abs().view(n, k // self.block_size, self.block_size).mean(-1, keepdim=True)
        signs = torch.where(w >= 0, 1, -1).to(torch.int8)
        return BinaryComponents(profile=profile, signs=signs, scale=alpha.to(torch.float16))
