"""``uniform2``: the 2-bit uniform GPTQ baseline, stored as two sign planes of format v1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vllm_sab.format import BinaryComponents, LayerProfile, tensor_specs

from .base import CalibrationStats, Method, MethodOptions
from .hessian import damped_inverse_cholesky_upper, prepare_hessian

__all__ = ["Uniform2Method", "uniform2_profile", "gptq_uniform2", "gptq_columns", "gptq_setup"]


def uniform2_profile(block_size: int = 128) -> LayerProfile:
    """Format v1 profile of the 2-bit uniform baseline: every column salient, one zone, offset.

    ``s = B`` gives two sign planes per weight (plane 0 in ``weight_packed``, plane 1
    in ``weight_residual``), ``Z = 1`` zone, ``T = 2`` scale slots and one offset per
    (row, block); no permutation (``docs/format.md`` section 3.4, table row
    "2-bit uniform (as two planes)").
    """
    return LayerProfile(block_size=block_size, zone_bits=0, salient=block_size, offset=True)


def _group_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 2-bit grid of each row of ``w`` (float32 ``[N, B]``), on the fp16 values stored.

    Returns ``(a0, a1, mu)``, float16 ``[N]`` each: ``a0 = fp16((max - min) / 3)`` (the step
    ``Delta``), ``a1 = fp16(a0 / 2)`` and ``mu = fp16((max + min) / 2)``.
    """
    wmax = w.amax(dim=1)
    wmin = w.amin(dim=1)
    a0 = ((wmax - wmin) / 3).to(torch.float16)
    a1 = (a0.float() / 2).to(torch.float16)
    mu = ((wmax + wmin) / 2).to(torch.float16)
    return a0, a1, mu


def _levels_of(
    q: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """Dequantized value of code ``q`` (0..3), in the float32 evaluation order of ``format.compose``.

    ``((a0 * s0) + (a1 * s1)) + mu`` with ``s0 = +1 iff q >= 2``, ``s1 = +1 iff q`` odd, so
    the result is bit-identical to what ``compose`` (and the reference dequantizer) computes
    from the stored tensors.
    """
    s0 = torch.where(q >= 2, 1.0, -1.0)
    s1 = torch.where((q & 1) == 1, 1.0, -1.0)
    return a0.float() * s0 + a1.float() * s1 + mu.float()


def _codes(w: torch.Tensor, a0: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``q = clamp(round((w - mu) / Delta + 1.5), 0, 3)`` (int64), with ``Delta = 0`` mapped to code 2.

    ``w`` has shape ``[N]`` or ``[N, c]``; ``a0``/``mu`` are ``[N]`` (broadcast over columns).
    A constant group has ``Delta = 0``: all four levels equal ``mu``, so any code is exact;
    dividing by 1 instead keeps the result finite.
    """
    if w.dim() == 2:
        a0, mu = a0.unsqueeze(1), mu.unsqueeze(1)
    delta = a0.float()
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    x = (w - mu.float()) / safe + 1.5
    q = torch.round(x).clamp(0, 3)
    q = torch.where(delta > 0, q, torch.full_like(q, 2.0))
    return q.to(torch.int64)


def gptq_setup(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    profile: LayerProfile,
    percdamp: float,
    where: str,
    info: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a GPTQ layer and factor its Hessian: ``(w, U)``.

    Args:
        weight: float ``[N, K]``; hessian: float32 ``[K, K]``; profile: the storage profile
            (its block size must divide ``K``); percdamp: relative damping; where: layer
            name for errors; info: if given, receives ``"percdamp"``, the damping used.

    Returns:
        ``w``: float32 ``[N, K]`` copy with dead input columns zeroed
        (``prepare_hessian``), ``U``: float32 ``[K, K]`` upper Cholesky factor of
        ``(H + lambda I)^-1``.

    Raises:
        FormatError: ``K`` is not a multiple of the block size.
        ValueError: ``weight`` is not 2-D or has NaN/Inf, ``hessian`` is not ``[K, K]``.
        HessianError: ``H`` cannot be inverted even with extra damping.
    """
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    tensor_specs(profile, n, k)  # FormatError for a bad K
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{where}: hessian has shape {tuple(hessian.shape)}, expected [{k}, {k}]")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: the weight has NaN/Inf entries")
    h, w = prepare_hessian(hessian.float(), weight.float())
    u, used = damped_inverse_cholesky_upper(h, percdamp, where)  # U^T U = (H + lambda I)^-1
    if info is not None:
        info["percdamp"] = used
    return w, u


def gptq_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    block_size: int,
    start_group: Callable[[int, torch.Tensor], Any],
    quantize_column: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (arXiv 2210.17323, Algorithm 1, Cholesky form, lazy blocks, no act-order).

    The quantization group is the lazy block of ``block_size`` columns; its grid is built by
    ``start_group`` from the already compensated weights when the group starts.

    Args:
        w: float32 ``[N, K]``, modified in place (it receives the propagated errors).
        u: float32 ``[K, K]`` upper Cholesky factor of ``(H + lambda I)^-1``.
        block_size: columns per group / lazy block; ``K % block_size == 0``.
        start_group: ``(block index, w[:, group] float32 [N, B]) -> grid``; may raise.
        quantize_column: ``(column float32 [N], grid) -> (codes int64 [N], values float32 [N])``;
            ``values`` must equal what the format dequantizes the stored codes to.

    Returns:
        ``(codes, Q)``: int64 ``[N, K]`` and float32 ``[N, K]``.
    """
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int64, device=w.device)
    q_all = torch.empty(n, k, dtype=torch.float32, device=w.device)
    for blk in range(k // block_size):
        i1, i2 = blk * block_size, (blk + 1) * block_size
        w1 = w[:, i1:i2].clone()  # already holds the propagated error of earlier blocks
        u1 = u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        grid = start_group(blk, w1)
        for i in range(block_size):
            col = w1[:, i]
            q, qv = quantize_column(col, grid)
            codes[:, i1 + i] = q
            q_all[:, i1 + i] = qv
            e = (col - qv) / u1[i, i]
            err1[:, i] = e
            # W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]  (Algorithm 1, Cholesky form)
            w1[:, i + 1 :] -= e.unsqueeze(1) * u1[i, i + 1 :].unsqueeze(0)
        # Lazy batch update of the later columns (Algorithm 1, last line of the outer loop).
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, q_all


def gptq_uniform2(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    block_size: int = 128,
    percdamp: float = 0.01,
    where: str = "layer",
    info: dict | None = None,
) -> tuple[BinaryComponents, torch.Tensor]:
    """GPTQ (arXiv 2210.17323, Algorithm 1) with a 2-bit min-max grid per (row, block).

    See :class:`Uniform2Method` for the math.

    Args:
        weight: float ``[N, K]``; ``K`` a multiple of ``block_size``.
        hessian: float32 ``[K, K]``, ``H = 2/N sum x x^T``.
        block_size: ``B``: group size of the grid and lazy-batch width.
        percdamp: relative damping of ``H`` (GPTQ: 0.01).
        where: layer name for error messages.
        info: if given, receives ``"percdamp"``: the relative damping actually used
            (``percdamp`` raised by the Cholesky retries).

    Returns:
        ``(components, Q)``: format v1 components (profile :func:`uniform2_profile`) and
        the float32 ``[N, K]`` quantized weight the compensation used;
        ``format.compose(components)`` equals ``Q`` exactly.

    Raises:
        FormatError: ``K`` is not a multiple of ``block_size``.
        ValueError: ``hessian`` is not ``[K, K]``, ``weight`` has NaN/Inf, or a group's
            range does not fit in fp16 (scale or offset would be Inf).
        HessianError: ``H`` cannot be inverted even with extra damping.
    """
    profile = uniform2_profile(block_size)
    w, u = gptq_setup(weight, hessian, profile, percdamp, where, info)
    n, k = w.shape
    b, nb = block_size, k // block_size

    scale = torch.empty(n, nb, 2, dtype=torch.float16, device=w.device)
    offset = torch.empty(n, nb, 1, dtype=torch.float16, device=w.device)

    def start_group(blk: int, w1: torch.Tensor):
        a0, a1, mu = _group_grid(w1)
        if not (bool(torch.isfinite(a0).all()) and bool(torch.isfinite(mu).all())):
            raise ValueError(
                f"{where}: block {blk} has a weight range beyond float16 "
                "(the 2-bit step or offset would be Inf)"
            )
        scale[:, blk, 0], scale[:, blk, 1], offset[:, blk, 0] = a0, a1, mu
        return a0, a1, mu

    def quantize_column(col: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        a0, a1, mu = grid
        q = _codes(col, a0, mu)
        return q, _levels_of(q, a0, a1, mu)

    codes, q_all = gptq_columns(w, u, b, start_group, quantize_column)
    signs = torch.where(codes >= 2, 1, -1).to(torch.int8)
    residual = torch.where((codes & 1) == 1, 1, -1).to(torch.int8).view(n, nb, b)
    comps = BinaryComponents(profile=profile, signs=signs, scale=scale, residual=residual, offset=offset)
    return comps, q_all


@dataclass(frozen=True)
class Uniform2Options(MethodOptions):
    """Options of ``uniform2`` (GPTQ 2-bit).

    Attributes:
        block_size: ``B``, group size and lazy-batch width (multiple of 32).
        percdamp: relative Hessian damping (GPTQ's 0.01; > 0).

    Raises:
        ValueError: ``percdamp`` not > 0.
        FormatError: a bad ``block_size``.
    """

    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {self.percdamp!r}")
        self._set("percdamp", float(self.percdamp))


class Uniform2Method(Method):
    """2-bit asymmetric min-max uniform quantization with GPTQ error compensation.

    Math. GPTQ (Frantar et al., arXiv 2210.17323, Algorithm 1, sec. 4) quantizes the
    columns of ``W`` ``[N, K]`` left to right and spreads each column's error over the
    not-yet-quantized columns using the upper Cholesky factor ``U`` of
    ``(H + lambda I)^-1`` (``H = 2/n X^T X``, ``lambda = percdamp * mean diag H``):

        e_j        = (w_j - q_j) / U_jj
        W[:, j+1:] -= e_j U[j, j+1:]                    (inside a lazy block of B columns)
        W[:, end:] -= E_blk U[blk, end:]                (after each block; E_blk = [e_j])

    No act-order. The grid is per (row, group of ``B = block_size`` input columns); the
    group equals the lazy block, and its parameters are taken from the current, already
    compensated, weights ``w`` of the group when the group starts (min-max, asymmetric):

        Delta = fp16((max w - min w) / 3),   mu = fp16((max w + min w) / 2)
        q     = clamp(round((w - mu) / Delta + 1.5), 0, 3)
        Q     = mu + Delta (q - 1.5)

    ``Delta`` and ``mu`` are rounded to fp16 *before* the codes and errors are computed,
    so GPTQ compensates the error of the grid actually stored and
    ``vllm_sab.format.compose`` of the result equals the ``Q`` it used, bit for bit.
    Unlike GPTQ's reference quantizer the range is not widened to contain 0 and the zero
    point is not rounded to an integer code (``mu`` is stored in fp16). A constant group
    (``Delta = 0``) gets code 2 and ``Q = mu``, no NaN. With ``H = I`` the updates vanish
    (``U`` is diagonal) and this is round-to-nearest.

    Storage (format v1, ``docs/format.md`` sections 2, 3.3, 3.4), profile
    :func:`uniform2_profile` (``s = B``, one zone, offset):

        plane 0: ``signs``    int8 ``[N, K]``      ``B0 = +1 iff q >= 2``, scale slot 0 = ``Delta``
        plane 1: ``residual`` int8 ``[N, K/B, B]`` ``B1 = +1 iff q odd``,  scale slot 1 = ``Delta / 2``
        ``scale`` float16 ``[N, K/B, 2]``, ``offset`` float16 ``[N, K/B, 1]`` = ``mu``

    so ``Delta B0 + Delta/2 B1 + mu`` gives ``mu + Delta (q - 1.5)`` for ``q = 0..3``.

    Bits: 2 sign bits + 3 fp16 numbers (two scales, one offset) per 128 weights =
    **2.375 true bits per weight** (``format.true_bits_per_weight``); the papers'
    convention (``format.paper_weight_bits``, sign planes only) counts **2 bits**.

    Options: :class:`Uniform2Options`.
    """

    name = "uniform2"
    needs_stats = True
    Options = Uniform2Options

    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> BinaryComponents:
        """Quantize ``weight`` to 2 bits with GPTQ.

        Args:
            weight: float32 ``[N, K]`` on the compute device.
            stats: calibration statistics; ``stats.hessian`` float32 ``[K, K]`` is used.

        Returns:
            Components with profile :func:`uniform2_profile` (stored order = original order).

        Raises:
            ValueError: ``stats`` is None, the Hessian shape is wrong, or the weight has
                NaN/Inf or a range beyond fp16.
            FormatError: ``K`` is not a multiple of ``block_size``.
            HessianError: the damped Hessian is not positive definite after retries.
        """
        if stats is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics (the Hessian)")
        info: dict = {}
        comps, _ = gptq_uniform2(
            weight, stats.hessian.to(weight.device), self.block_size, self.percdamp, self.name, info
        )
        self.last_report = info
        return comps
