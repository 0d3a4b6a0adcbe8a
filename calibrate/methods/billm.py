"""``billm``: BiLLM (Huang et al., ICML 2024, arXiv 2402.04291) in format v1."""

from __future__ import annotations

import torch

from vllm_sab.format import LayerProfile

from .binarize import residual_binarize
from .blockwise import BlockContext, BlockFit, BlockwiseMethod, break_point_search

__all__ = ["BiLLMMethod"]


class BiLLMMethod(BlockwiseMethod):
    """BiLLM: salient columns with order-2 residual binarization, bell-shaped split of the rest.

    Per block of ``B`` columns (reference ``bigptq.BRAGPTQ.fasterquant`` with
    ``utils/autosearch.structural_searching``; papers.md section 4.1):

    1. saliency ``t_ij = w_ij^2 / U_jj^2`` (``U``: upper Cholesky factor of the
       damped inverse Hessian; paper eq. 3, Alg. 1);
    2. the ``s`` salient columns (top column sums of ``t``) get order-2
       residual binarization with a mean per order (paper eq. 6-8,
       :func:`~.binarize.residual_binarize`);
    3. the other weights are split at the break point ``p*`` searched over
       the 81 quantiles 0.10..0.90 of their saliency
       (:func:`~.blockwise.break_point_search`, order 1, squared error in
       saliency space; paper eq. 11-13): concentrated ``|t| < p*`` (zone 0)
       and sparse ``|t| >= p*`` (zone 1), each order 1 with a mean;
    4. block-wise compensation of the later columns (no intra-block updates).

    Storage: ``LayerProfile(block_size=B, zone_bits=1, salient=s,
    salient_zoned=False, offset=True)``: zone bit = concentrated/sparse for
    non-salient weights (0 for salient ones, unused), slots
    ``[alpha_conc, alpha_sparse, alpha_sal_1, alpha_sal_2]``, offsets
    ``[mu_conc, mu_sparse, mu_sal_1 + mu_sal_2]`` per (row, block): 2.94 true
    bits/weight for a 4096 x 4096 layer at ``B = 128, s = 8``
    (``vllm_sab.format.true_bits_per_weight``; the same for every
    ``1 <= s <= 8``, each further 8 salient columns add a residual byte per
    row and block).

    Deviations from the reference: (a) one salient count ``s`` per layer
    (format v1), chosen by the reference's per-block criterion summed over
    the blocks (see :class:`~.blockwise.BlockwiseMethod`); (b) the break-point
    quantiles are taken over the non-salient saliency only (the reference
    includes the zeroed salient columns); (c) ``sign(0) = +1`` (storable);
    (d) the compensation uses the fp16-rounded stored weights.

    Args:
        block_size, percdamp, salient_columns, max_salient: see
            :class:`~.blockwise.BlockwiseMethod`.

    Raises:
        ValueError: options out of range (see the base class).
    """

    name = "billm"

    def _profile(self, salient: int) -> LayerProfile:
        """``zone_bits=1, salient=s, salient_zoned=False, offset=True``."""
        return LayerProfile(block_size=self.block_size, zone_bits=1, salient=salient, offset=True)

    def _fit_block(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> BlockFit:
        """Masks from the saliency, residual binarization of the weights (steps 2-3)."""
        sal = salient.unsqueeze(0).expand_as(w)
        base = residual_binarize(target, sal, 2).dense(sal)
        split = break_point_search(target, ~sal, 1, base=base)
        masks = [split.concentrated, split.sparse]
        fits = [residual_binarize(w, split.concentrated, 1), residual_binarize(w, split.sparse, 1)]
        if ctx.profile.salient:
            masks.append(sal)
            fits.append(residual_binarize(w, sal, 2))
        return BlockFit(salient, masks, fits)
