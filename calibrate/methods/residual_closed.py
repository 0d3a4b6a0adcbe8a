"""Residual binarization's error in closed form, for the searches that score many candidate zones.

BiLLM's order-``k`` residual binarization of a zone (:func:`~.binarize.residual_binarize`)
depends on the zone's values only through a handful of sums: round 1 needs the count,
``sum x`` and the sums split at the mean ``mu_1``; round 2 works on ``r_1 = x - mu_1 -
alpha_1 sign(x - mu_1)``, two shifted copies of the values below and above ``mu_1``, and
needs their sums split at one threshold each. So if a zone can answer "count, ``sum x``,
``sum x^2`` of its values below ``tau``" (:class:`Below`), the squared error of order 1 or 2
follows without building the approximation (:func:`residual_sse_closed`):

- a value range of each row's sorted values answers it by binary search over prefix sums
  (:class:`SortedRows`: the concentrated/sparse zones of a break point, O(log B) per row
  and candidate instead of a pass over the block);
- a set that is the rest of a row after removing a few columns answers it as the whole
  row's answer minus those columns' (the non-salient group of the salient-count search).

The values are the searches' own (float32 saliency); the sums are float64, so the errors
equal the direct computation up to float64 rounding and to values that sit within
rounding of a threshold (the direct one decides those in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Below", "SortedRows", "residual_sse_closed"]

#: ``below(tau) -> (count, sum x, sum x^2)`` of a zone's values ``< tau``; ``tau`` and the
#: three results are float64 of one shape (one zone per element).
Below = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def residual_sse_closed(
    total: tuple[torch.Tensor, torch.Tensor, torch.Tensor], below: Below, order: int
) -> torch.Tensor:
    """Squared error of order-``order`` residual binarization of many zones, from their sums.

    For a zone with ``c`` values: ``mu_1 = sum x / c``, ``alpha_1 = sum|x - mu_1| / c``
    (the values below ``mu_1`` get sign -1, the rest +1, as ``sign_pm1``), error
    ``sum x^2 - c mu_1^2 - c alpha_1^2``. Order 2 binarizes ``r_1`` again: ``mu_2 =
    alpha_1 (c_lo - c_hi) / c``; the lower values' ``r_1 - mu_2`` changes sign at
    ``mu_1 - alpha_1 + mu_2`` and the upper ones' at ``mu_1 + alpha_1 + mu_2``, which gives
    ``alpha_2``, and the error is ``sum r_1^2 - c mu_2^2 - c alpha_2^2``. Source: BiLLM
    (arXiv 2402.04291) eq. 6-8 with the per-order mean of reference
    ``binary.high_order_residual``, rewritten in sums.

    Args:
        total: float64 ``(count, sum x, sum x^2)`` of each zone, one shape ``S``.
        below: the zones' :data:`Below` query (thresholds of shape ``S``).
        order: 1 or 2.

    Returns:
        float64, shape ``S``: the error of each zone (0 for an empty zone), clamped at 0.

    Raises:
        ValueError: ``order`` not 1 or 2.
    """
    if order not in (1, 2):
        raise ValueError(f"residual_sse_closed: order must be 1 or 2, got {order}")
    c, s1, s2 = total
    safe = c.clamp_min(1)
    mu1 = s1 / safe
    cl, sl, ql = below(mu1)
    ch, sh, qh = c - cl, s1 - sl, s2 - ql
    a1 = (mu1 * cl - sl) + (sh - mu1 * ch)  # sum |x - mu_1|
    alpha1 = a1 / safe
    if order == 1:
        sse = s2 - c * mu1 * mu1 - alpha1 * a1
    else:
        mu2 = alpha1 * (cl - ch) / safe
        lo_shift, hi_shift = mu1 - alpha1, mu1 + alpha1  # r_1 = x - shift on each side
        t_lo, t_hi = lo_shift + mu2, hi_shift + mu2  # where r_1 - mu_2 changes sign
        # |mu_2| <= alpha_1, so t_lo <= mu_1 <= t_hi; the clamps only absorb rounding.
        cll, sll, _ = below(torch.minimum(t_lo, mu1))
        cth, sth, _ = below(torch.maximum(t_hi, mu1))
        chl, shl = cth - cl, sth - sl  # upper values below t_hi
        a2 = (t_lo * cll - sll) + ((sl - sll) - t_lo * (cl - cll))
        a2 = a2 + (t_hi * chl - shl) + ((sh - shl) - t_hi * (ch - chl))
        r1_sq = (ql - 2 * lo_shift * sl + cl * lo_shift * lo_shift) + (qh - 2 * hi_shift * sh + ch * hi_shift * hi_shift)
        sse = r1_sq - c * mu2 * mu2 - a2 * a2 / safe
    return torch.where(c > 0, sse.clamp_min(0), torch.zeros_like(sse))


class SortedRows:
    """Each row's values (inside a region) sorted, with prefix sums: range sums in O(log B).

    Args:
        values: float ``[R, B]``.
        region: bool ``[R, B]`` or None (every value): the values outside it are left out.

    Attributes:
        x: float64 ``[R, B]`` the region's values of each row, ascending, padded with +inf.
        count: int64 ``[R]`` region values per row.
    """

    def __init__(self, values: torch.Tensor, region: torch.Tensor | None = None) -> None:
        x = values.double()
        if region is not None:
            x = torch.where(region, x, torch.full_like(x, float("inf")))
        self.x = x.sort(dim=-1).values
        self.count = (
            region.sum(-1) if region is not None
            else torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        )
        finite = torch.where(torch.isinf(self.x), torch.zeros_like(self.x), self.x)
        zero = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
        self._p1 = torch.cat([zero, finite.cumsum(-1)], -1)  # [R, B + 1]
        self._p2 = torch.cat([zero, (finite * finite).cumsum(-1)], -1)

    def index(self, tau: torch.Tensor) -> torch.Tensor:
        """int64 ``[R, C]``: how many region values of each row are ``< tau`` (float ``[R, C]``)."""
        return torch.minimum(torch.searchsorted(self.x, tau.double().contiguous()), self.count.unsqueeze(1))

    def range_sums(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 ``(count, sum x, sum x^2)`` of sorted positions ``[lo, hi)`` (int64 ``[R, C]``)."""
        return (
            (hi - lo).double(),
            self._p1.gather(-1, hi) - self._p1.gather(-1, lo),
            self._p2.gather(-1, hi) - self._p2.gather(-1, lo),
        )

    def below_in(self, lo: torch.Tensor, hi: torch.Tensor) -> Below:
        """The :data:`Below` query of the zones ``[lo, hi)`` (sorted positions, int64 ``[R, C]``)."""

        def below(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.range_sums(lo, torch.maximum(torch.minimum(self.index(tau), hi), lo))

        return below
