"""``arb-x`` and ``arb-rc``: ARB-LLM (Li et al., ICLR 2025, arXiv 2410.03129) in format v1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sab.format import SCALE_DTYPES, LayerProfile

from .base import CalibrationStats
from .binarize import (
    ZoneFit,
    arb_refine,
    arb_x_refine,
    on_zone_columns,
    rc_refine,
    rc_round_col_scales,
    rc_round_row_scales_fp8,
)
from .blockwise import BlockContext, BlockFit, BlockwiseMethod, BlockwiseOptions, break_point_search

__all__ = ["ARBOptions", "ARBRCMethod", "ARBXMethod"]


@dataclass(frozen=True)
class ARBOptions(BlockwiseOptions):
    """Options of ARB-X and ARB-RC (and the SAB family built on ARB-RC).

    Attributes:
        block_size, percdamp, salient_columns, max_salient: see
            :class:`~.blockwise.BlockwiseOptions`.
        iterations: ARB refinement rounds (an int >= 0; ARB-LLM's 15).
        column_group_bitmap: split the salient columns into two zones (ARB's
            ``--order2_group``), else one salient zone.

    Raises:
        ValueError: ``iterations`` not an int >= 0; as ``BlockwiseOptions``.
    """

    iterations: int = 15
    column_group_bitmap: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise ValueError(f"iterations must be an int >= 0, got {self.iterations!r}")
        self._set("column_group_bitmap", bool(self.column_group_bitmap))


@dataclass(frozen=True)
class RCOptions(ARBOptions):
    """Options of ARB-RC (and of the SAB family built on it).

    Attributes:
        block_size, percdamp, salient_columns, max_salient, iterations,
            column_group_bitmap: see :class:`ARBOptions`.
        scale_dtype: storage dtype of the row scales, ``"float16"`` or
            ``"float8_e4m3fn"`` (:func:`~.binarize.rc_round_row_scales_fp8`; half
            the row-scale bits, the column scales carry the magnitude).

    Raises:
        ValueError: an unknown ``scale_dtype``; as ``ARBOptions``.
    """

    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")


class _ARBBase(BlockwiseMethod):
    """Zones shared by ARB-X and ARB-RC: salient columns, column-group bitmap, break point.

    Zones in format order (``docs/format.md`` section 3.3): 0 non-salient
    concentrated, 1 non-salient sparse (order 1 each), then the salient zones
    (order 2): with the column-group bitmap (CGB, ARB-LLM sec. 3.3,
    ``--order2_group``) 2 salient concentrated and 3 salient sparse (ARB's
    orders ``[2, 2, 1, 1]``), without it one salient zone 2.

    Masks (reference ``utils/autosearch_arb.structural_searching_multip_alternating_group*``):
    the CGB split of the salient columns searches the 81 quantiles of their
    non-zero saliency with order-2 residual binarization and squared error;
    the non-salient split searches the 81 quantiles of the non-salient
    saliency with order-1 residual binarization (squared error, or the
    ``S``-weighted error for ARB-X: :meth:`_split_metric`).
    """

    Options = ARBOptions

    def _zoned(self, salient: int) -> bool:
        return self.column_group_bitmap and salient > 0

    def _split_metric(
        self, target: torch.Tensor, sal: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(base, S)`` for the non-salient break-point search (plain squared error here)."""
        return None, None

    def _zones(
        self, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Zone masks (bool ``[N, B]`` each, in format order) and their orders."""
        sal = salient.unsqueeze(0).expand_as(target)
        base, s_matrix = self._split_metric(target, sal, ctx)
        split = break_point_search(target, ~sal, 1, base=base, s_matrix=s_matrix)
        masks, orders = [split.concentrated, split.sparse], [1, 1]
        if ctx.profile.salient:
            if self._zoned(ctx.profile.salient):
                group = break_point_search(target, sal, 2, nonzero=True)
                masks += [group.concentrated, group.sparse]
                orders += [2, 2]
            else:
                masks.append(sal)
                orders.append(2)
        return masks, orders


class ARBXMethod(_ARBBase):
    """ARB-LLM_X: alternating refined binarization, then calibration-aware means and scales.

    Per zone (see :class:`_ARBBase` for the zones): ARB's alternating
    refinement of ``W_hat = sum_k alpha_k B_k + mu`` (``iterations`` rounds,
    :func:`~.binarize.arb_refine`; ARB-LLM eq. 1-5 and Alg. 1), then
    ``iterations`` rounds of the calibration-aware updates of all means and
    scales of the block under ``Tr((W - W_hat) S (W - W_hat)^T)`` with signs
    fixed (:func:`~.binarize.arb_x_refine`; ARB-LLM sec. 3.2). The break-point
    search of the non-salient weights scores candidates by the same
    ``S``-weighted error on the saliency matrix, with the salient columns
    approximated by order-2 ARB (reference
    ``structural_searching_multip_alternating_group_x``).

    ``S`` is the block's diagonal sub-matrix of the Hessian plus the same
    damping as the compensation, ``H[blk, blk] + lambda I``: proportional to
    ARB's ``sum_b X_b^T X_b`` without storing inputs (the damping keeps the
    exact minimisers bounded when few tokens make ``H`` rank-deficient).

    Storage: ``LayerProfile(B, zone_bits=1, salient=s, salient_zoned=CGB,
    offset=True)``: slots ``[conc, sparse, sal_conc_1, sal_sparse_1,
    sal_conc_2, sal_sparse_2]`` (CGB) and one mean per zone: 3.32 true
    bits/weight for a 4096 x 4096 layer at ``B = 128, s = 8``.

    Deviations from the reference: one ``s`` per layer and region-only
    quantiles (see :class:`~.billm.BiLLMMethod`); the calibration-aware step
    keeps the cross terms between the zones of a block (exact coordinate
    descent on the block's output error, never increasing it) where the
    reference fits each zone on its own; damped ``S``; fp16-rounded weights in
    the compensation.

    Args:
        block_size, percdamp, salient_columns, max_salient: see
            :class:`~.blockwise.BlockwiseMethod`.
        iterations: rounds of each refinement (15 in ARB-LLM).
        column_group_bitmap: split salient columns into concentrated/sparse
            groups (ARB's CGB); False gives one salient zone
            (``salient_zoned=False``).

    Raises:
        ValueError: options out of range.
    """

    name = "arb-x"

    def _profile(self, salient: int) -> LayerProfile:
        """``zone_bits=1, salient=s, salient_zoned=CGB, offset=True``."""
        return LayerProfile(
            block_size=self.block_size, zone_bits=1, salient=salient, salient_zoned=self._zoned(salient), offset=True
        )

    def _s_matrix(self, ctx: BlockContext) -> torch.Tensor:
        h = ctx.hessian[ctx.cols, ctx.cols]
        return h + ctx.damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def _split_metric(
        self, target: torch.Tensor, sal: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ARB-X: salient columns by order-2 ARB, error weighted by ``S``."""
        base = None
        if ctx.profile.salient:
            base = on_zone_columns(lambda x, m, _: arb_refine(x, m, 2, self.iterations), target, sal).dense(sal)
        return base, self._s_matrix(ctx)

    def _fit_block(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> BlockFit:
        """ARB per zone, then the joint calibration-aware refinement."""
        masks, orders = self._zones(target, salient, ctx)
        fits = [on_zone_columns(lambda x, mk, _, o=o: arb_refine(x, mk, o, self.iterations), w, m)
                for m, o in zip(masks, orders)]
        fits = arb_x_refine(w, masks, fits, self._s_matrix(ctx), self.iterations)
        return BlockFit(salient, masks, fits)


class ARBRCMethod(_ARBBase):
    """ARB-LLM_RC: row and column scales, no mean, with the column-group bitmap.

    Per zone (see :class:`_ARBBase`): ``W_hat = sum_k (alpha^r_k alpha^c_k^T) * B_k``
    fitted by :func:`~.binarize.rc_refine` (ARB-LLM eq. 12 initialisation,
    ``iterations`` rounds of eq. 13; order 2 alternates the two planes and
    re-picks both signs, reference ``high_order_residual_alternating_order2_rc_nomean``),
    then made storable by :func:`~.binarize.rc_round_col_scales`. Row scales
    are per (row, block, slot), column scales per (slot, column). The
    break-point searches use the squared error in saliency space.

    Storage: ``LayerProfile(B, zone_bits=1, salient=s, salient_zoned=CGB,
    col_scale=True)``: 2.84 true bits/weight for a 4096 x 4096 layer at
    ``B = 128, s = 8`` (``docs/format.md`` section 4).

    Extension point for SAB-LVLM: :meth:`_element_weights` returns the
    per-element loss weights ``omega`` (float32 ``[N, B]``, non-negative) of
    the block, or None. ARB-RC returns None (unweighted). A subclass that
    returns ``omega = Lambda^2`` turns every scale update into SAB-LVLM's
    weighted closed forms (``alpha^r_i = sum_j omega M alpha^c B W / sum_j
    omega M (alpha^c)^2`` and the column analogue, :func:`~.binarize.rc_row_update`,
    :func:`~.binarize.rc_col_update`); masks, signs and the initialisation are
    unchanged, and the fp16 row refit uses the same weights.

    Deviations from the reference: one ``s`` per layer and region-only
    quantiles (see :class:`~.billm.BiLLMMethod`); fp16 column scales with the
    row scales refitted to them; fp16-rounded weights in the compensation.

    Args:
        block_size, percdamp, salient_columns, max_salient: see
            :class:`~.blockwise.BlockwiseMethod`.
        iterations: alternating rounds (15 in ARB-LLM and SAB-LVLM).
        column_group_bitmap: ARB's CGB (see :class:`ARBXMethod`).

    Raises:
        ValueError: options out of range; weights from :meth:`_element_weights`
            of the wrong shape, negative or non-finite.
    """

    name = "arb-rc"
    Options = RCOptions

    def _profile(self, salient: int) -> LayerProfile:
        """``zone_bits=1, salient=s, salient_zoned=CGB, col_scale=True``, row scales in ``scale_dtype``."""
        return LayerProfile(
            block_size=self.block_size, zone_bits=1, salient=salient, salient_zoned=self._zoned(salient),
            col_scale=True, scale_dtype=self.scale_dtype,
        )

    def _element_weights(
        self, weight: torch.Tensor, stats: CalibrationStats, cols: slice
    ) -> torch.Tensor | None:
        """Per-element loss weights ``omega`` of one block, or None (ARB-RC: unweighted).

        Override in SAB-LVLM to return ``Lambda[:, cols] ** 2``.

        Args:
            weight: float32 ``[N, K]`` the layer's weight before compensation
                (dead input columns zeroed), on the compute device.
            stats: the layer's calibration statistics.
            cols: the block's column slice of ``weight``.

        Returns:
            float32 ``[N, B]`` non-negative, on ``weight.device``, or None.
        """
        return None

    def _fit_block(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> BlockFit:
        """RC per zone with the optional element weights, then fp16 column scales."""
        omega = self._element_weights(ctx.weight, ctx.stats, ctx.cols)
        if omega is not None:
            if tuple(omega.shape) != tuple(w.shape):
                raise ValueError(f"element weights must have shape {tuple(w.shape)}, got {tuple(omega.shape)}")
            omega = omega.to(device=w.device, dtype=torch.float32)
        masks, orders = self._zones(target, salient, ctx)
        fits: list[ZoneFit] = []
        for m, o in zip(masks, orders):

            def fit_zone(x: torch.Tensor, mk: torch.Tensor, om: torch.Tensor | None, o: int = o) -> ZoneFit:
                fit = rc_round_col_scales(x, mk, rc_refine(x, mk, o, self.iterations, weight=om), om)
                if self.scale_dtype == "float8_e4m3fn":
                    fit = rc_round_row_scales_fp8(x, mk, fit, om)
                return fit

            # A salient zone holds s of the B columns: fit it there only.
            fits.append(on_zone_columns(fit_zone, w, m, omega))
        return BlockFit(salient, masks, fits)
