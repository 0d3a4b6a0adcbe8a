"""SAB-LVLM's significance map: modality sensitivities, partition, Hoyer sparsity, reweighting map.

Source: SAB-LVLM (arXiv 2607.01876), method figure ("spatial significance
map", "modality-guided significance integration") and the released
``run.py`` (``modality_structural_partition``, ``--adaptive_omega``). The
released code lacks the functions' bodies, so the partition below is our
reading of its arguments (``salient_top_p``, ``diff_quantile``); see
``docs/methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hessian import inverse_cholesky_upper

__all__ = [
    "ModalityPartition",
    "column_hoyer_sparsity",
    "hoyer_sparsity",
    "modality_partition",
    "modality_sensitivity",
    "reweighting_map",
    "uni_mass_ratio",
]


def modality_sensitivity(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, where: str = "layer") -> torch.Tensor:
    """OBS/BiLLM sensitivity of every weight under one modality's Hessian: ``S_ij = w_ij^2 / U_jj^2``.

    ``U`` is the upper Cholesky factor of ``(H + lambda I)^-1`` (BiLLM arXiv
    2402.04291 eq. 3 as implemented; SAB-LVLM computes it separately from text
    and from visual tokens, ``S_text`` and ``S_vis``).

    Args:
        weight: float32 ``[N, K]``.
        hessian: float32 ``[K, K]`` of that modality's tokens.
        percdamp: relative damping.
        where: name for errors.

    Returns:
        float32 ``[N, K]``, non-negative.

    Raises:
        HessianError: see :func:`inverse_cholesky_upper`.
    """
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    u = inverse_cholesky_upper(h, percdamp, where)
    s = weight.float() ** 2 / torch.diag(u)[None, :] ** 2
    s[:, dead] = 0.0
    return s


@dataclass
class ModalityPartition:
    """Masks of :func:`modality_partition` (bool ``[N, K]`` each; they partition the weights).

    Attributes:
        text_only: salient for text, not for vision (or much more for text).
        vision_only: salient for vision, not for text (or much more for vision).
        cross: salient for both with comparable normalized sensitivity.
        none: salient for neither.
    """

    text_only: torch.Tensor
    vision_only: torch.Tensor
    cross: torch.Tensor
    none: torch.Tensor

    @property
    def unimodal(self) -> torch.Tensor:
        """``text_only | vision_only``."""
        return self.text_only | self.vision_only


def _top_mask(s: torch.Tensor, top_p: float) -> torch.Tensor:
    k = max(1, math.ceil(top_p * s.numel()))
    thresh = s.flatten().kthvalue(s.numel() - k + 1).values
    return s >= thresh


def modality_partition(
    s_text: torch.Tensor, s_vis: torch.Tensor, salient_top_p: float = 0.05, diff_quantile: float = 0.5
) -> ModalityPartition:
    """Split weights by which modality finds them salient (SAB-LVLM ``modality_structural_partition``).

    Each modality's salient set is its top ``salient_top_p`` fraction by
    sensitivity. Sensitivities are normalised to unit sum per modality so the
    two are comparable; ``d = S_text/sum(S_text) - S_vis/sum(S_vis)``.
    A weight salient in exactly one modality is unimodal for it. A weight
    salient in both is cross-modal, unless ``|d|`` exceeds the
    ``diff_quantile`` quantile of ``|d|`` over the salient-in-both weights,
    in which case it is unimodal for the modality with the larger share.

    Args:
        s_text: float ``[N, K]`` text sensitivities (>= 0).
        s_vis: float ``[N, K]`` visual sensitivities (>= 0).
        salient_top_p: fraction of weights salient per modality (0.05 in the released flags).
        diff_quantile: quantile of ``|d|`` above which a doubly salient weight is unimodal (0.5).

    Returns:
        :class:`ModalityPartition`.

    Raises:
        ValueError: shapes differ, or a fraction outside (0, 1].
    """
    if s_text.shape != s_vis.shape:
        raise ValueError(f"S_text {tuple(s_text.shape)} and S_vis {tuple(s_vis.shape)} differ in shape")
    if not 0 < salient_top_p <= 1 or not 0 <= diff_quantile <= 1:
        raise ValueError(f"salient_top_p must be in (0, 1] and diff_quantile in [0, 1], got {salient_top_p}, {diff_quantile}")
    st = s_text.float() / s_text.float().sum().clamp_min(1e-30)
    sv = s_vis.float() / s_vis.float().sum().clamp_min(1e-30)
    sal_t, sal_v = _top_mask(st, salient_top_p), _top_mask(sv, salient_top_p)
    both = sal_t & sal_v
    d = st - sv
    far = torch.zeros_like(both)
    if bool(both.any()):
        thresh = d[both].abs().quantile(diff_quantile)
        far = both & (d.abs() > thresh)
    text_only = (sal_t & ~sal_v) | (far & (d > 0))
    vision_only = (sal_v & ~sal_t) | (far & (d < 0))
    cross = both & ~far
    none = ~(sal_t | sal_v)
    return ModalityPartition(text_only, vision_only, cross, none)


def uni_mass_ratio(s_text: torch.Tensor, s_vis: torch.Tensor, partition: ModalityPartition) -> float:
    """``r = sum(S[uni]) / sum(S)`` with ``S = S_text + S_vis`` (SAB-LVLM ``--adaptive_omega``), in [0, 1]."""
    s = s_text.float() + s_vis.float()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    return float(s[partition.unimodal].sum()) / total


def hoyer_sparsity(h: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Hoyer sparsity ``(sqrt(z) - ||h||_1 / ||h||_2) / (sqrt(z) - 1)`` along ``dim`` (z = its length).

    1 for a one-hot vector, 0 for a constant one (SAB-LVLM method figure;
    Hoyer, JMLR 2004). An all-zero vector gets 0 (no concentration); ``z = 1`` gives 0.

    Args:
        h: float tensor, non-negative entries.
        dim: the sample dimension.

    Returns:
        float32, ``h`` without ``dim``, values in [0, 1].
    """
    z = h.shape[dim]
    if z < 2:
        return torch.zeros(h.sum(dim).shape, dtype=torch.float32, device=h.device)
    h = h.float().abs()
    l1, l2 = h.sum(dim), h.norm(dim=dim)
    return _hoyer_from_norms(l1, l2, z)


def _hoyer_from_norms(l1: torch.Tensor, l2: torch.Tensor, z: int) -> torch.Tensor:
    root = math.sqrt(z)
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-30), torch.full_like(l1, root))
    return ((root - ratio) / (root - 1)).clamp(0.0, 1.0)


def column_hoyer_sparsity(energy_sum: torch.Tensor, energy_sq: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Hoyer sparsity of each weight's per-sample significance ``h_ij(z) = w_ij^2 e_z[j]``, from running sums.

    ``||h_ij||_1 = w_ij^2 sum_z e_z[j]`` and ``||h_ij||_2 = w_ij^2 sqrt(sum_z e_z[j]^2)``;
    ``w_ij^2`` cancels, so the sparsity depends on the column only and needs
    no per-sample tensor (``CalibrationStats.sample_energy_sum/_sq``).

    Args:
        energy_sum: float ``[K]`` ``sum_z e_z``.
        energy_sq: float ``[K]`` ``sum_z e_z^2``.
        n_samples: ``z``.

    Returns:
        float32 ``[K]`` in [0, 1].
    """
    if n_samples < 2:
        return torch.zeros_like(energy_sum, dtype=torch.float32)
    return _hoyer_from_norms(energy_sum.float(), energy_sq.float().clamp_min(0).sqrt(), n_samples)


def reweighting_map(r: float, rho: torch.Tensor) -> torch.Tensor:
    """SAB-LVLM's ``Lambda = r * rho + (1 - r) * (1 - rho)``, in [0, 1] for r, rho in [0, 1].

    Raises:
        ValueError: ``r`` outside [0, 1].
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1], got {r}")
    return r * rho + (1.0 - r) * (1.0 - rho)
