"""The block loop shared by BiLLM, ARB-X, ARB-RC (and SAB-LVLM), its searches and assembly.

Per linear layer (BiLLM, arXiv 2402.04291, Alg. 1 and reference ``bigptq.py``;
ARB-LLM, arXiv 2410.03129, reference ``bigptq_arb.py``; papers.md sections 0.3
and 4.1):

1. dead input columns fixed (:func:`~.hessian.prepare_hessian`), ``U`` = upper
   Cholesky factor of ``(H + lambda I)^-1`` (:func:`~.hessian.inverse_cholesky_upper`);
2. one salient-column count ``s`` for the layer (:func:`salient_count_search`;
   format v1 stores the same ``s`` in every block, see :class:`BlockwiseMethod`);
3. for each block of ``B`` input columns of the (compensated) weight:
   saliency ``w_ij^2 / U_jj^2``, the top-``s`` salient columns
   (:func:`select_salient_columns`), the method's zones and fit
   (:meth:`BlockwiseMethod._fit_block`), assembly into format v1 components
   (:func:`assemble_block`), the block's dense ``Q`` = ``vllm_sab.format.compose``
   of those components (so the compensation sees exactly the stored fp16
   weights), and the inter-block compensation
   ``W[:, end:] -= ((W_blk - Q_blk) / diag(U_blk)) @ U[blk, end:]``.
   There is no intra-block compensation (BiLLM sec. 3.3, "block-wise").

The searches run in *saliency space* (on ``w^2 / U_jj^2``, not on ``W``), as in
both reference implementations (papers.md section 7.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_sab.format import BinaryComponents, LayerProfile, compose, tensor_specs

from .base import CalibrationStats, Method, MethodOptions
from .binarize import ZoneFit, linear_quantiles, residual_binarize, to_fp16, to_scale_dtype
from .hessian import damped_inverse_cholesky_upper, prepare_hessian
from .residual_closed import SortedRows, residual_sse_closed

__all__ = [
    "BREAK_POINT_QUANTILES",
    "BlockContext",
    "BlockFit",
    "BlockwiseMethod",
    "BlockwiseOptions",
    "BlockwiseResult",
    "BreakPoint",
    "assemble_block",
    "break_point_search",
    "column_rank",
    "concat_blocks",
    "salient_count_search",
    "select_salient_columns",
]

#: BiLLM / ARB-LLM break-point candidates: the 81 quantiles 0.10, 0.11, ..., 0.90.
BREAK_POINT_QUANTILES = torch.linspace(0.10, 0.90, 81, dtype=torch.float64)

#: Elements per temporary in the searches' many-pass loops: 4 MiB of float32 stays in the
#: L2/L3 cache between passes (ARB-X's S-weighted search at B = 192 went from 17.9 to
#: 13.3 s per SmolLM2 layer against 64 MiB temporaries).
_CACHE_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------
# Salient columns
# ---------------------------------------------------------------------------------------
def column_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of every column by descending score along the last dim (0 = highest).

    Ties go to the lower column index (stable sort), so selection is deterministic.

    Args:
        score: float ``[..., B]``.

    Returns:
        int64 ``[..., B]``.
    """
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def select_salient_columns(target: torch.Tensor, s: int) -> torch.Tensor:
    """The ``s`` columns of a block with the largest summed saliency.

    BiLLM's structured salient selection (reference ``structural_searching``:
    ``col_score = sum_rows |target|``, top-k columns).

    Args:
        target: float32 ``[N, B]`` saliency ``w^2 / U_jj^2`` of the block.
        s: number of salient columns, ``0 <= s <= B``.

    Returns:
        bool ``[B]``, True at the salient columns.
    """
    return column_rank(target.abs().sum(0)) < s


def salient_count_search(
    target: torch.Tensor, block_size: int, candidates: list[int] | range, keep: torch.Tensor | None = None
) -> tuple[int, torch.Tensor]:
    """One salient-column count for a whole layer, by BiLLM's saliency-space criterion.

    For every candidate ``s``, each block's top-``s`` columns (by summed
    saliency) form the salient group and the rest the non-salient group; both
    get order-2 residual binarization (:func:`residual_binarize`) of the
    saliency ``t``, and the error is ``sum_blocks ||t - (BRA2(t, sal) +
    BRA2(t, ~sal))||^2``. The smallest error wins (ties: the smaller ``s``).
    BiLLM (reference ``utils/autosearch.structural_searching``) minimises the
    same error per block over ``s = 1..49``; summing it over the blocks gives
    the best single count for format v1, which stores one ``s`` per layer.

    The errors come in closed form (:func:`~.residual_closed.residual_sse_closed`):
    the salient group's sums directly over its ``s`` columns, the non-salient
    group's as the whole row's (sorted once, :class:`~.residual_closed.SortedRows`)
    minus the salient group's, so a candidate costs ``O(s + log B)`` per row
    instead of two residual binarizations of the block.

    Args:
        target: float32 ``[N, K]`` saliency of the (uncompensated) layer.
        block_size: ``B``; ``K % B == 0``.
        candidates: counts to try, each in ``0..B``; not empty.
        keep: bool ``[N, K]`` or None: only these weights count (pruned
            weights are exactly 0 and cost nothing; ``atv-prune+sab``).

    Returns:
        ``(s, errors)``: the chosen count and float64 ``[len(candidates)]``
        summed squared errors.

    Raises:
        ValueError: no candidates, a candidate out of range, or ``K % B != 0``.
    """
    cands = list(candidates)
    n, k = target.shape
    if not cands or any(not 0 <= c <= block_size for c in cands) or k % block_size:
        raise ValueError(f"salient_count_search: bad candidates {cands} for K={k}, block_size={block_size}")
    nb = k // block_size
    target = target.to(torch.float32)
    if keep is not None:
        target = target * keep
    t3 = target.reshape(n, nb, block_size).transpose(0, 1)  # [nb, N, B]: one row per (block, row)
    by_rank = column_rank(t3.abs().sum(1)).argsort(-1)  # [nb, B]: the block's columns, most salient first
    smax = max(cands)
    # Candidate s's salient group is the first s of these columns; the non-salient group
    # is the rest of the row, whose sums are the whole row's minus the salient group's.
    top = t3.gather(-1, by_rank[:, None, :smax].expand(nb, n, smax)).reshape(nb * n, smax).double()
    rows_all = t3.reshape(nb * n, block_size)
    kept_all = None if keep is None else keep.reshape(n, nb, block_size).transpose(0, 1)
    top_kept = None
    if kept_all is not None:
        top_kept = kept_all.gather(-1, by_rank[:, None, :smax].expand(nb, n, smax)).reshape(nb * n, smax)
        kept_all = kept_all.reshape(nb * n, block_size)
    prefix = torch.arange(smax, device=target.device) < torch.tensor(cands, device=target.device).unsqueeze(1)
    errors = torch.zeros(len(cands), dtype=torch.float64, device=target.device)
    step = max(1, _CACHE_ELEMENTS // max(1, len(cands) * smax))
    for lo in range(0, nb * n, step):
        g = top[lo : lo + step]  # [r, smax]
        m = prefix.unsqueeze(0) if top_kept is None else prefix.unsqueeze(0) & top_kept[lo : lo + step, None, :]
        m = m.expand(len(g), -1, -1).double()  # [r, C, smax]: candidate c's salient group
        gv = torch.stack([g, g * g], -1)  # [r, smax, 2]

        def sums(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            s12 = mask @ gv  # [r, C, 2]
            return mask.sum(-1), s12[..., 0], s12[..., 1]

        sal_total = sums(m)

        def sal_below(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return sums(m * (g.unsqueeze(1) < tau.unsqueeze(-1)))

        rows = SortedRows(rows_all[lo : lo + step], None if kept_all is None else kept_all[lo : lo + step])
        start = torch.zeros(len(g), len(cands), dtype=torch.int64, device=target.device)
        end = rows.count.unsqueeze(1).expand_as(start)
        whole_total, whole_below = rows.range_sums(start, end), rows.below_in(start, end)

        def rest_below(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return tuple(a - b for a, b in zip(whole_below(tau), sal_below(tau)))  # type: ignore[return-value]

        rest_total = tuple(a - b for a, b in zip(whole_total, sal_total))
        errors += (residual_sse_closed(sal_total, sal_below, 2) + residual_sse_closed(rest_total, rest_below, 2)).sum(0)
    return cands[int(torch.argmin(errors))], errors


# ---------------------------------------------------------------------------------------
# Break point (concentrated / sparse split)
# ---------------------------------------------------------------------------------------
@dataclass
class BreakPoint:
    """Result of :func:`break_point_search`.

    Attributes:
        threshold: the chosen break point ``p*`` (0-dim float32).
        concentrated: bool ``[N, B]``, region entries with ``|t| < p*``.
        sparse: bool ``[N, B]``, region entries with ``|t| >= p*``.
        candidates: float32 ``[C]`` the candidate break points tried.
        errors: float32 ``[C]`` their errors.
    """

    threshold: torch.Tensor
    concentrated: torch.Tensor
    sparse: torch.Tensor
    candidates: torch.Tensor
    errors: torch.Tensor


def break_point_search(
    target: torch.Tensor,
    region: torch.Tensor,
    order: int,
    *,
    base: torch.Tensor | None = None,
    s_matrix: torch.Tensor | None = None,
    nonzero: bool = False,
    quantiles: torch.Tensor = BREAK_POINT_QUANTILES,
) -> BreakPoint:
    """Split a region into concentrated (``|t| < p``) and sparse (``|t| >= p``) zones.

    Candidates ``p`` are the ``quantiles`` (default 81, 0.10..0.90) of ``|t|``
    over the region (``nonzero``: only its non-zero entries, as ARB-LLM's
    salient column-group split). Each candidate is scored by quantizing both
    parts with order-``order`` :func:`residual_binarize` and measuring
    ``E = ||t - base - Q_conc - Q_sparse||^2`` over the block, or
    ``Tr(R S R^T)`` with ``R`` that difference when ``s_matrix`` is given
    (ARB-X); the first minimum wins. Source: BiLLM eq. 11-13 and reference
    ``structural_searching`` / ``generate_structural_mask`` (break-point search
    of the non-salient weights, order 1); ARB-LLM reference
    ``structural_searching_multip_alternating_group{,_x,_rc}`` (the salient
    column-group split, order 2 over the non-zero saliency; ARB-X's
    ``error_computing_x_all_accelerate``). Deviation: BiLLM and ARB take the
    non-salient quantiles over the whole block with the salient columns
    zeroed; here they are taken over the region only.

    For a non-negative target (the saliency) and the plain squared error, the
    errors come in closed form from each row's sorted region values
    (:func:`_zone_errors`, orders 1 and 2), not by quantizing every candidate.

    Args:
        target: float32 ``[N, B]``, the saliency ``t``.
        region: bool ``[N, B]``, entries to split.
        order: residual-binarization order of both parts (1 or 2).
        base: float32 ``[N, B]`` approximation of the entries outside the
            region (e.g. the salient group), or None (zero); it only matters
            with ``s_matrix``.
        s_matrix: float32 ``[B, B]`` or None (plain squared error).
        nonzero: take the quantiles over the region's non-zero entries.
        quantiles: float ``[C]`` probabilities.

    Returns:
        :class:`BreakPoint`. An empty region (or, with ``nonzero``, an all-zero
        one) gives the single candidate 0: everything sparse.
    """
    a = target.abs()
    vals = a[region]
    if nonzero:
        vals = vals[vals != 0]
    if vals.numel() == 0:
        cands = torch.zeros(1, dtype=torch.float32, device=target.device)
    else:
        cands = linear_quantiles(vals, quantiles)
    t = target.to(torch.float32)
    # On a non-negative target the two zones of a candidate are value ranges of each row's
    # sorted region values, so with the plain squared error both orders come in closed form.
    nonneg = bool((t >= 0).all())
    if nonneg and s_matrix is None and order in (1, 2):
        # Entries outside the region only add their constant (t - base)^2, so this also
        # serves BiLLM's search (base = the salient fit).
        outside = torch.where(region, torch.zeros_like(t), t if base is None else t - base)
        errors = _zone_errors(t, region, cands, order) + float((outside.double() ** 2).sum())
        errors = errors.to(torch.float32)
        best = int(torch.argmin(errors))
        p = cands[best]
        return BreakPoint(p, region & (a < p), region & (a >= p), cands, errors)
    closed_form = order == 1 and nonneg
    rest = t if base is None else t - base
    rest = torch.where(region, t, rest)
    full_t, full_region, outside = t, region, None
    cols = region.any(0)
    if s_matrix is None and not bool(cols.all()):
        # Plain squared error: columns outside the region add a constant, so
        # score only the region's columns (the salient split is s of B columns).
        outside = (rest[:, ~cols] ** 2).sum()
        t, region, rest, a = t[:, cols], region[:, cols], rest[:, cols], a[:, cols]
    n, b = t.shape
    errs = []
    step = max(1, _CACHE_ELEMENTS // max(1, n * b))
    # Order 1 on a non-negative target (ARB-X's S-weighted split): both zones' fits come
    # in closed form per (row, candidate), so each candidate's approximation is a few
    # selects instead of two residual binarizations of [C, N, B] (a quarter of the passes).
    fits = _order1_fits(t, region, cands) if closed_form else None
    for lo in range(0, cands.numel(), step):
        p = cands[lo : lo + step].view(-1, 1, 1)
        conc = region & (a < p)
        if fits is None:
            sparse = region & (a >= p)
            q = residual_binarize(t, conc, order).dense(conc) + residual_binarize(t, sparse, order).dense(sparse)
        else:
            mu, alpha = (f[:, :, lo : lo + step].permute(0, 2, 1).unsqueeze(-1).float() for f in fits)
            mu_e = torch.where(conc, mu[0], mu[1])
            alpha_e = torch.where(conc, alpha[0], alpha[1])
            q = torch.where(region, mu_e + torch.where(t >= mu_e, alpha_e, -alpha_e), torch.zeros((), device=t.device))
        r = rest - q
        if s_matrix is None:
            errs.append((r * r).sum((1, 2)))
        else:
            errs.append(((r @ s_matrix) * r).sum((1, 2)))
    errors = torch.cat(errs)
    if outside is not None:
        errors = errors + outside
    best = int(torch.argmin(errors))
    p = cands[best]
    a = full_t.abs()
    return BreakPoint(p, full_region & (a < p), full_region & (a >= p), cands, errors)


def _zone_errors(t: torch.Tensor, region: torch.Tensor, cands: torch.Tensor, order: int) -> torch.Tensor:
    """Summed residual-binarization error of both zones of every break point, in closed form.

    For a non-negative target the concentrated zone (``t < p``) of a row is a prefix
    of its sorted region values and the sparse zone the rest, so each zone's error
    comes from range sums (:class:`~.residual_closed.SortedRows`,
    :func:`~.residual_closed.residual_sse_closed`) in O(log B) per row and candidate
    instead of a pass over the block. Same values as binarizing every candidate up to
    float64 rounding (``tests/test_methods_binary.py`` checks against brute force).

    Args:
        t: float32 ``[N, B]``, non-negative.
        region: bool ``[N, B]``.
        cands: float32 ``[C]`` break points.
        order: 1 or 2.

    Returns:
        float64 ``[C]``: the region's error (entries outside it not counted).
    """
    rows = SortedRows(t, region)
    k = rows.index(cands.view(1, -1).expand(t.shape[0], -1))  # [N, C]: concentrated prefix
    start, end = torch.zeros_like(k), rows.count.unsqueeze(1).expand_as(k)
    sse = sum(residual_sse_closed(rows.range_sums(lo, hi), rows.below_in(lo, hi), order)
              for lo, hi in ((start, k), (k, end)))
    return sse.sum(0)


def _order1_fits(
    t: torch.Tensor, region: torch.Tensor, cands: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-1 residual binarization of both zones of every break point, in closed form.

    For a non-negative target the concentrated zone (``t < p``) of a row is a prefix
    of its sorted region entries and the sparse zone the rest; prefix sums of the
    sorted values give each zone's mean ``mu``, ``alpha = mean|x - mu|`` (the sum of
    ``|x - mu|`` splits at ``mu``: one ``searchsorted``), in O(log B) per row and
    candidate.

    Args:
        t: float32 ``[N, B]``, non-negative.
        region: bool ``[N, B]``.
        cands: float32 ``[C]`` break points.

    Returns:
        ``(mu, alpha)``, float64 ``[2, N, C]`` each (index 0: concentrated zone,
        1: sparse zone); an empty zone has 0s.
    """
    rows = SortedRows(t, region)
    k = rows.index(cands.view(1, -1).expand(t.shape[0], -1))  # [N, C]: concentrated prefix
    total = rows.count.unsqueeze(1).expand_as(k)

    def zone(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s1, _ = rows.range_sums(lo, hi)
        mu = s1 / n.clamp_min(1)
        lower = rows.range_sums(lo, torch.maximum(torch.minimum(rows.index(mu), hi), lo))
        abs_dev = (mu * lower[0] - lower[1]) + ((s1 - lower[1]) - mu * (n - lower[0]))
        return mu, abs_dev / n.clamp_min(1)

    conc, sparse = zone(torch.zeros_like(k), k), zone(k, total)
    return tuple(torch.stack([a, b]) for a, b in zip(conc, sparse))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Assembly into format v1
# ---------------------------------------------------------------------------------------
@dataclass
class BlockFit:
    """A method's result for one block, in original in-block column order.

    Zone ``z`` follows ``docs/format.md`` section 3.3: non-salient zones
    ``0 .. n_ns-1`` (zone index ``g = z``), then salient zones (``g = z - n_ns``
    when ``salient_zoned``, else one salient zone with ``g = 0``).

    Attributes:
        salient: bool ``[B]``, the salient columns (exactly ``profile.salient``).
        masks: per zone ``z``, bool ``[N, B]``; together a partition of the
            block, the salient zones covering exactly the salient columns.
        fits: per zone, its :class:`ZoneFit` (order 1 for non-salient zones,
            order 2 for salient ones; ``mean`` iff ``profile.offset``,
            ``col_scales`` iff ``profile.col_scale``).
    """

    salient: torch.Tensor
    masks: list[torch.Tensor]
    fits: list[ZoneFit]


def assemble_block(profile: LayerProfile, fit: BlockFit) -> BinaryComponents:
    """Format v1 components of one block (``K = B``): signs, zones, perm, fp16 scales.

    Stored order: the salient columns first, each group in ascending original
    order; ``perm[c]`` = original in-block column of stored position ``c``.
    Slots (section 3.3): plane 0 of zone ``z`` in slot ``z``, plane 1 of salient
    zone ``z`` in slot ``Z + z - n_ns``. Row scales go to ``scale[:, 0, slot]``,
    column scales to ``col_scale[slot]``, means to ``offset[:, 0, z]``, all
    rounded to fp16 (:func:`~.binarize.to_fp16`; the row scales to the profile's
    ``scale_dtype``, :func:`~.binarize.to_scale_dtype`).

    Args:
        profile: the layer profile (``block_size`` = the fit's ``B``).
        fit: the block's :class:`BlockFit`.

    Returns:
        :class:`~vllm_sab.format.BinaryComponents` of shape ``[N, B]`` (checked).

    Raises:
        ValueError: the zones do not match the profile (wrong count, not a
            partition, salient zones off the salient columns, missing order-2
            planes, means or column scales).
        FormatError: via ``BinaryComponents.check``.
    """
    p = profile
    n, b = fit.masks[0].shape if fit.masks else (0, p.block_size)
    dev = fit.salient.device
    if len(fit.masks) != p.num_zones or len(fit.fits) != p.num_zones or b != p.block_size:
        raise ValueError(f"assemble_block: {len(fit.masks)} zones of width {b} for profile {p.key}")
    if int(fit.salient.sum()) != p.salient:
        raise ValueError(f"assemble_block: {int(fit.salient.sum())} salient columns, profile has {p.salient}")
    cover = torch.zeros(n, b, dtype=torch.int32, device=dev)
    for m in fit.masks:
        cover += m.to(torch.int32)
    sal_cover = sum((m.to(torch.int32) for m in fit.masks[p.num_nonsalient_zones :]), torch.zeros_like(cover))
    if not bool((cover == 1).all()) or not bool(((sal_cover == 1) == fit.salient.unsqueeze(0)).all()):
        raise ValueError("assemble_block: zones must partition the block, salient zones exactly the salient columns")
    big_z, n_ns, t = p.num_zones, p.num_nonsalient_zones, p.num_slots
    zone = torch.zeros(n, b, dtype=torch.uint8, device=dev)
    sign0 = torch.ones(n, b, dtype=torch.float32, device=dev)
    sign1 = torch.ones(n, b, dtype=torch.float32, device=dev)
    scale = torch.zeros(n, t, dtype=torch.float32, device=dev)
    col = torch.zeros(t, b, dtype=torch.float32, device=dev) if p.col_scale else None
    offset = torch.zeros(n, big_z, dtype=torch.float32, device=dev) if p.offset else None
    for z, (m, f) in enumerate(zip(fit.masks, fit.fits)):
        salient = z >= n_ns
        g = (z - n_ns if p.salient_zoned else 0) if salient else z
        slots = [z, big_z + z - n_ns] if salient else [z]
        if f.order != len(slots) or (f.mean is None) == p.offset or (f.col_scales is None) == p.col_scale:
            raise ValueError(f"assemble_block: zone {z} fit does not match profile {p.key}")
        zone[m] = g
        for k, slot in enumerate(slots):
            target = sign0 if k == 0 else sign1
            target.copy_(torch.where(m, f.signs[k], target))
            scale[:, slot] = f.row_scales[k]
            if col is not None:
                col[slot] = f.col_scales[k]
        if offset is not None:
            offset[:, z] = f.mean
    s = p.salient
    if p.has_perm:
        cols = torch.arange(b, device=dev)
        perm = torch.cat([cols[fit.salient], cols[~fit.salient]])
    else:
        perm = None
    order = perm if perm is not None else slice(None)
    residual = sign1[:, fit.salient].to(torch.int8).view(n, 1, s) if s else None
    comp = BinaryComponents(
        profile=p,
        signs=sign0[:, order].to(torch.int8).contiguous(),
        scale=to_scale_dtype(scale, p.scale_torch_dtype).view(n, 1, t),
        zone=zone[:, order].contiguous() if p.zone_bits else None,
        residual=residual,
        perm=perm,
        col_scale=to_fp16(col[:, order]).contiguous() if col is not None else None,
        offset=to_fp16(offset).view(n, 1, big_z) if offset is not None else None,
    )
    comp.check("assemble_block")
    return comp


def concat_blocks(parts: list[BinaryComponents]) -> BinaryComponents:
    """Concatenate per-block components (same profile, same ``N``) along ``K``.

    Args:
        parts: components of consecutive blocks, each ``[N, B]``.

    Returns:
        Components ``[N, len(parts) * B]`` (checked).

    Raises:
        ValueError: empty list or different profiles.
        FormatError: via ``BinaryComponents.check``.
    """
    if not parts or any(c.profile != parts[0].profile for c in parts):
        raise ValueError("concat_blocks: need at least one block, all with one profile")

    def cat(name: str, dim: int) -> torch.Tensor | None:
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([getattr(c, name) for c in parts], dim=dim)

    comp = BinaryComponents(
        profile=parts[0].profile,
        signs=cat("signs", 1),
        scale=cat("scale", 1),
        zone=cat("zone", 1),
        residual=cat("residual", 1),
        perm=cat("perm", 0),
        col_scale=cat("col_scale", 1),
        offset=cat("offset", 1),
    )
    comp.check("concat_blocks")
    return comp


# ---------------------------------------------------------------------------------------
# The block loop
# ---------------------------------------------------------------------------------------
@dataclass
class BlockContext:
    """What :meth:`BlockwiseMethod._fit_block` may use besides the block itself.

    Attributes:
        index: block number ``b``.
        cols: the block's column slice ``[b*B, (b+1)*B)`` of the layer.
        profile: the layer profile (its ``salient`` is the layer's ``s``).
        hessian: float32 ``[K, K]`` the layer Hessian after dead-column fixing
            (undamped).
        damp: the absolute damping ``d * mean(diag H)``, ``d`` the relative damping actually
            used (``percdamp``, times 10 per retry of the Cholesky factorization).
        weight: float32 ``[N, K]`` the layer weight before any compensation
            (dead columns zeroed).
        stats: the calibration statistics passed to ``quantize``.
        keep: bool ``[N, K]`` weights that are kept (:meth:`BlockwiseMethod._keep_mask`), or None.
    """

    index: int
    cols: slice
    profile: LayerProfile
    hessian: torch.Tensor
    damp: float
    weight: torch.Tensor
    stats: CalibrationStats
    keep: torch.Tensor | None = None


@dataclass
class BlockwiseResult:
    """Everything :meth:`BlockwiseMethod.quantize_blocks` produced.

    Attributes:
        components: the layer's format v1 components.
        dense: float32 ``[N, K]`` (original column order) the quantized blocks
            used for compensation; equal to ``compose(components)``.
        salient: the layer's salient-column count ``s``.
        salient_errors: float64 ``[max_salient]`` the search errors for
            ``s = 1..max_salient``, or None if ``s`` was forced.
        percdamp: the relative damping actually used (``percdamp`` raised by retries).
    """

    components: BinaryComponents
    dense: torch.Tensor
    salient: int
    salient_errors: torch.Tensor | None
    percdamp: float | None = None


@dataclass(frozen=True)
class BlockwiseOptions(MethodOptions):
    """Options of the block binarizers (:class:`BlockwiseMethod` and its families).

    Attributes:
        block_size: input columns per block ``B`` (128 in all references);
            a multiple of 32.
        percdamp: relative Hessian damping (0.01).
        salient_columns: force ``s`` (``0 <= s < B``); None searches it.
        max_salient: largest ``s`` the search tries; None means ``B // 4``
            (32 at ``B = 128``). The papers report 1.06-1.13 "weight bits",
            i.e. 8-17 salient columns per 128 on average, and BiLLM's code
            usually picks 2-3 (BiLLM issue #24); a per-layer count of more than
            a quarter of the columns (> 1.25 paper bits, +0.3 true bits) is
            outside the near-1-bit regime these methods target, and halving the
            references' 49 candidates halves the search time.

    Raises:
        ValueError: ``salient_columns`` or ``max_salient`` out of range.
        FormatError: a bad ``block_size``.
    """

    percdamp: float = 0.01
    salient_columns: int | None = None
    max_salient: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        block_size, salient_columns, max_salient, percdamp = (
            self.block_size, self.salient_columns, self.max_salient, self.percdamp
        )
        if salient_columns is not None and not (
            isinstance(salient_columns, int) and 0 <= salient_columns < block_size
        ):
            raise ValueError(f"salient_columns must be an int in 0..{block_size - 1}, got {salient_columns!r}")
        if max_salient is None:
            max_salient = max(1, block_size // 4)
        if not (isinstance(max_salient, int) and 1 <= max_salient < block_size):
            raise ValueError(f"max_salient must be an int in 1..{block_size - 1}, got {max_salient!r}")
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {percdamp!r}")
        self._set("percdamp", float(percdamp))
        self._set("max_salient", max_salient)


class BlockwiseMethod(Method):
    """Base of the Hessian-compensated block binarizers (BiLLM, ARB-X, ARB-RC, SAB).

    Subclasses implement :meth:`_profile` and :meth:`_fit_block`; this class
    runs the loop of the module docstring.

    Deviation from BiLLM/ARB-LLM (format constraint): format v1 stores one
    salient-column count ``s`` per layer, while the references search it per
    block over ``1..49``. ``s`` is chosen once, before the block loop, by the
    references' criterion summed over all blocks of the uncompensated weight
    (:func:`salient_count_search`) over ``1..max_salient``, or forced with
    ``salient_columns``. Within each (compensated) block the salient columns
    are the top-``s`` by summed saliency, stored first in ascending original
    order.

    Options: :class:`BlockwiseOptions` (``block_size``, ``percdamp``,
    ``salient_columns``, ``max_salient``).
    """

    needs_stats = True
    Options = BlockwiseOptions

    # ---- to implement ------------------------------------------------------------
    def _profile(self, salient: int) -> LayerProfile:
        """The layer profile for ``salient`` columns per block."""
        raise NotImplementedError

    def _fit_block(
        self, w: torch.Tensor, target: torch.Tensor, salient: torch.Tensor, ctx: BlockContext
    ) -> BlockFit:
        """Zones and fit of one block.

        Args:
            w: float32 ``[N, B]`` the compensated block weights.
            target: float32 ``[N, B]`` their saliency ``w^2 / U_jj^2``.
            salient: bool ``[B]`` the block's ``s`` salient columns.
            ctx: see :class:`BlockContext`.
        """
        raise NotImplementedError

    def _keep_mask(self, weight: torch.Tensor, stats: CalibrationStats) -> torch.Tensor | None:
        """bool ``[N, K]`` weights to keep (the rest stay exactly 0), or None (all; the default).

        A pruning subclass returns its mask: the salient-count search and the
        salient-column choice then count kept weights only, and
        :meth:`_fit_block` finds the mask in ``ctx.keep``.
        """
        return None

    def _start_weight(self, weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The weight the block loop starts from (a copy of ``weight``; a pruning
        subclass may start from the pruned weight instead)."""
        return weight.clone()

    # ---- the loop ------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> BinaryComponents:
        """Binarize ``weight`` (see :meth:`quantize_blocks`); returns its components."""
        return self.quantize_blocks(weight, stats).components

    def quantize_blocks(self, weight: torch.Tensor, stats: CalibrationStats | None) -> BlockwiseResult:
        """Run the block loop on one layer.

        Args:
            weight: float32 ``[N, K]`` (other float dtypes are converted), K a
                multiple of ``block_size``; the compute device is its device.
            stats: calibration statistics; ``stats.hessian`` float32 ``[K, K]``.

        Returns:
            :class:`BlockwiseResult` (components, the dense quantized weight,
            the chosen ``s``).

        Raises:
            ValueError: no stats, a Hessian of the wrong shape, or a non-finite weight.
            FormatError: K is not a multiple of the block size.
            HessianError: the damped Hessian cannot be factorized.
        """
        if stats is None or getattr(stats, "hessian", None) is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics (a Hessian)")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        n, k = weight.shape
        bsz = self.block_size
        probe = LayerProfile(block_size=bsz)
        tensor_specs(probe, n, k)  # clear FormatError for a bad K
        if tuple(stats.hessian.shape) != (k, k):
            raise ValueError(f"Hessian shape {tuple(stats.hessian.shape)} does not match K={k}")
        dev = weight.device
        w0 = weight.to(torch.float32)
        if not bool(torch.isfinite(w0).all()):
            raise ValueError("weight has NaN/Inf entries")
        keep = self._keep_mask(w0, stats)
        h, w0 = prepare_hessian(stats.hessian.to(device=dev, dtype=torch.float32), w0)
        u, percdamp = damped_inverse_cholesky_upper(h, self.percdamp, f"{self.name} compensation")
        self.last_report = {"percdamp": percdamp}
        damp = float(percdamp * torch.diagonal(h).mean())
        d = torch.diagonal(u)
        errors = None
        if self.salient_columns is not None:
            s = self.salient_columns
        else:
            s, errors = salient_count_search(w0**2 / d**2, bsz, range(1, self.max_salient + 1), keep)
        profile = self._profile(s)
        w = self._start_weight(w0, keep)
        dense = torch.empty_like(w)
        parts = []
        for bi, st in enumerate(range(0, k, bsz)):
            cols = slice(st, st + bsz)
            wb = w[:, cols]
            db = d[cols]
            target = wb**2 / db**2
            salient = select_salient_columns(target if keep is None else target * keep[:, cols], s)
            ctx = BlockContext(bi, cols, profile, h, damp, w0, stats, keep)
            comp = assemble_block(profile, self._fit_block(wb, target, salient, ctx))
            q = compose(comp)
            dense[:, cols] = q
            if st + bsz < k:
                err = (wb - q) / db
                w[:, st + bsz :] -= err @ u[cols, st + bsz :]
            parts.append(comp)
        return BlockwiseResult(concat_blocks(parts), dense, s, errors, percdamp)
