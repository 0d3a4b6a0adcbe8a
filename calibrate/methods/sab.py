"""``sab``: SAB-LVLM, significance-aware binarization for vision-language models."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .arb import ARBRCMethod, RCOptions
from .base import CalibrationStats
from .blockwise import BlockwiseResult
from .significance import (
    column_hoyer_sparsity,
    hoyer_sparsity,
    modality_partition,
    modality_sensitivity,
    reweighting_map,
    uni_mass_ratio,
)

__all__ = ["SABMethod", "SABOptions", "SIGNIFICANCE_VARIANTS", "COMPENSATION_VARIANTS"]

#: What the "per-sample significance" behind the Hoyer sparsity is.
SIGNIFICANCE_VARIANTS = ("energy", "modality")
#: Which Hessian drives saliency and block error compensation.
COMPENSATION_VARIANTS = ("pool", "text", "balanced")

# Lower bound of the loss weights: a weight of exactly 0 would leave a
# column's scale undetermined.
_MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class SABOptions(RCOptions):
    """Options of SAB-LVLM (and of ``atv-prune+sab``, which refines them).

    Attributes:
        block_size, percdamp, salient_columns, max_salient, iterations,
            column_group_bitmap, scale_dtype: see :class:`~.arb.RCOptions`.
        salient_top_p: fraction of weights salient per modality (in (0, 1]; 0.05).
        diff_quantile: partition threshold quantile (in [0, 1]; 0.5).
        significance: one of :data:`SIGNIFICANCE_VARIANTS`.
        compensation: one of :data:`COMPENSATION_VARIANTS`.
        weight_power: ``omega = Lambda ** weight_power`` (> 0; 2: the squared
            Frobenius loss of the figure; 1: Lambda used directly).

    Raises:
        ValueError: an option out of range or unknown; as ``RCOptions``.
    """

    salient_top_p: float = 0.05
    diff_quantile: float = 0.5
    significance: str = "energy"
    compensation: str = "pool"
    weight_power: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.significance not in SIGNIFICANCE_VARIANTS:
            raise ValueError(f"significance must be one of {SIGNIFICANCE_VARIANTS}, got {self.significance!r}")
        if self.compensation not in COMPENSATION_VARIANTS:
            raise ValueError(f"compensation must be one of {COMPENSATION_VARIANTS}, got {self.compensation!r}")
        if not 0 < self.salient_top_p <= 1 or not 0 <= self.diff_quantile <= 1 or not self.weight_power > 0:
            raise ValueError("salient_top_p must be in (0, 1], diff_quantile in [0, 1], weight_power > 0")


class SABMethod(ARBRCMethod):
    """SAB-LVLM (arXiv 2607.01876): ARB-RC + column-group bitmap with a significance-weighted loss.

    Per layer, from the calibration statistics:

    1. Modality sensitivities ``S_text = w^2 / [U_text]_jj^2`` and ``S_vis``
       likewise from the visual-token Hessian (BiLLM's OBS saliency per modality).
    2. Partition (:func:`~.significance.modality_partition`): top
       ``salient_top_p`` per modality; text-only / vision-only (unimodal),
       cross-modal, none. ``r = sum(S[uni]) / sum(S)``, ``S = S_text + S_vis``.
    3. Hoyer sparsity ``rho`` of each weight's per-sample significance
       (``significance``):

       - ``"energy"`` (default): ``h_ij(z) = w_ij^2 e_z[j]`` over the
         calibration samples ``z``, ``e_z[j]`` = mean squared input of column
         ``j`` in sample ``z`` (running sums, :func:`~.significance.column_hoyer_sparsity`);
       - ``"modality"``: the two-entry vector of the weight's normalised text
         and visual sensitivities (1 = one modality only, 0 = balanced).

    4. ``Lambda = r rho + (1 - r)(1 - rho)`` (method figure), and the loss
       ``||Lambda * (W - W_hat)||_F^2`` with ``W_hat = alpha_r alpha_c^T * B``:
       ARB-RC's alternating row/column updates with weights
       ``omega = Lambda^weight_power`` (15 iterations), on every zone of the
       bitmap (and both planes of the salient zones).
    5. Block error compensation (128 columns, between blocks) with the Hessian
       chosen by ``compensation``: ``"pool"`` (the pipeline's token pool,
       default), ``"text"`` (text tokens only, what the released code does
       with its C4 stream), or ``"balanced"`` (``(H_text + H_vis) / 2``: each
       modality weighs the same whatever its token count).

    Without visual tokens (text-only data, or vision-side linears) there is no
    partition: ``r = 0`` and ``Lambda = 1 - rho``; ``"modality"`` then gives
    ``rho = 0`` (``Lambda = 1``, plain ARB-RC). ``docs/methods.md`` records the
    variants measured and why the defaults are what they are.

    Storage is ARB-RC's (``zone_bits 1``, ``s`` salient columns, column scales).

    Options: :class:`SABOptions`.

    Raises:
        ValueError: an option out of range or unknown; statistics without the
            moments a variant needs.
    """

    name = "sab"
    Options = SABOptions

    def __init__(self, options: SABOptions | None = None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self._omega: torch.Tensor | None = None
        self.last_r: float | None = None

    def reweighting(self, weight: torch.Tensor, stats: CalibrationStats) -> tuple[torch.Tensor, float]:
        """``(Lambda float32 [N, K] in [0, 1], r)`` of one layer (steps 1-4 of the class docstring)."""
        w = weight.float()
        have_both = stats.hessian_text is not None and stats.hessian_visual is not None
        r = 0.0
        s_t = s_v = None
        if have_both:
            s_t = modality_sensitivity(w, stats.hessian_text.to(w.device), self.percdamp, "text Hessian")
            s_v = modality_sensitivity(w, stats.hessian_visual.to(w.device), self.percdamp, "visual Hessian")
            part = modality_partition(s_t, s_v, self.salient_top_p, self.diff_quantile)
            r = uni_mass_ratio(s_t, s_v, part)
        if self.significance == "energy":
            if stats.sample_energy_sum is None or stats.sample_energy_sq is None:
                raise ValueError("significance='energy' needs the per-sample energy moments in the statistics")
            rho = column_hoyer_sparsity(stats.sample_energy_sum, stats.sample_energy_sq, stats.n_samples)
            rho = rho.to(w.device)[None, :].expand_as(w)
        elif have_both:
            pair = torch.stack([s_t / s_t.sum().clamp_min(1e-30), s_v / s_v.sum().clamp_min(1e-30)], dim=-1)
            rho = hoyer_sparsity(pair, dim=-1)
        else:
            rho = torch.zeros_like(w)
        return reweighting_map(r, rho), r

    def _compensation_stats(self, stats: CalibrationStats) -> CalibrationStats:
        if self.compensation == "pool":
            return stats
        if self.compensation == "text":
            if stats.hessian_text is None:
                raise ValueError("compensation='text' needs text tokens in the calibration data")
            return replace(stats, hessian=stats.hessian_text, n_tokens=stats.n_text)
        if stats.hessian_text is None or stats.hessian_visual is None:
            return stats  # one modality only: balanced = that modality = the pool
        return replace(stats, hessian=0.5 * (stats.hessian_text + stats.hessian_visual))

    def quantize_blocks(self, weight: torch.Tensor, stats: CalibrationStats | None) -> BlockwiseResult:
        """Compute ``Lambda`` for the layer, then ARB-RC's block loop with ``omega = Lambda^p``."""
        if stats is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics")
        lam, self.last_r = self.reweighting(weight, stats)
        self._omega = (lam.clamp_min(_MIN_WEIGHT) ** self.weight_power).float()
        try:
            return super().quantize_blocks(weight, self._compensation_stats(stats))
        finally:
            self._omega = None

    def _element_weights(self, weight: torch.Tensor, stats: CalibrationStats, cols: slice) -> torch.Tensor | None:
        """``Lambda[:, cols] ** weight_power`` of the current layer."""
        if self._omega is None:
            return None
        return self._omega[:, cols].to(weight.device)
