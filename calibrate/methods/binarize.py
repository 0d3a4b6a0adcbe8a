"""Per-zone binarization primitives of the BiLLM / ARB-LLM / SAB-LVLM family.

A *zone* is a set of weights of one block (a boolean mask over ``[..., B]``,
usually ``[N, B]``: rows x in-block columns) that shares its scales. Every
function here fits one zone, row by row along the last dimension, and returns
a :class:`ZoneFit`:

* :func:`residual_binarize`: BiLLM's residual binarization with a mean per
  order (arXiv 2402.04291 eq. 6-8 and the reference ``high_order_residual``).
* :func:`arb_refine`: ARB's alternating refinement of mean, scales and signs
  (ARB-LLM, arXiv 2410.03129 eq. 1-5 and Alg. 1; second order as in its
  reference ``high_order_residual_alternating_mean``).
* :func:`arb_x_refine`: ARB-X's calibration-aware refinement of means and
  scales of all zones of a block under ``Tr((W - W_hat) S (W - W_hat)^T)``.
* :func:`rc_refine`, :func:`rc_row_update`, :func:`rc_col_update`: ARB-RC's
  row/column scales without mean (arXiv 2410.03129 eq. 12-13), with an optional
  per-element weight ``omega`` (SAB-LVLM's reweighted loss, arXiv 2607.01876,
  papers.md section 1.4), and :func:`rc_round_col_scales` to store them in fp16.

Conventions: signs are float32 +-1 with ``sign(0) = +1`` (the stored bit must
be one of the two; BiLLM's ``torch.sign`` gives 0 there, which cannot be
stored) and are +1 outside the mask. All reductions skip masked-out entries;
an empty row of a zone gets mean 0 and scale 0 (never NaN). Everything is
deterministic and runs on the device of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

__all__ = [
    "FP16_MAX",
    "FP8_E4M3_MAX",
    "ZoneFit",
    "arb_refine",
    "arb_x_refine",
    "linear_quantiles",
    "masked_sse",
    "on_zone_columns",
    "rc_col_update",
    "rc_refine",
    "rc_round_col_scales",
    "rc_round_row_scales_fp8",
    "rc_row_update",
    "residual_binarize",
    "sign_pm1",
    "to_fp16",
    "to_scale_dtype",
]

#: Largest finite float16; stored scales are clamped to it.
FP16_MAX = 65504.0
#: Largest float8 e4m3fn value.
FP8_E4M3_MAX = 448.0
#: Largest |row scale| of a plane after the float8 normalization: inside e4m3's range with
#: room for rounding up, and 2^14 above its smallest normal (2^-6).
FP8_ROW_TARGET = 240.0


@dataclass
class ZoneFit:
    """Fitted parameters of one zone (all float32).

    The zone's approximation (:meth:`dense`) is, at masked positions,
    ``sum_k row_scales[k] * col_scales[k] * signs[k] + mean``.

    Attributes:
        signs: ``[order, ..., B]`` +-1 sign planes (+1 outside the mask).
        row_scales: ``[order, ...]`` per-row scales ``alpha`` (``alpha^r`` in RC).
        mean: ``[...]`` per-row offset (the sum of the means of all planes), or
            None (RC has no mean).
        col_scales: ``[order, B]`` per-column scales ``alpha^c`` (RC), or None.
    """

    signs: torch.Tensor
    row_scales: torch.Tensor
    mean: torch.Tensor | None = None
    col_scales: torch.Tensor | None = None

    @property
    def order(self) -> int:
        """Number of sign planes."""
        return self.signs.shape[0]

    def plane(self, k: int) -> torch.Tensor:
        """Plane ``k`` without mean: float32 ``[..., B]`` (unmasked)."""
        a = self.row_scales[k].unsqueeze(-1)
        if self.col_scales is not None:
            a = a * self.col_scales[k]
        return a * self.signs[k]

    def dense(self, mask: torch.Tensor) -> torch.Tensor:
        """The zone's approximation, float32 ``[..., B]``, zero outside ``mask``."""
        q = sum(self.plane(k) for k in range(self.order))
        if self.mean is not None:
            q = q + self.mean.unsqueeze(-1)
        return torch.where(mask, q, torch.zeros((), dtype=q.dtype, device=q.device))


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """float32 +-1 sign of ``x`` with ``sign(0) = +1`` (same shape as ``x``)."""
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def to_scale_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round row scales to their storage dtype: :func:`to_fp16`, or float8 e4m3 after
    clamping to +-:data:`FP8_E4M3_MAX` (e4m3fn has no Inf: an overflow would be NaN)."""
    if dtype == torch.float16:
        return to_fp16(x)
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 after clamping to +-:data:`FP16_MAX` (no Inf from a large scale)."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (an empty zone gets 0, never NaN)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _masked_mean(x: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Row mean of ``x`` over float mask ``m`` with counts ``n`` (0 for an empty row)."""
    return _safe_div((x * m).sum(-1), n)


def masked_sse(
    x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Scalar ``sum(weight * mask * (x - q)^2)`` over ``[..., B]`` tensors (``weight`` None = ones)."""
    e = mask.to(torch.float32) if weight is None else mask.to(torch.float32) * weight
    return (e * (x - q) ** 2).sum()


def linear_quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles with linear interpolation (numpy's default ``method="linear"``).

    ``torch.quantile`` refuses inputs above 2**24 elements, which a fused MLP
    block exceeds, so this sorts once and interpolates.

    Args:
        values: any-shape float tensor (flattened); must not be empty.
        q: float ``[C]`` probabilities in ``[0, 1]``.

    Returns:
        float32 ``[C]`` on ``values.device``.

    Raises:
        ValueError: ``values`` is empty.
    """
    v = values.reshape(-1).to(torch.float32)
    if v.numel() == 0:
        raise ValueError("linear_quantiles: no values")
    v = v.sort().values
    pos = q.to(torch.float64).to(v.device) * (v.numel() - 1)
    lo = pos.floor().long().clamp(0, v.numel() - 1)
    hi = (lo + 1).clamp(max=v.numel() - 1)
    frac = (pos - lo.to(torch.float64)).to(torch.float32)
    return v[lo] + (v[hi] - v[lo]) * frac


def on_zone_columns(
    fit_zone: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], ZoneFit],
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> ZoneFit:
    """Fit one zone on the columns it touches only, and widen the fit back to the block.

    Every per-zone fit here (residual, ARB, RC) sums over the zone's entries only and
    gives a column with no zone entry a column scale of 0 and signs of +1, so running
    it on those columns and widening gives the same fit (up to summation order) at a
    fraction of the cost for a salient zone (``s`` of ``B`` columns).

    Args:
        fit_zone: ``(x, mask, weight) -> ZoneFit`` on ``[N, B']`` tensors.
        x: float32 ``[N, B]``; mask: bool ``[N, B]``; weight: float32 ``[N, B]`` or None.

    Returns:
        :class:`ZoneFit` over all ``B`` columns (signs +1 and column scales 0 elsewhere).
    """
    cols = mask.any(0)
    if bool(cols.all()):
        return fit_zone(x, mask, weight)
    idx = cols.nonzero().squeeze(1)
    fit = fit_zone(x[:, idx], mask[:, idx], None if weight is None else weight[:, idx])
    signs = torch.ones((*fit.signs.shape[:-1], x.shape[-1]), dtype=fit.signs.dtype, device=x.device)
    signs[..., idx] = fit.signs
    col_scales = None
    if fit.col_scales is not None:
        col_scales = torch.zeros((fit.col_scales.shape[0], x.shape[-1]), dtype=fit.col_scales.dtype, device=x.device)
        col_scales[:, idx] = fit.col_scales
    return replace(fit, signs=signs, col_scales=col_scales)


# ---------------------------------------------------------------------------------------
# BiLLM residual binarization
# ---------------------------------------------------------------------------------------
def residual_binarize(x: torch.Tensor, mask: torch.Tensor, order: int) -> ZoneFit:
    """BiLLM's order-``order`` residual binarization of one zone, per row.

    For ``k = 1..order`` on the residual ``r`` (initially ``x``), over the
    masked entries of each row: ``mu_k = mean(r)``, ``alpha_k = mean|r - mu_k|``,
    ``B_k = sign(r - mu_k)``, ``r -= alpha_k B_k + mu_k``. The approximation is
    ``sum_k alpha_k B_k + mu`` with ``mu = sum_k mu_k``.

    Source: BiLLM (arXiv 2402.04291) eq. 6-8 (residual approximation) and the
    reference ``binary.high_order_residual`` (which also subtracts a mean per
    order; papers.md section 4.1 step 4).

    Args:
        x: float32 ``[..., B]``.
        mask: bool, broadcastable to ``x`` (or ``x`` broadcastable to it, e.g.
            ``x [N, B]`` with a stack of candidate masks ``[C, N, B]``).
        order: number of planes, >= 1.

    Returns:
        :class:`ZoneFit` with ``mean`` and no column scales; shapes follow the
        broadcast of ``x`` and ``mask``.

    Raises:
        ValueError: ``order < 1``.
    """
    signs, scales, mean, _ = _residual_rounds(x, mask, order)
    return ZoneFit(signs=torch.stack(signs), row_scales=torch.stack(scales), mean=mean)


def _residual_rounds(x: torch.Tensor, mask: torch.Tensor, order: int):
    """The rounds of :func:`residual_binarize`: ``(signs, scales, mean, r)``, ``r`` the
    final residual (zero outside the mask)."""
    if order < 1:
        raise ValueError(f"residual_binarize: order must be >= 1, got {order}")
    shape = torch.broadcast_shapes(x.shape, mask.shape)
    m = mask.expand(shape).to(torch.float32)
    r = x.expand(shape).to(torch.float32) * m
    n = m.sum(-1)
    signs, scales = [], []
    mean = torch.zeros(shape[:-1], dtype=torch.float32, device=x.device)
    for _ in range(order):
        mu = _masked_mean(r, m, n)
        d = r - mu.unsqueeze(-1)
        alpha = _masked_mean(d.abs(), m, n)
        b = torch.where(m > 0, sign_pm1(d), 1.0)
        r = (r - (alpha.unsqueeze(-1) * b + mu.unsqueeze(-1))) * m
        signs.append(b)
        scales.append(alpha)
        mean = mean + mu
    return signs, scales, mean, r


# ---------------------------------------------------------------------------------------
# ARB: alternating refined binarization (with mean)
# ---------------------------------------------------------------------------------------
def _best_pair(target: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, the signs ``(b0, b1)`` minimising ``|target - (b0 c0 + b1 c1)|``.

    Candidates in the order ``(-,-), (-,+), (+,-), (+,+)``; ties go to the first.
    ``c0``/``c1`` broadcast against ``target``. Elementwise (no argmin over a
    stacked dimension, which is slow on CPU).
    """
    best = (target + c0 + c1).abs()
    b0 = torch.full_like(best, -1.0)
    b1 = torch.full_like(best, -1.0)
    for s0, s1 in ((-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)):
        err = (target - s0 * c0 - s1 * c1).abs()
        better = err < best
        best = torch.where(better, err, best)
        b0 = torch.where(better, s0, b0)
        b1 = torch.where(better, s1, b1)
    return b0, b1


def arb_refine(
    x: torch.Tensor,
    mask: torch.Tensor,
    order: int,
    iterations: int = 15,
    *,
    history: list[float] | None = None,
) -> ZoneFit:
    """ARB: alternating refinement of ``W_hat = sum_k alpha_k B_k + mu`` on one zone.

    Starts from :func:`residual_binarize` and repeats ``iterations`` times,
    each step the exact minimiser of ``L = sum_mask (x - W_hat)^2`` in one
    group of variables (so ``L`` never increases):

    * order 1 (ARB-LLM eq. 1-5, Alg. 1): ``mu += mean(x - W_hat)``;
      ``alpha = mean(B (x - mu))``; ``B = sign(alpha) sign(x - mu)`` (the
      reference uses ``sign(x - mu)``; the ``sign(alpha)`` factor only matters if
      ``alpha`` turns negative, where it keeps the step a minimiser).
    * order 2 (reference ``high_order_residual_alternating_mean``): ``mu`` as
      above; ``alpha_1 = mean(B_1 (x - mu - alpha_2 B_2))``, then ``alpha_2``
      likewise; ``(B_1, B_2)`` per element = the best of the four
      ``+-alpha_1 +- alpha_2``.

    Args:
        x: float32 ``[N, B]``.
        mask: bool ``[N, B]``.
        order: 1 or 2.
        iterations: refinement iterations (15 in ARB-LLM).
        history: if a list, the loss ``L`` after the initialisation and after
            every iteration is appended (for tests and diagnostics).

    Returns:
        :class:`ZoneFit` with ``mean``.

    Raises:
        ValueError: ``order`` not 1 or 2.
    """
    if order not in (1, 2):
        raise ValueError(f"arb_refine: order must be 1 or 2, got {order}")
    fit = residual_binarize(x, mask, order)
    m = mask.to(torch.float32)
    n = m.sum(-1)
    x = x.to(torch.float32)
    signs, alpha, mu = fit.signs.clone(), fit.row_scales.clone(), fit.mean.clone()

    def loss() -> float:
        q = sum(alpha[k].unsqueeze(-1) * signs[k] for k in range(order)) + mu.unsqueeze(-1)
        return float(masked_sse(x, q, mask))

    if history is not None:
        history.append(loss())
    for _ in range(iterations):
        q = sum(alpha[k].unsqueeze(-1) * signs[k] for k in range(order)) + mu.unsqueeze(-1)
        mu = mu + _masked_mean(x - q, m, n)
        centred = x - mu.unsqueeze(-1)
        if order == 1:
            alpha[0] = _masked_mean(signs[0] * centred, m, n)
            flip = sign_pm1(alpha[0]).unsqueeze(-1)
            signs[0] = torch.where(mask, flip * sign_pm1(centred), 1.0)
        else:
            alpha[0] = _masked_mean(signs[0] * (centred - alpha[1].unsqueeze(-1) * signs[1]), m, n)
            alpha[1] = _masked_mean(signs[1] * (centred - alpha[0].unsqueeze(-1) * signs[0]), m, n)
            b0, b1 = _best_pair(centred, alpha[0].unsqueeze(-1), alpha[1].unsqueeze(-1))
            signs[0] = torch.where(mask, b0, 1.0)
            signs[1] = torch.where(mask, b1, 1.0)
        if history is not None:
            history.append(loss())
    return ZoneFit(signs=signs, row_scales=alpha, mean=mu)


def arb_x_refine(
    x: torch.Tensor,
    masks: list[torch.Tensor],
    fits: list[ZoneFit],
    s_matrix: torch.Tensor,
    iterations: int = 15,
    *,
    history: list[float] | None = None,
) -> list[ZoneFit]:
    """ARB-X: refine the means and row scales of all zones of a block under the input metric.

    Minimises ``L = Tr(R S R^T)`` with ``R = x - sum_z W_hat_z`` (the block's
    output error ``||(W - W_hat) X||^2`` up to a constant when ``S = X^T X``)
    by exact coordinate descent, signs fixed: per iteration and zone ``z``,
    ``mu_z += m_z^T S r / (m_z^T S m_z)`` and for each plane
    ``alpha_zk += (m_z B_zk)^T S r / ((m_z B_zk)^T S (m_z B_zk))``, row by row
    (``r`` the current residual row, ``m_z`` the zone's mask row). These are
    ARB-LLM's calibration-aware updates (arXiv 2410.03129 sec. 3.2,
    ``mu = 1^T S (W - alpha B)^T / 1^T S 1``, ``alpha = diag(B S (W - mu)^T) /
    diag(B S B^T)``) written for masked zones; unlike the reference, which
    fits each zone on its own masked residual, the cross terms between zones
    of the same block are kept, so ``L`` (the quantity the block compensation
    sees) never increases. A coordinate whose denominator is numerically 0
    (empty zone row, or a mask in the null space of ``S``) is left unchanged.

    Args:
        x: float32 ``[N, B]`` block weights.
        masks: bool ``[N, B]`` per zone (disjoint).
        fits: per zone, a :class:`ZoneFit` with ``mean`` (from :func:`arb_refine`).
        s_matrix: float32 ``[B, B]`` symmetric PSD input second moment of the
            block's columns (ARB-LLM ``S = sum_b X_b^T X_b``; the Hessian
            block ``H[blk, blk]`` is proportional to it).
        iterations: refinement iterations (15 in ARB-LLM).
        history: if a list, ``L`` after the start and after every iteration is
            appended.

    Returns:
        New :class:`ZoneFit` per zone (signs shared with the inputs).

    Raises:
        ValueError: a fit without ``mean``, or ``len(masks) != len(fits)``.
    """
    if len(masks) != len(fits) or any(f.mean is None for f in fits):
        raise ValueError("arb_x_refine: one fit with a mean per mask is needed")
    x = x.to(torch.float32)
    s = s_matrix.to(torch.float32)
    scale = torch.diagonal(s).mean().clamp_min(torch.finfo(torch.float32).tiny)
    means = [f.mean.clone() for f in fits]
    alphas = [f.row_scales.clone() for f in fits]
    mf = [m.to(torch.float32) for m in masks]
    # Directions d (the zone's mask, or mask * B_k), d S and d^T S d are fixed while B is fixed.
    dirs: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = []
    for z, f in enumerate(fits):
        tol = 1e-7 * scale * mf[z].sum(-1)
        zone_dirs = []
        for d in [mf[z]] + [mf[z] * f.signs[k] for k in range(f.order)]:
            ds = d @ s
            den = (d * ds).sum(-1)
            zone_dirs.append((d, ds, den, den > tol))
        dirs.append(zone_dirs)

    def residual() -> torch.Tensor:
        q = sum(
            ZoneFit(fits[z].signs, alphas[z], means[z]).dense(masks[z]) for z in range(len(fits))
        )
        return x - q

    r = residual()
    if history is not None:
        history.append(float(((r @ s) * r).sum()))
    for _ in range(iterations):
        g = r @ s
        for z in range(len(fits)):
            for i, (d, ds, den, ok) in enumerate(dirs[z]):
                step = torch.where(ok, (d * g).sum(-1) / torch.where(ok, den, 1.0), 0.0)
                if i == 0:
                    means[z] = means[z] + step
                else:
                    alphas[z][i - 1] = alphas[z][i - 1] + step
                r = r - step.unsqueeze(-1) * d
                g = g - step.unsqueeze(-1) * ds
        r = residual()  # no drift from the incremental updates
        if history is not None:
            history.append(float(((r @ s) * r).sum()))
    return [ZoneFit(signs=f.signs, row_scales=alphas[z], mean=means[z]) for z, f in enumerate(fits)]


# ---------------------------------------------------------------------------------------
# ARB-RC: row and column scales, no mean (optionally weighted: SAB-LVLM)
# ---------------------------------------------------------------------------------------
def _effective_weight(mask: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    e = mask.to(dtype)
    return e if weight is None else e * weight.to(dtype)


def rc_row_update(
    target: torch.Tensor,
    mask: torch.Tensor,
    signs: torch.Tensor,
    col_scale: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted least-squares row scales of one RC plane.

    ``alpha^r_i = sum_j w_ij M_ij a^c_j B_ij T_ij / sum_j w_ij M_ij (a^c_j)^2``:
    the exact minimiser of ``sum_ij w_ij M_ij (T_ij - alpha^r_i a^c_j B_ij)^2``
    (``B_ij^2 = 1``). With ``w = 1`` this is ARB-RC's eq. 13 first line
    (arXiv 2410.03129); the weighted form is SAB-LVLM's ``dL/dalpha = 0``
    with ``w = Lambda^2`` (papers.md section 1.4). A row whose denominator is
    0 gets 0.

    Args:
        target: float32 ``[N, B]`` what the plane should fit (``W`` minus the
            zone's other planes).
        mask: bool ``[N, B]``.
        signs: float32 ``[N, B]`` +-1.
        col_scale: float32 ``[B]``.
        weight: float32 ``[N, B]`` non-negative, or None (all ones).

    Returns:
        ``[N]`` in ``target``'s dtype (float32 in the methods; float64 works too).
    """
    e = _effective_weight(mask, weight, target.dtype)
    num = (e * col_scale * signs * target).sum(-1)
    den = (e * col_scale * col_scale).sum(-1)
    return _safe_div(num, den)


def rc_col_update(
    target: torch.Tensor,
    mask: torch.Tensor,
    signs: torch.Tensor,
    row_scale: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted least-squares column scales of one RC plane.

    ``alpha^c_j = sum_i w_ij M_ij a^r_i B_ij T_ij / sum_i w_ij M_ij (a^r_i)^2``
    (ARB-RC eq. 13 second line; weighted as SAB-LVLM, papers.md section 1.4).
    A column whose denominator is 0 gets 0.

    Args:
        target, mask, signs, weight: as :func:`rc_row_update`.
        row_scale: float32 ``[N]``.

    Returns:
        ``[B]`` in ``target``'s dtype.
    """
    e = _effective_weight(mask, weight, target.dtype)
    r = row_scale.unsqueeze(-1)
    num = (e * r * signs * target).sum(0)
    den = (e * r * r).sum(0)
    return _safe_div(num, den)


def _other_planes_removed(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, signs: torch.Tensor, k: int
) -> torch.Tensor:
    """``x`` minus every RC plane but ``k``: the target plane ``k`` is refitted to."""
    return x - sum(rows[o].unsqueeze(-1) * cols[o] * signs[o] for o in range(signs.shape[0]) if o != k)


def _rc_dense(alpha_r: torch.Tensor, alpha_c: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return sum(alpha_r[k].unsqueeze(-1) * alpha_c[k] * signs[k] for k in range(signs.shape[0]))


def rc_refine(
    x: torch.Tensor,
    mask: torch.Tensor,
    order: int,
    iterations: int = 15,
    *,
    weight: torch.Tensor | None = None,
    history: list[float] | None = None,
) -> ZoneFit:
    """ARB-RC: ``W_hat = sum_k (alpha^r_k alpha^c_k^T) * B_k`` on one zone, no mean.

    Initialisation per plane on the residual ``r`` (ARB-LLM eq. 12):
    ``alpha^r_i = mean_j |r_ij|``, ``alpha^c_j = mean_i |r_ij / alpha^r_i|``
    (rows with ``alpha^r_i = 0`` skipped), ``B = sign(r)``. Then
    ``iterations`` rounds of exact coordinate descent on
    ``L = sum w M (x - W_hat)^2`` (eq. 13):

    * order 1: ``alpha^r`` (:func:`rc_row_update`), then ``alpha^c``
      (:func:`rc_col_update`); ``B`` stays ``sign(x)``.
    * order 2 (reference ``high_order_residual_alternating_order2_rc_nomean``):
      ``(alpha^r_0, alpha^c_0)`` on ``x - plane_1``, then
      ``(alpha^r_1, alpha^c_1)`` on ``x - plane_0``, then ``(B_0, B_1)`` per
      element = the best of the four ``+-c_0 +- c_1`` (``c_k = alpha^r_k
      alpha^c_k``), which positive weights do not change.

    ``L`` never increases. ``weight`` (SAB-LVLM's ``omega = Lambda^2``) enters
    only the scale updates; the initialisation is ARB-RC's unweighted one.

    Args:
        x: float32 ``[N, B]``.
        mask: bool ``[N, B]``.
        order: 1 or 2.
        iterations: alternating rounds (15 in ARB-LLM and SAB-LVLM).
        weight: float32 ``[N, B]`` non-negative per-element loss weights, or
            None (all ones: plain ARB-RC).
        history: if a list, ``L`` after the initialisation and after every
            iteration is appended.

    Returns:
        :class:`ZoneFit` with ``col_scales`` and no mean.

    Raises:
        ValueError: ``order`` not 1 or 2, or a negative or non-finite weight.
    """
    if order not in (1, 2):
        raise ValueError(f"rc_refine: order must be 1 or 2, got {order}")
    if weight is not None and not bool(((weight >= 0) & torch.isfinite(weight)).all()):
        raise ValueError("rc_refine: the element weights must be finite and non-negative")
    x = x.to(torch.float32)
    m = mask.to(torch.float32)
    n = m.sum(-1)
    r = x * m
    rows, cols, signs = [], [], []
    for _ in range(order):
        a_r = _masked_mean(r.abs(), m, n)
        live = m * (a_r > 0).to(torch.float32).unsqueeze(-1)
        ratio = r.abs() / torch.where(a_r > 0, a_r, 1.0).unsqueeze(-1)
        a_c = _safe_div((ratio * live).sum(0), live.sum(0))
        b = torch.where(mask, sign_pm1(r), 1.0)
        r = (r - a_r.unsqueeze(-1) * a_c * b) * m
        rows.append(a_r)
        cols.append(a_c)
        signs.append(b)
    alpha_r, alpha_c, signs_t = torch.stack(rows), torch.stack(cols), torch.stack(signs)

    def loss() -> float:
        return float(masked_sse(x, _rc_dense(alpha_r, alpha_c, signs_t), mask, weight))

    if history is not None:
        history.append(loss())
    for _ in range(iterations):
        if order == 1:
            alpha_r[0] = rc_row_update(x, mask, signs_t[0], alpha_c[0], weight)
            alpha_c[0] = rc_col_update(x, mask, signs_t[0], alpha_r[0], weight)
        else:
            for k in (0, 1):
                other = 1 - k
                t = x - alpha_r[other].unsqueeze(-1) * alpha_c[other] * signs_t[other]
                alpha_r[k] = rc_row_update(t, mask, signs_t[k], alpha_c[k], weight)
                alpha_c[k] = rc_col_update(t, mask, signs_t[k], alpha_r[k], weight)
            c0 = alpha_r[0].unsqueeze(-1) * alpha_c[0]
            c1 = alpha_r[1].unsqueeze(-1) * alpha_c[1]
            b0, b1 = _best_pair(x, c0, c1)
            signs_t = torch.stack([torch.where(mask, b0, 1.0), torch.where(mask, b1, 1.0)])
        if history is not None:
            history.append(loss())
    return ZoneFit(signs=signs_t, row_scales=alpha_r, col_scales=alpha_c)


def rc_round_col_scales(
    x: torch.Tensor, mask: torch.Tensor, fit: ZoneFit, weight: torch.Tensor | None = None
) -> ZoneFit:
    """Make an RC fit storable: balance, round the column scales to fp16, refit the rows.

    ``alpha^r alpha^c^T`` is invariant under ``alpha^r * c, alpha^c / c``; each
    plane is rescaled so that its non-zero column scales have mean magnitude 1
    (the row scales then carry the weight magnitude, far from fp16's limits).
    The column scales are rounded to float16 and the row scales refitted
    against the rounded values (:func:`rc_row_update`, plane by plane), so the
    loss after rounding is no worse than rounding both. The row scales are
    rounded later, when the block is assembled. Not in the ARB-RC reference,
    which keeps fp32 scales (fake quantization).

    Args:
        x: float32 ``[N, B]``; mask: bool ``[N, B]``; weight: as :func:`rc_refine`.
        fit: an RC :class:`ZoneFit` (with ``col_scales``).

    Returns:
        A new :class:`ZoneFit` whose ``col_scales`` are exactly fp16-representable.

    Raises:
        ValueError: ``fit`` has no column scales.
    """
    if fit.col_scales is None:
        raise ValueError("rc_round_col_scales: the fit has no column scales")
    rows, cols = fit.row_scales.clone(), fit.col_scales.clone()
    for k in range(fit.order):
        nz = cols[k] != 0
        c = cols[k].abs().sum() / nz.sum().clamp_min(1)
        if bool(c > 0):
            cols[k] = cols[k] / c
            rows[k] = rows[k] * c
    cols = to_fp16(cols).to(torch.float32)
    x = x.to(torch.float32)
    for k in range(fit.order):
        rows[k] = rc_row_update(_other_planes_removed(x, rows, cols, fit.signs, k), mask, fit.signs[k], cols[k], weight)
    return replace(fit, row_scales=rows, col_scales=cols)


def rc_round_row_scales_fp8(
    x: torch.Tensor, mask: torch.Tensor, fit: ZoneFit, weight: torch.Tensor | None = None
) -> ZoneFit:
    """Make an RC fit's row scales float8 (e4m3) and refit its column scales to them.

    ``alpha^r alpha^c^T`` is invariant under ``alpha^r / c, alpha^c * c``: each plane is
    rescaled so that its largest |row scale| is :data:`FP8_ROW_TARGET` (the row scales
    then span e4m3's normal range, the column scales carry the weight magnitude), the
    row scales are rounded to e4m3, and the column scales refitted against the rounded
    rows (:func:`rc_col_update`, plane by plane, the other planes fixed) and rounded to
    float16. Rounding the rows costs up to 2^-4 relative error per row (3 mantissa bits);
    the refit absorbs the part that is common to a column. Not in ARB-RC or SAB-LVLM,
    which keep fp32 scales; this is the format's ``scale_dtype = float8_e4m3fn``.

    Args:
        x: float32 ``[N, B]``; mask: bool ``[N, B]``; weight: as :func:`rc_refine`.
        fit: an RC :class:`ZoneFit` (with ``col_scales``), e.g. from :func:`rc_round_col_scales`.

    Returns:
        A new :class:`ZoneFit` whose ``row_scales`` are exactly e4m3-representable and
        ``col_scales`` exactly fp16-representable.

    Raises:
        ValueError: ``fit`` has no column scales.
    """
    if fit.col_scales is None:
        raise ValueError("rc_round_row_scales_fp8: the fit has no column scales")
    rows, cols = fit.row_scales.clone(), fit.col_scales.clone()
    for k in range(fit.order):
        peak = rows[k].abs().max()
        if bool(peak > 0):
            c = peak / FP8_ROW_TARGET
            rows[k] = rows[k] / c
            cols[k] = cols[k] * c
    rows = to_scale_dtype(rows, torch.float8_e4m3fn).to(torch.float32)
    x = x.to(torch.float32)
    for k in range(fit.order):
        cols[k] = rc_col_update(_other_planes_removed(x, rows, cols, fit.signs, k), mask, fit.signs[k], rows[k], weight)
    return replace(fit, row_scales=rows, col_scales=to_fp16(cols).to(torch.float32))
