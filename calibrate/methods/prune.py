"""``atv-prune`` and ``atv-prune+sab``: ATV-Pruning's Wanda mask, alone or before SAB binarization.

ATV-Pruning ("Mostly Text, Smart Visuals", arXiv 2603.16001; reference
``ActivationAwarePruner._prune``, method ``atv``; papers.md section 2.2) is
Wanda (arXiv 2306.11695) with a different calibration pool: the importance of
weight ``W_ij`` is ``|W_ij| * ||X_j||_2`` over *all text tokens plus the
drift-selected visual tokens* of every sample (per layer), and each output row
drops its least important weights. The pool is the pipeline's business
(``--token-pool atv``, :func:`vllm_sab.calibrate.layerwise.atv_visual_selection`);
the pipeline hands every method the Hessian ``H = (2/n) sum_t x_t x_t^T`` over
that pool, and Wanda's per-column input norm is its diagonal:
``||X_j||^2 = diag(H)_j * n / 2``. Wanda ranks within a row, so the constant
factor is irrelevant and the importance is ``|W_ij| * sqrt(H_jj)``.

* ``sab-calibrate --method atv-prune --token-pool atv`` is ATV-Pruning;
  ``--token-pool all`` is plain Wanda (every token), ``--token-pool text`` is
  Wanda on text tokens only.
* ``--method atv-prune+sab`` prunes with the same mask, then binarizes the kept
  weights with SAB-LVLM (STBLLM's order, arXiv 2408.01803: sparsify, then
  binarize the survivors), storing the pruned weights as a zero zone of
  format v1.

Pure functions :func:`wanda_importance` and :func:`prune_mask` do the ranking
and are shared by both methods.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm_sab.format import LayerProfile

from .base import CalibrationStats, Method, MethodOptions
from .binarize import ZoneFit, rc_refine, rc_round_col_scales
from .blockwise import BlockContext, BlockFit, BlockwiseResult, break_point_search
from .sab import SABMethod, SABOptions

__all__ = [
    "ATVPruneMethod",
    "ATVPruneSABMethod",
    "PATTERNS",
    "parse_pattern",
    "prune_mask",
    "resolve_sparsity",
    "wanda_importance",
]

#: The sparsity patterns named in ATV-Pruning / Wanda / STBLLM. Any ``"N:M"``
#: with ``1 <= N < M`` is accepted (STBLLM also uses 5:8 and 6:8).
PATTERNS = ("unstructured", "2:4", "4:8")

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

# Guard of the pruned count floor(s * K): 0.29 * 100 is 28.999999999999996 in
# binary floating point, and the intent is 29.
_COUNT_EPS = 1e-9


# ---------------------------------------------------------------------------------------
# Importance and mask (pure functions)
# ---------------------------------------------------------------------------------------
def wanda_importance(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Wanda's per-weight importance ``|W_ij| * ||X_j||`` from the layer Hessian.

    With ``H = (2/n) X^T X`` (``X`` the ``[n, K]`` pool inputs; what
    :class:`~.base.CalibrationStats` holds) the result is
    ``|W_ij| * ||X_j||_2 * sqrt(2/n)``: Wanda's score up to a positive constant,
    which leaves every within-row ranking unchanged. A dead input column
    (``H_jj = 0``) scores 0 and is pruned first. Source: Wanda (arXiv
    2306.11695, eq. 1, reference ``W_metric = |W| * sqrt(scaler_row)``), used
    unchanged by ATV-Pruning (arXiv 2603.16001) over its token pool.

    Args:
        weight: float ``[N, K]`` (any float dtype; computed in float32).
        hessian: float ``[K, K]`` symmetric PSD; only its diagonal is read
            (negative round-off is clamped to 0).

    Returns:
        float32 ``[N, K]`` non-negative, on ``weight.device``.

    Raises:
        ValueError: ``weight`` not 2-D, ``hessian`` not ``[K, K]``, or
            non-finite entries in either.
    """
    if weight.dim() != 2:
        raise ValueError(f"wanda_importance: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"wanda_importance: Hessian shape {tuple(hessian.shape)} does not match K={k}")
    w = weight.to(torch.float32)
    diag = torch.diagonal(hessian).to(device=w.device, dtype=torch.float32)
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(diag).all()):
        raise ValueError("wanda_importance: NaN/Inf in the weight or the Hessian diagonal")
    return w.abs() * diag.clamp_min(0).sqrt()


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for ``"unstructured"``, ``(N, M)`` for ``"N:M"`` (keep N of every M).

    Raises:
        ValueError: anything else (not a string, ``N < 1``, ``N >= M``).
    """
    if pattern == "unstructured":
        return None
    m = _NM.match(pattern) if isinstance(pattern, str) else None
    if m is None or not 1 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(
            f"unknown sparsity pattern {pattern!r}; use 'unstructured' or 'N:M' with 1 <= N < M "
            f"(e.g. {', '.join(repr(p) for p in PATTERNS)})"
        )
    return int(m.group(1)), int(m.group(2))


def resolve_sparsity(sparsity: float | None, pattern: str) -> tuple[float, tuple[int, int] | None]:
    """Check a ``(sparsity, pattern)`` pair and return ``(sparsity, (N, M) or None)``.

    Rule (ours; the Wanda and STBLLM scripts assert ``sparsity_ratio == 0.5``
    for their 2:4 / 4:8 runs): ``"unstructured"`` needs a sparsity in
    ``[0, 1)``; an ``N:M`` pattern fixes the sparsity to ``1 - N/M``, so
    ``sparsity`` must be None (take it from the pattern) or equal to it
    (within 1e-9).

    Raises:
        ValueError: a sparsity that is not a real number in ``[0, 1)``, None
            with ``"unstructured"``, a sparsity that contradicts ``N:M``, or an
            unknown pattern.
    """
    nm = parse_pattern(pattern)
    if sparsity is None:
        if nm is None:
            raise ValueError("sparsity=None is only allowed with an N:M pattern; give a sparsity in [0, 1)")
        return 1.0 - nm[0] / nm[1], nm
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights pruned), got {sparsity!r}")
    if nm is not None and abs(float(sparsity) - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise ValueError(
            f"pattern {pattern!r} prunes exactly {1.0 - nm[0] / nm[1]:g} of the weights; "
            f"got sparsity={sparsity!r} (pass that value or None)"
        )
    return float(sparsity), nm


def _stable_ascending_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank along the last dim by ascending score (0 = lowest), ties to the lower index."""
    order = torch.sort(score, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def prune_mask(importance: torch.Tensor, sparsity: float | None, pattern: str = "unstructured") -> torch.Tensor:
    """Keep-mask of Wanda / ATV-Pruning: per output row, drop the least important weights.

    * ``"unstructured"`` (Wanda sec. 3 "comparison group" = one output row;
      reference ``prune_wanda``): each row prunes its ``floor(sparsity * K)``
      lowest-importance weights (the reference's ``int(K * ratio)``, guarded
      against float round-off) and keeps the other ``K - floor(sparsity * K)``.
      This is the reference count, not ``round((1 - s) K)``: e.g. ``K = 128,
      s = 0.6`` prunes 76 and keeps 52.
    * ``"N:M"`` (Wanda sec. 4 / reference ``prune_n, prune_m``; 2:4 and 4:8 in
      ATV-Pruning's tables): in every group of ``M`` consecutive input columns
      of a row, keep the ``N`` most important. ``sparsity`` must be None or
      ``1 - N/M`` (:func:`resolve_sparsity`).

    Ties: candidates are ordered by a stable ascending sort of the importance
    and pruned from the front, so among equal scores the *lower* column index
    is pruned first (Wanda's unstructured path does the same; its N:M path
    uses ``topk``, whose tie order is unspecified). Deterministic.

    Args:
        importance: float ``[N, K]`` (e.g. :func:`wanda_importance`).
        sparsity: fraction of each row to prune, in ``[0, 1)``; None with N:M.
        pattern: ``"unstructured"`` or ``"N:M"`` (see :data:`PATTERNS`).

    Returns:
        bool ``[N, K]``, True = kept, on ``importance.device``.

    Raises:
        ValueError: bad sparsity or pattern (:func:`resolve_sparsity`), an
            importance that is not 2-D or has NaN entries, or ``K % M != 0``.
    """
    s, nm = resolve_sparsity(sparsity, pattern)
    if importance.dim() != 2:
        raise ValueError(f"prune_mask: importance must be 2-D [N, K], got shape {tuple(importance.shape)}")
    if bool(torch.isnan(importance).any()):
        raise ValueError("prune_mask: NaN in the importance")
    n, k = importance.shape
    score = importance.to(torch.float32)
    if nm is None:
        n_prune = math.floor(s * k + _COUNT_EPS)
        return _stable_ascending_rank(score) >= n_prune
    keep_n, m = nm
    if k % m:
        raise ValueError(f"prune_mask: K={k} is not a multiple of M={m} for pattern {pattern!r}")
    rank = _stable_ascending_rank(score.view(n, k // m, m))
    return (rank >= m - keep_n).view(n, k)


# ---------------------------------------------------------------------------------------
# atv-prune: the pruned dense weight
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ATVPruneOptions(MethodOptions):
    """Options of ``atv-prune``: the keep-mask.

    Attributes:
        block_size: accepted for the pipeline's interface (validated, unused).
        sparsity: fraction pruned per row (0.5; the paper uses 0.5 and 0.6);
            normalized by :func:`resolve_sparsity` (None with ``N:M`` becomes ``1 - N/M``).
        pattern: ``"unstructured"`` (default), ``"2:4"``, ``"4:8"`` or any
            ``"N:M"``; N:M needs ``sparsity`` None or ``1 - N/M``.

    Raises:
        ValueError: bad sparsity or pattern (:func:`resolve_sparsity`).
        FormatError: a bad ``block_size``.
    """

    sparsity: float | None = 0.5
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("sparsity", resolve_sparsity(self.sparsity, self.pattern)[0])


class ATVPruneMethod(Method):
    """ATV-Pruning (arXiv 2603.16001) / Wanda (arXiv 2306.11695): pruned dense weights.

    ``W_pruned = W * M`` with ``M = prune_mask(|W| * sqrt(diag H), sparsity,
    pattern)`` (:func:`wanda_importance`, :func:`prune_mask`), ``H`` the
    pipeline's Hessian over its token pool. No weight update (Wanda has none).
    What makes it ATV-Pruning rather than Wanda is the pool:

    * ``sab-calibrate --method atv-prune`` (the pool defaults to ``atv``):
      ATV-Pruning (all text tokens + the drift-selected visual tokens of each
      sample, per layer; ``--atv-alpha`` is ATV's alpha, 1.0 in the paper);
    * ``--token-pool all``: plain Wanda over every token.

    Unlike the binarizers this method returns a DENSE float32 weight, not
    :class:`~vllm_sab.format.BinaryComponents`; :attr:`dense_output` tells the
    pipeline to keep the module's ``.weight`` (zeros included) in the
    checkpoint. Stored densely it costs its dtype's 16 bits per weight;
    the sparsity saves nothing on disk in a dense checkpoint.

    Deviations from the reference: the pool Hessian's diagonal in place of the
    running mean ``scaler_row`` (same ranking); ties pruned lower-index first
    (:func:`prune_mask`); N:M works (the released ATV N:M path is broken,
    papers.md section 2.2).

    Options: :class:`ATVPruneOptions`.

    Raises:
        ValueError: bad sparsity or pattern (:func:`resolve_sparsity`).
        FormatError: a bad ``block_size``.
    """

    name = "atv-prune"
    needs_stats = True
    default_token_pool: ClassVar[str] = "atv"
    dense_output: ClassVar[bool] = True
    Options = ATVPruneOptions

    def keep_mask(self, weight: torch.Tensor, stats: CalibrationStats | None) -> torch.Tensor:
        """The keep-mask of ``weight`` (bool ``[N, K]``, True = kept).

        Raises:
            ValueError: no statistics, or as :func:`wanda_importance` / :func:`prune_mask`.
        """
        if stats is None or getattr(stats, "hessian", None) is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics (the pool Hessian)")
        imp = wanda_importance(weight, stats.hessian.to(weight.device))
        return prune_mask(imp, self.sparsity, self.pattern)

    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> torch.Tensor:  # type: ignore[override]
        """Prune ``weight``.

        Args:
            weight: float ``[N, K]`` on the compute device (a fused group stacked
                along rows: each row is ranked on its own, so stacking changes
                nothing).
            stats: calibration statistics; ``stats.hessian`` float32 ``[K, K]``.

        Returns:
            float32 ``[N, K]``: ``weight`` at kept positions, exactly 0 elsewhere.

        Raises:
            ValueError: no statistics, shape mismatch, non-finite weight,
                ``K % M != 0`` for N:M.
        """
        w = weight.to(torch.float32)
        keep = self.keep_mask(w, stats)
        return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


# ---------------------------------------------------------------------------------------
# atv-prune+sab: prune, then SAB-binarize the kept weights
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ATVPruneSABOptions(SABOptions):
    """Options of ``atv-prune+sab``: SAB's, the keep-mask's, and the zones of the pruned weights.

    Attributes:
        block_size, percdamp, salient_columns, max_salient, iterations,
            salient_top_p, diff_quantile, significance, compensation,
            weight_power: see :class:`~.sab.SABOptions`.
        column_group_bitmap: always True, not an option (salient zones must
            hold pruned weights too).
        sparsity, pattern: the mask (see :class:`ATVPruneOptions`).
        zone_bits: 1 (pruned / kept) or 2 (pruned / concentrated / sparse).
        compensate_pruning: start the block loop from the dense weight (True)
            or the pruned one (False); see step 4 of :class:`ATVPruneSABMethod`.

    Raises:
        ValueError: an option out of range (including sparsity / pattern, see
            :func:`resolve_sparsity`); as ``SABOptions``.
    """

    column_group_bitmap: bool = field(default=True, init=False)
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    zone_bits: int = 1
    compensate_pruning: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("sparsity", resolve_sparsity(self.sparsity, self.pattern)[0])
        zone_bits = self.zone_bits
        if zone_bits not in (1, 2) or isinstance(zone_bits, bool):
            raise ValueError(f"zone_bits must be 1 (pruned/kept) or 2 (pruned/concentrated/sparse), got {zone_bits!r}")
        self._set("compensate_pruning", bool(self.compensate_pruning))


def _zero_fit(order: int, n: int, b: int, device: torch.device) -> ZoneFit:
    """A zone that decodes to exactly 0: row and column scales 0, signs +1."""
    return ZoneFit(
        signs=torch.ones(order, n, b, dtype=torch.float32, device=device),
        row_scales=torch.zeros(order, n, dtype=torch.float32, device=device),
        col_scales=torch.zeros(order, b, dtype=torch.float32, device=device),
    )


class ATVPruneSABMethod(SABMethod):
    """Prune with ATV-Pruning's mask, then binarize the kept weights with SAB-LVLM.

    STBLLM's recipe (arXiv 2408.01803; reference ``run.py``: Wanda-style
    pruning of the model first, then BiLLM-style binarization of the sparse
    weights) with ATV-Pruning's mask (arXiv 2603.16001) and SAB-LVLM's
    binarizer (:class:`~.sab.SABMethod`, arXiv 2607.01876: ARB-RC row/column
    scales, Lambda-weighted fits, 128-column blocks with inter-block Hessian
    compensation). Per layer:

    1. Mask, once, up front (Wanda and STBLLM do the same): ``M =
       prune_mask(|W| sqrt(diag H_pool), sparsity, pattern)`` on the layer's
       weight as it arrives (upstream layers already binarized), with the
       pipeline's pool Hessian (``--token-pool atv``: ATV's pool). The mask is
       *not* recomputed on compensated weights, so the pruned set is exactly
       the ``atv-prune`` set for the same statistics.
    2. SAB's reweighting ``Lambda`` from the pruned weight ``W * M`` (the
       pruned weights are fixed and carry no loss).
    3. One salient-column count ``s`` for the layer (BiLLM's criterion over the
       kept weights only), unless forced.
    4. Block loop (``B`` columns): salient columns = top-``s`` by *kept*
       saliency; zones (format order, ``g`` = zone index):

       * ``zone_bits=1`` (default): non-salient ``g0`` pruned, ``g1`` kept;
         salient (two sign planes) ``g0`` pruned, ``g1`` kept;
       * ``zone_bits=2``: ``g0`` pruned, ``g1``/``g2`` concentrated/sparse
         kept weights by BiLLM's break-point search (order 1 non-salient,
         order 2 salient, as ARB's CGB), ``g3`` empty.

       Pruned (and empty) zones get row and column scales 0, so
       ``compose()`` is exactly ``0`` there (``docs/format.md`` 3.4: ``0 * 0 *
       (+1)``); kept zones get SAB's weighted RC fit
       (:func:`~.binarize.rc_refine`, then fp16 column scales). The block
       error ``(W_blk - Q_blk)``, including the pruned positions, is
       compensated onto later columns. With ``compensate_pruning=True``
       (default) the loop starts from the dense ``W``, so the pruning error
       is compensated as well (SparseGPT-style OBS update with Wanda's fixed
       mask); with False it starts from ``W * M`` (STBLLM's order: only the
       binarization error of the sparse weight is compensated). Compensation
       may move the values at later pruned positions, but they are zoned
       pruned and decode to 0 whatever value they hold.

    Profile choice (measured on two 256 x 512 heavy-tailed test matrices with
    correlated text / visual inputs, 50 % unstructured, ``s`` searched,
    ``compensate_pruning=True``; relative output error
    ``sqrt(tr(E H E^T) / tr(W H W^T))`` against the dense ``W``, bits at
    4096 x 4096):

    ==============================  ===========  ===============
    weights                         true bits    output error
    ==============================  ===========  ===============
    pruning alone (dense fp16)      16           0.097 / 0.092
    sign of ``W * M`` (``sign``)    1.125        0.764 / 0.771
    ``zone_bits=1`` (default)       2.8398       0.466 / 0.450
    ``zone_bits=2``                 4.6133       0.298 / 0.296
    ``sab`` on dense ``W``          2.8398       0.320 / 0.310
    ``sab``, ``s = 32``             3.0273       0.237 / 0.224
    ==============================  ===========  ===============

    ``zone_bits=2`` cuts the error by a third, but its two zone
    planes and 12 fp16 row-scale slots per block cost 1.77 more bits per
    weight, more than a 4-bit GPTQ layer, and ``sab`` reaches a lower error
    with 0.19 extra bits (more salient columns). ``zone_bits=1`` stores
    exactly what ARB-RC / ``sab`` store (2.8398 bits at ``s = 8``), so it is
    the default: the near-1-bit storage class of the project, and a
    like-for-like answer to "does ATV's mask help before binarization?" (on
    the test matrices it does not: the kept weights get one magnitude per
    sign, i.e. a ternary code, where ``sab`` spends the same zone bit on a
    concentrated / sparse split). ``zone_bits=2`` remains an option.
    ``compensate_pruning`` changes the error by < 1 % either way (True is
    lower against ``W``, False against ``W * M``).

    True bits per weight (``vllm_sab.format.true_bits_per_weight``; the zone
    planes are real storage, one bit per plane per weight, and so are the zero
    scales of the pruned zones), 4096 x 4096, ``B = 128``: ``zone_bits=1,
    s=8``: 2.8398 (``paper_weight_bits`` 1.0625, which counts sign planes
    only, pruned positions included); ``zone_bits=1, s=0``: 2.2578;
    ``zone_bits=2, s=8``: 4.6133; ``zone_bits=2, s=0``: 3.5156. Format v1 has
    no sparse encoding, so 50 % sparsity does not shrink the sign planes;
    STBLLM's "0.55 bits" counts neither bitmaps nor scales.

    Options: :class:`ATVPruneSABOptions`.

    Raises:
        ValueError: options out of range (including sparsity / pattern, see
            :func:`resolve_sparsity`), no statistics, shape mismatches.
        FormatError: a bad ``block_size`` or ``K``.
        HessianError: the damped Hessian cannot be factorized.
    """

    name = "atv-prune+sab"
    default_token_pool: ClassVar[str] = "atv"
    dense_output: ClassVar[bool] = False

    Options = ATVPruneSABOptions

    def __init__(self, options: ATVPruneSABOptions | None = None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.last_sparsity: float | None = None
        self._keep: torch.Tensor | None = None

    def _profile(self, salient: int) -> LayerProfile:
        """``zone_bits`` 1 or 2, ``s`` salient columns (zoned), column scales."""
        return LayerProfile(
            block_size=self.block_size, zone_bits=self.zone_bits, salient=salient,
            salient_zoned=salient > 0, col_scale=True,
        )

    def keep_mask(self, weight: torch.Tensor, stats: CalibrationStats) -> torch.Tensor:
        """The layer's keep-mask (bool ``[N, K]``), as :meth:`ATVPruneMethod.keep_mask`."""
        imp = wanda_importance(weight, stats.hessian.to(weight.device))
        return prune_mask(imp, self.sparsity, self.pattern)

    def _fit_block(self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext) -> BlockFit:
        """Zones (pruned first) and fits of one block; see the class docstring, step 4."""
        n, b = w.shape
        keep, profile = ctx.keep[:, ctx.cols], ctx.profile
        omega = self._element_weights(ctx.weight, ctx.stats, ctx.cols)
        sal = salient.unsqueeze(0).expand_as(w)
        pruned = ~keep
        masks: list[torch.Tensor] = []
        orders: list[int] = []
        regions = [(~sal, 1)] + ([(sal, 2)] if profile.salient else [])
        for region, order in regions:
            kept = region & keep
            if self.zone_bits == 1:
                zone_masks = [region & pruned, kept]
            else:
                split = break_point_search(target, kept, order, nonzero=order == 2)
                zone_masks = [region & pruned, split.concentrated, split.sparse, torch.zeros_like(kept)]
            masks += zone_masks
            orders += [order] * len(zone_masks)
        fits = []
        for z, (m, o) in enumerate(zip(masks, orders)):
            if z % profile.num_groups == 0 or not bool(m.any()):
                fits.append(_zero_fit(o, n, b, w.device))  # pruned (g0) or empty zone
            else:
                fit = rc_refine(w, m, o, self.iterations, weight=omega)
                fits.append(rc_round_col_scales(w, m, fit, omega))
        return BlockFit(salient, masks, fits)

    def _keep_mask(self, weight: torch.Tensor, stats: CalibrationStats) -> torch.Tensor:
        """The layer's mask, computed once in :meth:`quantize_blocks` (step 1)."""
        return self._keep

    def _start_weight(self, weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Dense ``W`` (the pruning error is compensated too) or ``W * M`` (STBLLM's order)."""
        if self.compensate_pruning:
            return weight.clone()
        return torch.where(keep, weight, torch.zeros((), device=weight.device))

    def reweighting(self, weight: torch.Tensor, stats: CalibrationStats) -> tuple[torch.Tensor, float]:
        """SAB's ``(Lambda, r)`` of the pruned weight ``W * M``."""
        return super().reweighting(torch.where(self._keep.to(weight.device), weight, torch.zeros((), device=weight.device)), stats)

    def quantize_blocks(self, weight: torch.Tensor, stats: CalibrationStats | None) -> BlockwiseResult:
        """Mask (class docstring, step 1), then SAB-LVLM's block loop over the kept weights.

        Args:
            weight: float ``[N, K]``, K a multiple of ``block_size``; the
                compute device is its device.
            stats: calibration statistics (pool Hessian; text / visual
                Hessians and energy moments as :class:`~.sab.SABMethod` needs).

        Returns:
            :class:`~.blockwise.BlockwiseResult`; ``dense`` equals
            ``compose(components)`` and is exactly 0 wherever the mask prunes.

        Raises:
            ValueError: no statistics, a Hessian of the wrong shape, a
                non-finite weight, ``K % M != 0``.
            FormatError: K is not a multiple of the block size.
            HessianError: the damped Hessian cannot be factorized.
        """
        if stats is None or getattr(stats, "hessian", None) is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics (a Hessian)")
        w_in = weight.to(torch.float32)
        if not bool(torch.isfinite(w_in).all()):
            raise ValueError("weight has NaN/Inf entries")
        self._keep = self.keep_mask(w_in, stats)
        try:
            result = super().quantize_blocks(weight, stats)
        finally:
            keep, self._keep = self._keep, None
        self.last_sparsity = float((~keep).float().mean())
        return result
