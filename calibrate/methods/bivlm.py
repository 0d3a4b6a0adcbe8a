"""``bivlm``: Bi-VLM (Wang et al., AAAI 2026, arXiv 2509.18763) in format v1.

Gaussian-quantile weight groups (one outlier group, three inlier bands), a
per-group binarization with its own scales, and BiLLM's block loop with
inter-block error compensation. Bi-VLM has no public code and only its abstract
was available (``papers.md`` section 3), so every choice below is ours; the
class docstring lists them with the measurements that decided them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from vllm_sab.format import LayerProfile

from .binarize import ZoneFit, arb_refine, arb_x_refine, on_zone_columns, rc_refine, rc_round_col_scales
from .blockwise import BlockContext, BlockFit, BlockwiseMethod, BlockwiseOptions, column_rank

__all__ = [
    "BiVLMMethod",
    "BiVLMOptions",
    "DEFAULT_OUTLIER_MASSES",
    "FITS",
    "GaussianGroups",
    "INLIER_BANDS",
    "OUTLIER_GROUP",
    "SALIENT_SCORES",
    "SCOPES",
    "SIGMA_ESTIMATORS",
    "block_output_loss",
    "gaussian_fit",
    "gaussian_quantile_groups",
    "gaussian_thresholds",
    "group_masses",
    "output_col_scales",
    "output_row_scales",
]

#: Inlier bands of ``|w - mu|`` (groups ``0 .. INLIER_BANDS - 1``, innermost first).
INLIER_BANDS = 3
#: Group index of the outlier (salient) group: the two Gaussian tails.
OUTLIER_GROUP = INLIER_BANDS
#: Groups per weight: format v1 ``zone_bits = 2``.
NUM_GROUPS = INLIER_BANDS + 1

#: Where one Gaussian is fitted: each (row, block) or each whole block.
SCOPES = ("row", "block")
#: How ``sigma`` is estimated: maximum likelihood (moment) or ``1.4826 * MAD``.
SIGMA_ESTIMATORS = ("moment", "robust")
#: Per-group fits (see :class:`BiVLMMethod`).
FITS = ("rc-x", "rc", "mean-x")
#: How salient columns are ranked when ``salient_columns > 0``.
SALIENT_SCORES = ("outlier", "hessian")

#: Default ``outlier_mass``: candidates searched per block (see :class:`BiVLMMethod`).
DEFAULT_OUTLIER_MASSES = (0.01, 0.02, 0.05, 0.1)

#: MAD -> sigma for a Gaussian: ``1 / Phi^-1(3/4)``.
_MAD_TO_SIGMA = 1.482602218505602


# ---------------------------------------------------------------------------------------
# Gaussian-quantile grouping
# ---------------------------------------------------------------------------------------
def group_masses(outlier_mass: float, inlier_bands: int = INLIER_BANDS) -> torch.Tensor:
    """Cumulative two-sided probability masses of the inlier cut points (float64 ``[bands]``).

    Band ``k`` (0-based) holds the weights with ``m_k <= P(|X - mu| < |w - mu|) < m_{k+1}``
    under the fitted Gaussian: equal shares ``(1 - p_out) / bands`` each, and the outlier
    group the remaining two-sided tail mass ``p_out``. So ``m_k = (k + 1)(1 - p_out) / bands``
    and the last cut (``m = 1 - p_out``) is the ``1 - p_out`` two-sided quantile.

    Raises:
        ValueError: ``outlier_mass`` not in ``(0, 1)`` or ``inlier_bands < 1``.
    """
    if not (isinstance(outlier_mass, (int, float)) and 0.0 < float(outlier_mass) < 1.0):
        raise ValueError(f"outlier_mass must be in (0, 1), got {outlier_mass!r}")
    if inlier_bands < 1:
        raise ValueError(f"inlier_bands must be >= 1, got {inlier_bands!r}")
    k = torch.arange(1, inlier_bands + 1, dtype=torch.float64)
    return k * (1.0 - float(outlier_mass)) / inlier_bands


def gaussian_fit(w: torch.Tensor, scope: str = "row", sigma: str = "moment") -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``N(mu, sigma^2)`` to the weights of each row (``scope="row"``) or of the whole block.

    ``sigma="moment"``: maximum likelihood, ``mu = mean``, ``sigma = sqrt(mean((w - mu)^2))``.
    ``sigma="robust"``: ``mu = median``, ``sigma = 1.4826 * median|w - mu|`` (falls back to
    the moment estimate where the MAD is 0, e.g. a mostly-zero row).

    Args:
        w: float ``[N, B]``.

    Returns:
        ``(mu, sigma)``, float32 ``[N]`` (row) or ``[1]`` (block). ``sigma`` is 0 for a
        constant row/block (never NaN).

    Raises:
        ValueError: unknown ``scope`` or ``sigma``.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if sigma not in SIGMA_ESTIMATORS:
        raise ValueError(f"sigma must be one of {SIGMA_ESTIMATORS}, got {sigma!r}")
    x = w.to(torch.float32)
    x = x.reshape(1, -1) if scope == "block" else x
    mean = x.mean(-1)
    std = ((x - mean.unsqueeze(-1)) ** 2).mean(-1).sqrt()
    if sigma == "moment":
        return mean, std
    med = x.median(-1).values
    mad = _MAD_TO_SIGMA * (x - med.unsqueeze(-1)).abs().median(-1).values
    return med, torch.where(mad > 0, mad, std)


def gaussian_thresholds(
    mu: torch.Tensor, sigma: torch.Tensor, masses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian quantile cut points of the bands: ``mu -+ sigma * Phi^-1((1 + m_k) / 2)``.

    ``P(|X - mu| < c) = m`` for ``X ~ N(mu, sigma^2)`` at ``c = sigma * Phi^-1((1 + m) / 2)``,
    so the upper cut point is the ``(1 + m) / 2`` quantile and the lower one the
    ``(1 - m) / 2`` quantile.

    Args:
        mu, sigma: float32 ``[...]``.
        masses: float ``[bands]`` cumulative two-sided masses (:func:`group_masses`).

    Returns:
        ``(lower, upper)``, float32 ``[..., bands]``.
    """
    z = torch.special.ndtri((1.0 + masses.to(torch.float64)) / 2.0).to(device=mu.device, dtype=torch.float32)
    c = sigma.to(torch.float32).unsqueeze(-1) * z
    m = mu.to(torch.float32).unsqueeze(-1)
    return m - c, m + c


@dataclass
class GaussianGroups:
    """Result of :func:`gaussian_quantile_groups`.

    Attributes:
        group: int64 ``[N, B]``: ``0 .. INLIER_BANDS - 1`` inlier bands (innermost
            first), :data:`OUTLIER_GROUP` the tails.
        mu, sigma: float32 ``[N]`` (row scope) or ``[1]`` (block scope), the fitted Gaussian.
        lower, upper: float32 ``[N or 1, INLIER_BANDS]`` the cut points.
    """

    group: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


def gaussian_quantile_groups(
    w: torch.Tensor, outlier_mass: float, scope: str = "row", sigma: str = "moment"
) -> GaussianGroups:
    """Bi-VLM's non-uniform split of weights by Gaussian quantiles.

    Fits ``N(mu, sigma^2)`` (:func:`gaussian_fit`) and puts ``w`` in group
    ``g = #{k : w < lower_k or w > upper_k}``, i.e. band ``k`` between the cut points
    ``k - 1`` and ``k`` of :func:`gaussian_thresholds`, and the outlier group beyond the
    last one. Comparisons are strict, so a constant row (``sigma = 0``, all cut points at
    ``mu``) is all in band 0.

    Args:
        w: float ``[N, B]``.
        outlier_mass: two-sided tail mass ``p_out`` of the outlier group, in ``(0, 1)``.
        scope, sigma: see :func:`gaussian_fit`.

    Returns:
        :class:`GaussianGroups`.
    """
    mu, sd = gaussian_fit(w, scope, sigma)
    lower, upper = gaussian_thresholds(mu, sd, group_masses(outlier_mass))
    x = w.to(torch.float32)
    g = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for k in range(INLIER_BANDS):
        g += ((x < lower[:, k : k + 1]) | (x > upper[:, k : k + 1])).to(torch.int64)
    return GaussianGroups(g, mu, sd, lower, upper)


# ---------------------------------------------------------------------------------------
# Output-aware scale fits (block metric S)
# ---------------------------------------------------------------------------------------
def _dense(masks: list[torch.Tensor], fits: list[ZoneFit]) -> torch.Tensor:
    return sum(f.dense(m) for m, f in zip(masks, fits))


def block_output_loss(w: torch.Tensor, q: torch.Tensor, s_matrix: torch.Tensor) -> float:
    """``Tr((W - Q) S (W - Q)^T)``: the block's output error ``||(W - Q) X||^2`` when ``S = X^T X``."""
    r = (w - q).double()
    return float(((r @ s_matrix.double()) * r).sum())


def _solve_psd(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``gram x = rhs`` (batched, float64); unknowns with a (numerically) zero diagonal get 0."""
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    top = diag.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    dead = diag <= 1e-10 * top
    ridge = torch.where(dead, 1.0, 1e-12 * top)
    rhs = torch.where(dead, torch.zeros_like(rhs), rhs)
    sol = torch.linalg.solve(gram + torch.diag_embed(ridge), rhs.unsqueeze(-1)).squeeze(-1)
    return torch.where(dead, torch.zeros_like(sol), sol)


def output_row_scales(
    w: torch.Tensor, masks: list[torch.Tensor], fits: list[ZoneFit], s_matrix: torch.Tensor
) -> list[ZoneFit]:
    """Exact least squares of every row scale (and mean) of a block under ``Tr(R S R^T)``.

    Signs and column scales fixed. Per row ``i`` the block approximation is
    ``q_i = sum_t alpha_{i,t} d_{i,t}`` with directions ``d_{i,t}`` = zone mask times
    signs times column scales (or the zone mask for a mean), so the minimiser of
    ``(w_i - q_i) S (w_i - q_i)^T`` solves ``(D_i S D_i^T) alpha_i = D_i S w_i^T``
    (``T`` unknowns per row: one ``T x T`` system per row, in float64). A direction that
    is zero in a row (an empty zone) gets 0. The same objective as ARB-X's coordinate
    descent (:func:`~.binarize.arb_x_refine`), solved jointly and exactly, and also for
    row x column (RC) scales.

    Args:
        w: float32 ``[N, B]``; masks: bool ``[N, B]`` per zone (disjoint); fits: per zone.
        s_matrix: float32 ``[B, B]`` symmetric positive definite.

    Returns:
        New fits (signs and column scales shared with the inputs).
    """
    dirs: list[tuple[int, int]] = []  # (zone, plane), plane -1 = mean
    cols = []
    for z, (m, f) in enumerate(zip(masks, fits)):
        mf = m.to(torch.float32)
        if f.mean is not None:
            dirs.append((z, -1))
            cols.append(mf)
        for k in range(f.order):
            a = mf * f.signs[k]
            cols.append(a * f.col_scales[k] if f.col_scales is not None else a)
            dirs.append((z, k))
    d = torch.stack(cols, 1).double()  # [N, T, B]
    ds = d @ s_matrix.double()
    sol = _solve_psd(ds @ d.transpose(1, 2), (ds @ w.double().unsqueeze(-1)).squeeze(-1)).float()
    rows = [f.row_scales.clone() for f in fits]
    means = [f.mean.clone() if f.mean is not None else None for f in fits]
    for t, (z, k) in enumerate(dirs):
        if k < 0:
            means[z] = sol[:, t]
        else:
            rows[z][k] = sol[:, t]
    return [replace(f, row_scales=r, mean=mu) for f, r, mu in zip(fits, rows, means)]


def output_col_scales(
    w: torch.Tensor, masks: list[torch.Tensor], fits: list[ZoneFit], s_matrix: torch.Tensor
) -> list[ZoneFit]:
    """Exact least squares of every column scale of a block under ``Tr(R S R^T)``.

    Signs and row scales fixed; RC fits only. With ``a_{i,(t,j)} = M_t[i,j] B_t[i,j]
    alpha^r_t[i]`` (``[N, T*B]``) the block approximation is ``q_i[j] = sum_t a_{i,(t,j)}
    c_t[j]`` and the normal equations are ``((A^T A) o (1 1^T kron S)) c = sum_i a_i o
    (w_i S)`` (``T*B`` unknowns, one float64 system per block). Column scales of an empty
    (zone, column) get 0.

    Raises:
        ValueError: a fit without column scales.
    """
    if any(f.col_scales is None for f in fits):
        raise ValueError("output_col_scales: every fit needs column scales")
    n, b = w.shape
    idx = [(z, k) for z, f in enumerate(fits) for k in range(f.order)]
    a = torch.stack(
        [masks[z].to(torch.float32) * fits[z].signs[k] * fits[z].row_scales[k].unsqueeze(-1) for z, k in idx], 1
    ).double().reshape(n, -1)
    t = len(idx)
    s = s_matrix.double()
    gram = (a.T @ a) * s.repeat(t, t)
    rhs = (a * (w.double() @ s).repeat(1, t)).sum(0)
    sol = _solve_psd(gram, rhs).float().view(t, b)
    cols = [f.col_scales.clone() for f in fits]
    for i, (z, k) in enumerate(idx):
        cols[z][k] = sol[i]
    return [replace(f, col_scales=c) for f, c in zip(fits, cols)]


# ---------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiVLMOptions(BlockwiseOptions):
    """Options of Bi-VLM (:class:`BiVLMMethod`).

    Attributes:
        block_size, percdamp, max_salient: see :class:`~.blockwise.BlockwiseOptions`.
        salient_columns: ``s``. 0 (default) is option (b) and ``> 0`` is option (a).
            None searches ``s`` in ``1..max_salient`` by BiLLM's criterion (option a).
        outlier_mass: ``p_out`` in ``(0, 1)``, or a non-empty sequence of candidates
            searched per block (default :data:`DEFAULT_OUTLIER_MASSES`).
        scope: ``"row"`` (default) or ``"block"``: where each Gaussian is fitted.
        sigma: ``"moment"`` (default) or ``"robust"``.
        fit: one of :data:`FITS`.
        rounds: row/column alternations of ``"rc-x"`` (>= 0).
        iterations: ARB / ARB-RC rounds per group (15, as in ARB-LLM).
        salient_score: one of :data:`SALIENT_SCORES` (option a only).

    Raises:
        ValueError: an option out of range or unknown.
        FormatError: a bad ``block_size``.
    """

    salient_columns: int | None = 0
    outlier_mass: float | Sequence[float] = DEFAULT_OUTLIER_MASSES
    scope: str = "row"
    sigma: str = "moment"
    fit: str = "rc-x"
    rounds: int = 3
    iterations: int = 15
    salient_score: str = "outlier"

    def __post_init__(self) -> None:
        super().__post_init__()
        outlier_mass, scope, sigma, fit, rounds, iterations, salient_score = (
            self.outlier_mass, self.scope, self.sigma, self.fit, self.rounds, self.iterations, self.salient_score
        )
        masses = (outlier_mass,) if isinstance(outlier_mass, (int, float)) else tuple(outlier_mass)
        if not masses or isinstance(outlier_mass, bool):
            raise ValueError(f"outlier_mass must be a float in (0, 1) or a non-empty sequence, got {outlier_mass!r}")
        for p in masses:
            group_masses(p)  # ValueError if out of range
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if sigma not in SIGMA_ESTIMATORS:
            raise ValueError(f"sigma must be one of {SIGMA_ESTIMATORS}, got {sigma!r}")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if salient_score not in SALIENT_SCORES:
            raise ValueError(f"salient_score must be one of {SALIENT_SCORES}, got {salient_score!r}")
        for name, v in (("rounds", rounds), ("iterations", iterations)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")

    @property
    def outlier_masses(self) -> tuple[float, ...]:
        """The ``outlier_mass`` candidates as a tuple of floats (one entry for a single mass)."""
        m = self.outlier_mass
        return tuple(float(p) for p in ((m,) if isinstance(m, (int, float)) else m))


class BiVLMMethod(BlockwiseMethod):
    """Bi-VLM: Gaussian-quantile groups and saliency-aware hybrid binarization, format v1 ``zone_bits=2``.

    What the abstract gives (arXiv 2509.18763; ``papers.md`` section 3): weights are split
    non-uniformly by Gaussian quantiles into one outlier (salient) subset and several
    inlier subsets, each holding the share of weights of its quantile mass, and a
    "saliency-aware hybrid quantization" puts different constraints on the scaler and
    binary matrices per subset. Everything else is ours. Per block of ``B`` input columns
    of the (compensated) weight:

    1. **Groups** (:func:`gaussian_quantile_groups`). One Gaussian ``N(mu, sigma^2)`` per
       (row, block), maximum-likelihood ``mu``/``sigma``. Three inlier bands of
       ``|w - mu|`` hold equal shares ``(1 - p_out) / 3`` of the Gaussian mass. The
       outlier group is the two tails beyond the ``1 - p_out`` two-sided quantile. The 4
       groups are the 4 values of format v1's 2-bit zone index. Thresholds are never
       stored, only each weight's group.
    2. **Outlier treatment** (the abstract's "salient" subset):

       - **(b), the default:** the outlier group is a zone of its own, with one sign
         plane and its own row and column scales (no salient columns, ``s = 0``).
       - **(a), ``salient_columns = s > 0``:** per block, the ``s`` columns with the
         largest summed saliency ``w^2 / U_jj^2`` over their outlier-group weights
         (``salient_score="outlier"``) become format v1 salient columns: one zone, two
         sign planes (order-2 residual), not split by group. With
         ``salient_score="hessian"`` the sum runs over all weights (BiLLM's rule).
    3. **Per-group binarization** (``fit``):

       - ``"rc-x"`` (default):
         1. ARB-RC per group, ``W_hat = sum_k (alpha^r_k alpha^c_k^T) * B_k`` with
            ``B = sign(w)`` (:func:`~.binarize.rc_refine`, ``iterations`` rounds, fp16
            column scales).
         2. Output-aware scales: exact least squares of all row scales of the block
            under ``Tr((W - W_hat) S (W - W_hat)^T)`` (:func:`output_row_scales`).
         3. ``rounds`` alternations of exact column scales (:func:`output_col_scales`,
            rounded to fp16) and row scales under the same metric, keeping the best.

         ``S = H[blk, blk] + lambda I``, as in ARB-X.
       - ``"rc"``: ARB-RC per group only (no calibration data in the scales; ablation).
       - ``"mean-x"``: ARB per group with a mean (:func:`~.binarize.arb_refine`), then
         ARB-X's calibration-aware means and scales (:func:`~.binarize.arb_x_refine`).
         Stores offsets instead of column scales (+0.48 bits).

       The "hybrid" constraints, in format v1 terms: every group (the three bands and the
       outlier tails) has one sign plane and its own row x column scales, so each scale
       follows its own group's magnitudes; the outlier group's scales are fitted on its
       few weights only. Salient columns (option a) get two planes.
    4. **Compensation**: BiLLM's inter-block GPTQ update over blocks of ``B`` (128)
       columns, through :class:`~.blockwise.BlockwiseMethod`, on exactly ``compose()``
       of the stored fp16 components.

    ``outlier_mass`` (``p_out``) is a float, or a sequence of candidates searched per
    block. The search keeps the candidate with the smallest block output error
    ``Tr(R S R^T)``. The group index is stored per weight, so the search costs no
    storage, only calibration time (x the number of candidates).

    **Measurements that decided the defaults.** Relative output error
    ``||(W - W_hat) X|| / ||W X||`` on held-out tokens, 128 x 512 Student-t weights,
    correlated inputs (low rank plus noise, loud columns), 1024 calibration tokens,
    mean of 3 seeds; ``df`` = degrees of freedom (3 = heavy tails):

    - **Scope, per (row, block):** 0.0955 vs 0.0983 per block (``df = 3``,
      ``p_out = 0.01``). Row scales are per (row, block), so this gives every row every
      group at its own scale. Per block, rows with small weights fall wholly into the
      inner bands.
    - **Moment ``sigma``:** 0.0955 vs 0.1319 for the MAD (``df = 3``, ``p_out = 0.01``). On heavy tails the MAD puts
      many more weights into the outlier group, which one scale fits badly.
    - **``outlier_mass``:**
      - Fixed ``p_out`` at ``df = 3``: 0.005 / 0.01 / 0.02 / 0.05 give
        0.0992 / **0.0955** / 0.0991 / 0.1057.
      - The best fixed value moves with the tails: 0.05 at ``df = 6`` (0.0917,
        against 0.1026 at 0.01); 0.1 at ``df = 30`` (0.0848, against 0.1066).
      - The per-block search over :data:`DEFAULT_OUTLIER_MASSES` gives 0.0959 / 0.0914 /
        0.0829 at ``df`` 3 / 6 / 30: within 0.4 % of the best fixed value on heavy
        tails and better elsewhere. That is why it is the default.
    - **Option (b) rather than (a)** (``df = 3``, ``p_out = 0.01``):
      - (a) at ``s = 8`` gives 0.0887 at 3.840 bits; (b) gives 0.0955 at 3.516 bits.
        That is 7 % less error for 9 % more storage, short of the ~20 % that 0.32 bits
        buy at 6 dB per bit.
      - With ``fit="rc"`` (a) gains nothing: 0.1331 vs 0.1327.
      - Reason: in format v1 an unzoned salient column is a 4-level (2-plane)
        quantizer, while the four groups already give each weight 8 levels.
      - ``salient_score``: "outlier" 0.0887 vs "hessian" 0.0910.
    - **``fit="rc-x"``** (``df = 3``, ``p_out = 0.01``):
      - 0.0955 vs 0.1327 (``"rc"``) and 0.1129 (row scales only, ``rounds=0``), all
        at 3.516 bits.
      - ``"mean-x"``: 0.0905, but at 4.000 bits.
      - Using the Schur complement ``(U_bb^T U_bb)^-1`` as ``S`` (it accounts for the
        later columns' compensation) measured slightly worse: 0.0971 vs 0.0950 on the
        calibration tokens.
    - **Against ARB-RC (with CGB) at equal true bits** (its ``s = 96``, 3.527 bits):
      - plain ARB-RC: 0.1492 / 0.1563 / 0.1577 at ``df`` 3 / 6 / 30;
      - ARB-RC with the same output-aware scales: 0.1008 / 0.1096 / 0.1124;
      - Bi-VLM (default): 0.0959 / 0.0914 / 0.0829.

      So the Gaussian groups are worth 5-26 % over ARB's zones at equal bits and equal
      scale fit, and the output-aware scales most of the rest. For reference, 2-bit
      GPTQ (``uniform2``, 2.375 bits) gives 0.1394 at ``df = 3``.

    **Storage** (4096 x 4096, ``B = 128``): ``LayerProfile(B, zone_bits=2, salient=s,
    col_scale=True)``.

    - ``s = 0``: 3.516 true bits/weight (1 sign bit, 2 zone bits, 4 fp16 row scales per
      128 weights, column scales).
    - ``1 <= s <= 8``: 3.840 true bits/weight.
    - ``"mean-x"`` (``offset=True`` instead of column scales): 4.000 at ``s = 0``.

    The papers' convention (:func:`vllm_sab.format.paper_weight_bits`, sign planes only)
    says 1.0 at ``s = 0`` and ``1 + s / B`` otherwise. It counts neither the 2-bit group
    index nor the scales.

    Options: :class:`BiVLMOptions`.

    Raises:
        ValueError: an option out of range or unknown.
    """

    name = "bivlm"
    Options = BiVLMOptions

    def __init__(self, options: BiVLMOptions | None = None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.outlier_masses = self.options.outlier_masses
        #: Per block, the chosen outlier mass of the last layer (diagnostics).
        self.chosen_masses: list[float] = []

    def _profile(self, salient: int) -> LayerProfile:
        """``zone_bits=2, salient=s``; column scales (``rc``, ``rc-x``) or offsets (``mean-x``)."""
        rc = self.fit != "mean-x"
        return LayerProfile(block_size=self.block_size, zone_bits=2, salient=salient, col_scale=rc, offset=not rc)

    def _s_matrix(self, ctx: BlockContext) -> torch.Tensor:
        h = ctx.hessian[ctx.cols, ctx.cols]
        return h + ctx.damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def _zones(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, groups: torch.Tensor, s: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """``(salient columns, zone masks, orders)`` in format order."""
        if s and self.salient_score == "outlier":
            salient = column_rank((target * (groups == OUTLIER_GROUP)).sum(0)) < s
        sal = salient.unsqueeze(0).expand_as(w)
        masks = [(groups == g) & ~sal for g in range(NUM_GROUPS)]
        orders = [1] * NUM_GROUPS
        if s:
            masks.append(sal.clone())
            orders.append(2)
        return salient, masks, orders

    def _fit_zones(
        self, w: torch.Tensor, masks: list[torch.Tensor], orders: list[int], s_matrix: torch.Tensor
    ) -> list[ZoneFit]:
        if self.fit == "mean-x":
            fits = [on_zone_columns(lambda x, mk, _, o=o: arb_refine(x, mk, o, self.iterations), w, m)
                    for m, o in zip(masks, orders)]
            return arb_x_refine(w, masks, fits, s_matrix, self.iterations)
        fits = [on_zone_columns(lambda x, mk, _, o=o: rc_round_col_scales(x, mk, rc_refine(x, mk, o, self.iterations)), w, m)
                for m, o in zip(masks, orders)]
        if self.fit == "rc":
            return fits
        fits = output_row_scales(w, masks, fits, s_matrix)
        best, best_loss = fits, block_output_loss(w, _dense(masks, fits), s_matrix)
        for _ in range(self.rounds):
            fits = output_col_scales(w, masks, fits, s_matrix)
            fits = [rc_round_col_scales(w, m, f) for m, f in zip(masks, fits)]
            fits = output_row_scales(w, masks, fits, s_matrix)
            loss = block_output_loss(w, _dense(masks, fits), s_matrix)
            if loss < best_loss:
                best, best_loss = fits, loss
        return best

    def _fit_block(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> BlockFit:
        """Groups, (salient columns,) per-group fits; the outlier mass searched if several."""
        if ctx.index == 0:
            self.chosen_masses = []
        s_matrix = self._s_matrix(ctx)
        best = None
        for p in self.outlier_masses:
            groups = gaussian_quantile_groups(w, p, self.scope, self.sigma).group
            sal, masks, orders = self._zones(w, target, salient, groups, ctx.profile.salient)
            fits = self._fit_zones(w, masks, orders, s_matrix)
            loss = block_output_loss(w, _dense(masks, fits), s_matrix) if len(self.outlier_masses) > 1 else 0.0
            if best is None or loss < best[0]:
                best = (loss, p, BlockFit(sal, masks, fits))
        self.chosen_masses.append(best[1])
        return best[2]
