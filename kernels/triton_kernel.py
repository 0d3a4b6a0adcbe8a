"""Triton kernels: ``y = x @ W_hat^T`` straight from sab packed format v1.

Two kernels serve every format-v1 profile; the profile's fields are
``tl.constexpr``, so each profile compiles to a specialised kernel with the
absent parts compiled out.

* :func:`sab_gemv_kernel` (decode, ``M <= 16``): one program owns ``BLOCK_N``
  output rows and a contiguous range of quantization blocks (split-K when the
  grid would otherwise leave SMs idle). It streams each row's packed int32 words
  once, expands a word into 32 signs with one shift and one
  ``lop3``-able and-not per weight, and applies the sign by XOR-ing it into the
  float's sign bit (exact: ``±a`` is bit-identical to ``a * (2B - 1)``). The sign
  profile (one slot, no column scale, no offset) never multiplies a weight:
  ``y += a_r[n, b] * sum_j ±x_j`` per block, i.e. ``a (2 sum_{set bits} x - sum x)``.
  Other profiles build each weight's coefficient from per-(row, block) scale
  vectors held in registers (zone select by ``tl.where``, never a per-weight
  load), in :func:`vllm_sab.format.compose`'s float32 evaluation order, so the
  weights equal ``format.dequantize`` bit for bit. ``x`` is read through the
  in-block permutation inside the kernel (a gather of a few KB per program).
* :func:`sab_linear_kernel` (prefill): dequantizes ``[BLOCK_N, BLOCK_K]`` tiles
  with :func:`vllm_sab.format.codec_jit.dequantize_tile` and feeds ``tl.dot`` (tensor
  cores for float16/bfloat16 ``x``).

:func:`choose_launch` picks the kernel and its launch configuration per
``(M, N, K, profile)`` from :data:`LAUNCH_TABLE`, a list of
:class:`LaunchConfig` kept as data. The table's numbers are first guesses: no
GPU had run these kernels when it was written (``benchmarks/gpu/run.sh`` times
the alternatives in :data:`ALTERNATIVES` so the first GPU run can correct it).

Hot path: :func:`triton_linear` validates a layer's tensor shapes and dtypes once
per distinct set of (name, shape, dtype, device) and caches the verdict;
:class:`PreparedLayer` skips even that. Neither synchronises with the device.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Mapping

import torch
import triton
import triton.language as tl

from vllm_sab import format as fmt
from vllm_sab.format.codec_jit import WORD_BITS, dequantize_tile

from .reference import SUPPORTED_DTYPES

# int32 with only the sign bit set; a constexpr in int32 range becomes an int32 constant.
_SIGN_BIT = tl.constexpr(-(2**31))


# ---------------------------------------------------------------------------------------
# Decode kernel (GEMV, small M)
# ---------------------------------------------------------------------------------------
@triton.jit
def _flip_sign(v, flip):
    """``v`` with its float32 sign bit XOR-ed with ``flip`` (int32, only bit 31 set or 0)."""
    return (v.to(tl.int32, bitcast=True) ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _load4(ptrs, stride, mask, COUNT: tl.constexpr):
    """Load ``COUNT`` (1, 2 or 4) float16 tensors at ``ptrs + i * stride`` as float32.

    Returns four tensors; those past ``COUNT`` repeat the first (never selected).
    """
    v0 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    v1 = v0
    v2 = v0
    v3 = v0
    if COUNT > 1:
        v1 = tl.load(ptrs + stride, mask=mask, other=0.0).to(tl.float32)
    if COUNT > 2:
        v2 = tl.load(ptrs + 2 * stride, mask=mask, other=0.0).to(tl.float32)
        v3 = tl.load(ptrs + 3 * stride, mask=mask, other=0.0).to(tl.float32)
    return v0, v1, v2, v3


@triton.jit
def _select(g0, g1, v0, v1, v2, v3, ZB: tl.constexpr):
    """``v[g]`` with ``g = g0 + 2 g1`` (``ZB`` zone bits: 0 -> ``v0``; 1 -> by ``g0``; 2 -> by both)."""
    if ZB == 0:
        r = v0
    elif ZB == 1:
        r = tl.where(g0 != 0, v1, v0)
    else:
        r = tl.where(g1 != 0, tl.where(g0 != 0, v3, v2), tl.where(g0 != 0, v1, v0))
    return r


# Sizes are not specialised (no recompile per M, N, K or split): only the constexprs and the
# strides (stride 1 = contiguous loads) select a compiled variant.
@triton.jit(do_not_specialize=["M", "N", "K", "blocks_per_split"])
def sab_gemv_kernel(
    # activations, output, split-K partials (float32 [SPLIT_K, M, N]; unused unless SPLIT)
    x_ptr, y_ptr, part_ptr,
    # packed weight, format v1 (absent tensors: any valid pointer, never read)
    packed_ptr, zone_ptr, residual_ptr, perm_ptr, scale_ptr, col_scale_ptr, offset_ptr,
    # sizes; quantization blocks per K-split
    M, N, K, blocks_per_split,
    # strides of x and y, in elements (packed tensors are contiguous)
    stride_xm, stride_xk, stride_ym, stride_yn,
    # profile (format.LayerProfile and its derived sizes)
    BLOCK_SIZE: tl.constexpr, ZONE_BITS: tl.constexpr, SALIENT: tl.constexpr,
    SALIENT_ZONED: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_OFFSET: tl.constexpr, NUM_NS: tl.constexpr, NUM_ZONES: tl.constexpr,
    NUM_SLOTS: tl.constexpr, RESIDUAL_BYTES: tl.constexpr,
    # tiling: BLOCK_M >= M; SPLIT: write float32 partials instead of y
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    """Partial ``y[M, N] = x[M, K] @ W_hat[N, K]^T`` over one row tile and one K-split.

    Grid: ``(cdiv(N, BLOCK_N), SPLIT_K)``; program ``(i, s)`` computes rows
    ``i*BLOCK_N ..`` over quantization blocks ``s*blocks_per_split ..`` (at most
    ``K / BLOCK_SIZE``), walking each block one 32-column word at a time.
    Without ``SPLIT`` (``SPLIT_K == 1``) it stores ``y`` in ``x``'s dtype; with it,
    float32 partials at ``part_ptr[s, m, n]`` that :func:`sab_splitk_reduce_kernel`
    sums. ``M <= BLOCK_M`` (one program covers every row of ``x``).

    Pointers (``B = BLOCK_SIZE``, ``nb = K / B``, ``T = NUM_SLOTS``, ``Z = NUM_ZONES``):
    ``x_ptr`` float16/bfloat16/float32 ``[M, K]`` (strides given); ``y_ptr``
    ``x``'s dtype ``[M, N]``; the layer's tensors as ``format.tensor_specs``
    (contiguous): ``packed_ptr`` int32 ``[N, K/32]``, ``zone_ptr`` int32
    ``[N, ZONE_BITS, K/32]``, ``residual_ptr`` uint8 ``[N, nb, RESIDUAL_BYTES]``,
    ``perm_ptr`` int16 ``[K]``, ``scale_ptr`` float16 ``[N, nb, T]``,
    ``col_scale_ptr`` float16 ``[T, K]``, ``offset_ptr`` float16 ``[N, nb, Z]``.
    Row offsets are int64 (``N * K / 32`` words fit int32 on a 70B layer, element
    offsets do not).
    """
    G: tl.constexpr = 1 << ZONE_BITS
    N_SAL: tl.constexpr = NUM_ZONES - NUM_NS  # salient zones
    SAL_ZB: tl.constexpr = ZONE_BITS if SALIENT_ZONED else 0
    WORDS_PER_BLOCK: tl.constexpr = BLOCK_SIZE // WORD_BITS
    # One slot, no column scale, no offset: factor the row scale out of the block sum.
    PURE_SIGN: tl.constexpr = (NUM_SLOTS == 1) and (not HAS_COL_SCALE) and (not HAS_OFFSET)

    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    lane = tl.arange(0, WORD_BITS)  # bit of a word = column within the word
    words = K // WORD_BITS
    num_blocks = K // BLOCK_SIZE

    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, num_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(b_start, b_end):
        rb = rows_n * num_blocks + b  # int64 [BLOCK_N]: (row, block) index of the per-block tensors
        scale_rows = scale_ptr + (rb * NUM_SLOTS)[:, None]  # [BLOCK_N, 1]
        mask_rows = mask_n[:, None]
        # Row scales (and offsets) of this block, per slot, as [BLOCK_N, 1] register vectors.
        if NUM_NS > 0:
            ns0, ns1, ns2, ns3 = _load4(scale_rows, 1, mask_rows, G)
            if HAS_OFFSET:
                mu0, mu1, mu2, mu3 = _load4(offset_ptr + (rb * NUM_ZONES)[:, None], 1, mask_rows, G)
        if SALIENT > 0:
            sp0, sp1, sp2, sp3 = _load4(scale_rows + NUM_NS, 1, mask_rows, N_SAL)  # plane 0
            sq0, sq1, sq2, sq3 = _load4(scale_rows + NUM_ZONES, 1, mask_rows, N_SAL)  # plane 1
            if HAS_OFFSET:
                ms0, ms1, ms2, ms3 = _load4(offset_ptr + (rb * NUM_ZONES + NUM_NS)[:, None], 1, mask_rows, N_SAL)
        blk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for w in tl.static_range(WORDS_PER_BLOCK):
            pos = w * WORD_BITS + lane  # in-block stored positions [32]
            cols = b * BLOCK_SIZE + pos  # stored columns
            # Stored column c multiplies original column b*B + perm[c].
            if HAS_PERM:
                x_cols = b * BLOCK_SIZE + tl.load(perm_ptr + cols).to(tl.int32)
            else:
                x_cols = cols
            xt = tl.load(x_rows + x_cols[None, :] * stride_xk, mask=mask_m[:, None], other=0.0).to(tl.float32)
            word_idx = b * WORDS_PER_BLOCK + w
            word = tl.load(packed_ptr + rows_n * words + word_idx, mask=mask_n, other=0)  # int32 [BLOCK_N]
            # Bit j moved to bit 31, inverted, masked: the sign bit to XOR in (clear bit = -1).
            flip = (~(word[:, None] << (31 - lane[None, :]))) & _SIGN_BIT  # [BLOCK_N, 32]
            if PURE_SIGN:
                v = (xt.to(tl.int32, bitcast=True)[:, None, :] ^ flip[None, :, :]).to(tl.float32, bitcast=True)
                blk += tl.sum(v, axis=2)
            else:
                g0 = lane[None, :] * 0
                g1 = g0
                if ZONE_BITS > 0:
                    zone_rows = zone_ptr + rows_n * (ZONE_BITS * words) + word_idx
                    zw0 = tl.load(zone_rows, mask=mask_n, other=0)
                    g0 = (zw0[:, None] >> lane[None, :]) & 1
                    if ZONE_BITS > 1:
                        zw1 = tl.load(zone_rows + words, mask=mask_n, other=0)
                        g1 = (zw1[:, None] >> lane[None, :]) & 1
                col_rows = col_scale_ptr + cols[None, :]  # [1, 32], slot t at + t*K
                HAS_NS_HERE: tl.constexpr = NUM_NS > 0 and (w + 1) * WORD_BITS > SALIENT
                HAS_SAL_HERE: tl.constexpr = w * WORD_BITS < SALIENT
                if HAS_NS_HERE:
                    # Non-salient: zone z = g, slot t0 = z (format.compose's order: (a_r a_c) * sign + mu).
                    a = _select(g0, g1, ns0, ns1, ns2, ns3, ZONE_BITS)
                    if HAS_COL_SCALE:
                        c0, c1, c2, c3 = _load4(col_rows, K, cols[None, :] >= 0, G)
                        a = a * _select(g0, g1, c0, c1, c2, c3, ZONE_BITS)
                    coef_ns = _flip_sign(a, flip)
                    if HAS_OFFSET:
                        coef_ns = coef_ns + _select(g0, g1, mu0, mu1, mu2, mu3, ZONE_BITS)
                    coef = coef_ns
                if HAS_SAL_HERE:
                    # Salient: zone z = n_ns + (g if zoned), slots t0 = z, t1 = Z + z - n_ns.
                    a = _select(g0, g1, sp0, sp1, sp2, sp3, SAL_ZB)
                    a1 = _select(g0, g1, sq0, sq1, sq2, sq3, SAL_ZB)
                    if HAS_COL_SCALE:
                        c0, c1, c2, c3 = _load4(col_rows + NUM_NS * K, K, cols[None, :] >= 0, N_SAL)
                        a = a * _select(g0, g1, c0, c1, c2, c3, SAL_ZB)
                        c0, c1, c2, c3 = _load4(col_rows + NUM_ZONES * K, K, cols[None, :] >= 0, N_SAL)
                        a1 = a1 * _select(g0, g1, c0, c1, c2, c3, SAL_ZB)
                    sal = pos[None, :] < SALIENT
                    res = tl.load(
                        residual_ptr + (rb * RESIDUAL_BYTES)[:, None] + pos[None, :] // 8,
                        mask=mask_rows & sal, other=0,
                    ).to(tl.int32)
                    flip1 = (((res >> (pos[None, :] % 8)) & 1) ^ 1) << 31
                    coef_s = _flip_sign(a, flip)
                    coef_s = coef_s + _flip_sign(a1, flip1)
                    if HAS_OFFSET:
                        coef_s = coef_s + _select(g0, g1, ms0, ms1, ms2, ms3, SAL_ZB)
                    if HAS_NS_HERE:
                        coef = tl.where(sal, coef_s, coef_ns)
                    else:
                        coef = coef_s
                blk += tl.sum(coef[None, :, :] * xt[:, None, :], axis=2)
        if PURE_SIGN:
            a0 = tl.load(scale_ptr + rb, mask=mask_n, other=0.0).to(tl.float32)
            acc += blk * a0[None, :]
        else:
            acc += blk

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        p = part_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(p, acc, mask=mask)
    else:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "N", "SPLIT_K"])
def sab_splitk_reduce_kernel(part_ptr, y_ptr, M, N, SPLIT_K, stride_ym, stride_yn, BLOCK: tl.constexpr):
    """``y[m, n] = sum_s part[s, m, n]`` (float32 partials ``[SPLIT_K, M, N]``) cast to ``y``'s dtype.

    Grid ``(cdiv(M * N, BLOCK),)``; a fixed summation order, so results are deterministic.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M * N  # M <= 16 here: fits int32
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    tl.store(y_ptr + m * stride_ym + n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Prefill kernel (tiles of W_hat into tl.dot)
# ---------------------------------------------------------------------------------------
@triton.jit
def sab_linear_kernel(
    # activations and output
    x_ptr, y_ptr,
    # packed weight, format v1 (absent tensors: any valid pointer, never read)
    packed_ptr, zone_ptr, residual_ptr, perm_ptr, scale_ptr, col_scale_ptr, offset_ptr,
    # sizes
    M, N, K,
    # strides of x and y, in elements (packed tensors are contiguous)
    stride_xm, stride_xk, stride_ym, stride_yn,
    # profile (format.LayerProfile and its derived sizes)
    BLOCK_SIZE: tl.constexpr, ZONE_BITS: tl.constexpr, SALIENT: tl.constexpr,
    SALIENT_ZONED: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_OFFSET: tl.constexpr, NUM_NS: tl.constexpr, NUM_ZONES: tl.constexpr,
    NUM_SLOTS: tl.constexpr, RESIDUAL_BYTES: tl.constexpr,
    # tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # dot: operands in float32 (else W is cast to x's dtype), and tl.dot's input_precision
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Compute ``y[M, N] = x[M, K] @ W_hat[N, K]^T`` for one ``[BLOCK_M, BLOCK_N]`` tile of ``y``.

    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``. Each program loops over
    the ``K / BLOCK_SIZE`` quantization blocks; inside a block it walks
    ``BLOCK_SIZE / BLOCK_K`` chunks, dequantizes a float32 ``[BLOCK_N, BLOCK_K]``
    weight tile in registers (stored column order), gathers the matching
    ``x`` columns through the in-block permutation and accumulates with
    ``tl.dot`` in float32.

    Pointers (``B = BLOCK_SIZE``, ``nb = K / B``, ``T = NUM_SLOTS``, ``Z = NUM_ZONES``,
    ``s = SALIENT``):

    - ``x_ptr``: float16/bfloat16/float32 ``[M, K]`` (strides ``stride_xm``, ``stride_xk``)
    - ``y_ptr``: dtype of ``x``, ``[M, N]`` (strides ``stride_ym``, ``stride_yn``)
    - ``packed_ptr``: int32 ``[N, K/32]``, contiguous
    - ``zone_ptr``: int32 ``[N, ZONE_BITS, K/32]``, contiguous (if ``ZONE_BITS > 0``)
    - ``residual_ptr``: uint8 ``[N, nb, RESIDUAL_BYTES]``, contiguous (if ``s > 0``)
    - ``perm_ptr``: int16 ``[K]`` in-block permutation (if ``HAS_PERM``)
    - ``scale_ptr``: float16 ``[N, nb, T]``, contiguous
    - ``col_scale_ptr``: float16 ``[T, K]``, contiguous (if ``HAS_COL_SCALE``)
    - ``offset_ptr``: float16 ``[N, nb, Z]``, contiguous (if ``HAS_OFFSET``)

    ``BLOCK_K`` must divide ``BLOCK_SIZE`` and be a power of two >= 16;
    ``BLOCK_M``, ``BLOCK_N`` powers of two >= 16.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M*K and N*K/32-sized products may pass 2**31 on big layers.
    rows_m = offs_m.to(tl.int64)[:, None]
    rows_n = offs_n.to(tl.int64)[:, None]

    num_blocks = K // BLOCK_SIZE
    words = K // WORD_BITS
    packed_rows = packed_ptr + rows_n * words
    zone_rows = zone_ptr + rows_n * (ZONE_BITS * words)
    x_rows = x_ptr + rows_m * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, num_blocks):
        # Per-(row, block) tensors: point at element [n, b, 0].
        residual_rows = residual_ptr + (rows_n * num_blocks + b) * RESIDUAL_BYTES
        scale_rows = scale_ptr + (rows_n * num_blocks + b) * NUM_SLOTS
        offset_rows = offset_ptr + (rows_n * num_blocks + b) * NUM_ZONES
        for kc in tl.static_range(0, BLOCK_SIZE, BLOCK_K):
            pos = kc + offs_k  # in-block stored positions, [BLOCK_K]
            cols = b * BLOCK_SIZE + pos  # global stored columns
            # Stored column c multiplies original column b*B + perm[c]: gather x through it.
            if HAS_PERM:
                x_cols = b * BLOCK_SIZE + tl.load(perm_ptr + cols).to(tl.int32)
            else:
                x_cols = cols
            x = tl.load(x_rows + x_cols[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
            w = dequantize_tile(
                packed_rows, zone_rows, residual_rows, scale_rows, offset_rows,
                col_scale_ptr, K, words,
                cols[None, :], pos[None, :], mask_n[:, None],
                ZONE_BITS, SALIENT, SALIENT_ZONED, HAS_COL_SCALE, HAS_OFFSET, NUM_NS, NUM_ZONES,
            )
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w).to(x.dtype), acc)

    y_ptrs = y_ptr + rows_m * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------
# Launch configurations (data) and the chooser
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """One row of the launch table: which kernel runs for ``M <= max_m``, and how.

    Attributes:
        kernel: ``"gemv"`` (:func:`sab_gemv_kernel`) or ``"gemm"`` (:func:`sab_linear_kernel`).
        max_m: the row applies to ``M <= max_m`` (the first matching row of the table wins).
        block_m: rows of ``x`` per program (gemv: must be >= M, a power of two;
            gemm: a power of two >= 16).
        block_n: output rows per program (power of two; gemm: >= 16). The gemv
            halves it (not below 8) for profiles other than the sign profile when
            ``block_m * block_n * 32`` would pass ``max_tile``, to bound registers.
        block_k: gemm only: at most this many columns per dequantized chunk; the
            chunk is the largest power of two dividing the block size up to it (0: up
            to 128), so one row serves every block size.
        num_warps, num_stages: Triton launch options.
        waves: gemv only: split K until the grid has about ``waves`` programs per
            SM (``0``: never split).
        max_tile: gemv only: see ``block_n``.
    """

    kernel: str
    max_m: int
    block_m: int
    block_n: int
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 2
    waves: float = 0.0
    max_tile: int = 8192

    @property
    def name(self) -> str:
        """Short label, e.g. ``gemv-m1-n64-w4-s4`` (for benchmark tables)."""
        if self.kernel == "gemv":
            return f"gemv-m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.waves:g}"
        return f"gemm-m{self.block_m}-n{self.block_n}-k{self.block_k}-w{self.num_warps}-st{self.num_stages}"


#: Launch table, first match on ``M <= max_m``. First guesses (untuned: no GPU had run
#: them). Decode rows keep ``block_m * block_n * 32`` register elements per program near
#: 2-8K for 4 warps; prefill rows grow the tile with M so each dequantized weight tile is
#: reused by more rows of x.
LAUNCH_TABLE: tuple[LaunchConfig, ...] = (
    LaunchConfig("gemv", max_m=1, block_m=1, block_n=64, num_warps=4, waves=4),
    LaunchConfig("gemv", max_m=2, block_m=2, block_n=64, num_warps=4, waves=4),
    LaunchConfig("gemv", max_m=4, block_m=4, block_n=32, num_warps=4, waves=4),
    LaunchConfig("gemv", max_m=8, block_m=8, block_n=16, num_warps=4, waves=4),
    LaunchConfig("gemv", max_m=16, block_m=16, block_n=16, num_warps=4, waves=4),
    LaunchConfig("gemm", max_m=64, block_m=32, block_n=64, block_k=0, num_warps=4, num_stages=3),
    LaunchConfig("gemm", max_m=256, block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    LaunchConfig("gemm", max_m=2**62, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
)

#: Other configurations the GPU benchmark times beside the table's choice, so the first
#: run shows which rows to change (decode: tile and split; prefill: tile and warps; plus
#: the gemm kernel at M <= 16, the alternative to the gemv there).
ALTERNATIVES: tuple[LaunchConfig, ...] = (
    LaunchConfig("gemv", max_m=1, block_m=1, block_n=32, num_warps=2, waves=4),
    LaunchConfig("gemv", max_m=1, block_m=1, block_n=128, num_warps=4, waves=2),
    LaunchConfig("gemv", max_m=1, block_m=1, block_n=64, num_warps=4, waves=8),
    LaunchConfig("gemv", max_m=1, block_m=1, block_n=64, num_warps=4, waves=0),
    LaunchConfig("gemv", max_m=16, block_m=16, block_n=32, num_warps=8, waves=4, max_tile=16384),
    LaunchConfig("gemm", max_m=16, block_m=16, block_n=64, block_k=0, num_warps=4, num_stages=3),
    LaunchConfig("gemm", max_m=16, block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4),
    LaunchConfig("gemm", max_m=2**62, block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    LaunchConfig("gemm", max_m=2**62, block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
)

#: SM count used under the interpreter (small, so split-K runs in CPU tests).
INTERPRETER_SMS = 2


@dataclass(frozen=True)
class Launch:
    """A resolved launch: the configuration and the derived split (no tensors).

    Attributes:
        config: the :class:`LaunchConfig` (gemv ``block_n`` already adjusted).
        split_k: gemv K-splits (1: no partials); gemm: 1.
        blocks_per_split: gemv quantization blocks per split.
    """

    config: LaunchConfig
    split_k: int = 1
    blocks_per_split: int = 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _is_pure_sign(profile: fmt.LayerProfile) -> bool:
    return profile.num_slots == 1 and not profile.col_scale and not profile.offset


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    """Multiprocessors of a CUDA device (cached: one host query per device, no sync)."""
    if device_index is None:
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_block_k(block_size: int, limit: int = 128) -> int:
    """Largest power of two dividing ``block_size``, at most ``limit`` (>= 32 for format v1)."""
    return min(block_size & -block_size, limit)


@functools.lru_cache(maxsize=65536)
def resolve(config: LaunchConfig, n: int, k: int, profile: fmt.LayerProfile, sms: int) -> Launch:
    """Derive a :class:`Launch` from a configuration for an ``[n, k]`` layer on ``sms`` SMs.

    gemv: caps ``block_n`` by ``max_tile`` (non-sign profiles) and by ``N``, then
    splits K so the grid has about ``waves * sms`` programs (never more splits than
    quantization blocks). gemm: the chunk is :func:`default_block_k` capped by ``block_k``.
    Cached; pure function of its arguments.

    Raises:
        ValueError: a configuration that cannot launch for this profile (bad block
            sizes, unknown kernel).
    """
    b = profile.block_size
    if config.kernel == "gemv":
        bn = config.block_n
        if not _is_pure_sign(profile):
            while bn > 8 and config.block_m * bn * WORD_BITS > config.max_tile:
                bn //= 2
        # No wider than N (rounded up to a power of two >= 8): small layers keep their programs.
        bn = max(8, min(bn, triton.next_power_of_2(n)))
        if not (_pow2(config.block_m) and _pow2(bn)):
            raise ValueError(f"gemv: block_m={config.block_m}, block_n={bn} must be powers of two")
        nb = k // b
        tiles = triton.cdiv(n, bn)
        split = 1
        if config.waves > 0:
            split = max(1, min(nb, math.ceil(config.waves * sms / tiles)))
        per = triton.cdiv(nb, split)
        split = triton.cdiv(nb, per)  # no empty splits
        return Launch(replace(config, block_n=bn), split, per)
    if config.kernel == "gemm":
        bk = default_block_k(b, config.block_k or 128)
        if not (_pow2(config.block_m) and _pow2(config.block_n) and _pow2(bk)) or min(
            config.block_m, config.block_n, bk
        ) < 16 or b % bk:
            raise ValueError(
                f"triton_linear: block_m={config.block_m}, block_n={config.block_n}, block_k={bk}: need "
                f"powers of two >= 16 and block_k dividing block_size={b}"
            )
        return Launch(replace(config, block_k=bk))
    raise ValueError(f"unknown kernel {config.kernel!r} (expected 'gemv' or 'gemm')")


def table_config(m: int, table: tuple[LaunchConfig, ...] = LAUNCH_TABLE) -> LaunchConfig:
    """First row of ``table`` with ``m <= max_m`` (gemv rows also need ``m <= block_m``).

    Raises:
        LookupError: no row matches (the default table always matches).
    """
    for c in table:
        if m <= c.max_m and (c.kernel != "gemv" or m <= c.block_m):
            return c
    raise LookupError(f"no launch configuration for M={m}")


def choose_launch(m: int, n: int, k: int, profile: fmt.LayerProfile, device: torch.device) -> Launch:
    """The kernel and launch configuration for ``M`` rows of an ``[N, K]`` layer on ``device``.

    Looks ``M`` up in :data:`LAUNCH_TABLE` and resolves it with :func:`resolve`
    (cached). Host-side only: no device synchronisation.

    Args:
        m, n, k: the product's sizes (``x`` is ``[m, k]``, the weight ``[n, k]``).
        profile: the layer's storage profile.
        device: where it runs (CUDA: its SM count sizes the split; CPU under the
            interpreter: :data:`INTERPRETER_SMS`).
    """
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if (
        device.type == "cuda"
    ) else INTERPRETER_SMS
    return resolve(table_config(m), n, k, profile, sms)


def can_implement(device: torch.device | str, dtype: torch.dtype, profile: fmt.LayerProfile, m: int) -> tuple[bool, str]:
    """Whether the Triton kernels can run this layer here, and if not, why.

    Every format-v1 profile is supported; the limits are the device and dtype:
    a CUDA device (or a CPU tensor with ``TRITON_INTERPRET=1``), activations
    float16/bfloat16/float32, and bfloat16 on a real GPU needs compute
    capability >= 8.0 (Ampere). Host-side only (one cached property query per
    device), no device synchronisation.

    Args:
        device: where ``x`` lives (``torch.device`` or a string like ``"cuda:0"``).
        dtype: ``x``'s dtype.
        profile: the layer's :class:`vllm_sab.format.LayerProfile`.
        m: rows of ``x`` (tokens); any ``m >= 0``.

    Returns:
        ``(True, "")``, or ``(False, reason)`` with a one-line reason.
    """
    device = torch.device(device)
    if not isinstance(profile, fmt.LayerProfile):
        return False, f"profile must be a format.LayerProfile, got {type(profile).__name__}"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"Triton sab kernels take float16, bfloat16 or float32 activations, not {dtype}"
    if not isinstance(m, int) or m < 0:
        return False, f"m must be a non-negative int, got {m!r}"
    if device.type == "cuda":
        if _interpreting():
            return False, "TRITON_INTERPRET=1 runs kernels on CPU tensors; CUDA tensors need it unset"
        if not torch.cuda.is_available():
            return False, "CUDA device requested but torch sees no CUDA GPU"
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if dtype == torch.bfloat16 and major < 8:
            return False, f"bfloat16 needs compute capability >= 8.0; this GPU has {major}.{minor}"
        return True, ""
    if _interpreting():
        return True, ""
    return False, f"Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _profile_constexprs(profile: fmt.LayerProfile) -> dict:
    return dict(
        BLOCK_SIZE=profile.block_size,
        ZONE_BITS=profile.zone_bits,
        SALIENT=profile.salient,
        SALIENT_ZONED=profile.salient_zoned,
        HAS_PERM=profile.has_perm,
        HAS_COL_SCALE=profile.col_scale,
        HAS_OFFSET=profile.offset,
        NUM_NS=profile.num_nonsalient_zones,
        NUM_ZONES=profile.num_zones,
        NUM_SLOTS=profile.num_slots,
        RESIDUAL_BYTES=profile.residual_bytes,
    )


def _weight_args(t: Mapping[str, torch.Tensor]) -> tuple:
    dummy = t[fmt.PACKED]  # stands in for absent tensors; the kernels never read it
    return (
        t[fmt.PACKED], t.get(fmt.ZONE, dummy), t.get(fmt.RESIDUAL, dummy), t.get(fmt.PERM, dummy),
        t[fmt.SCALE], t.get(fmt.COL_SCALE, dummy), t.get(fmt.OFFSET, dummy),
    )


def launch(
    x2: torch.Tensor, weights: tuple, profile: fmt.LayerProfile, n: int, plan: Launch, *, dot_in_fp32: bool | None = None
) -> torch.Tensor:
    """Run one planned product on 2-D ``x2`` ``[M, K]``; returns ``[M, N]`` in ``x2.dtype``.

    No validation (callers validated once): ``weights`` is :func:`_weight_args`'s
    tuple of contiguous tensors on ``x2``'s device, ``plan`` from
    :func:`choose_launch` / :func:`resolve` with ``M <= block_m`` for gemv plans.
    ``dot_in_fp32`` (gemm only): default True under the interpreter (its bf16
    ``tl.dot`` is wrong) and for float32 ``x``.
    """
    m, k = x2.shape
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    c = plan.config
    consts = _profile_constexprs(profile)
    if c.kernel == "gemv":
        split = plan.split_k > 1
        part = torch.empty((plan.split_k, m, n), dtype=torch.float32, device=x2.device) if split else y
        grid = (triton.cdiv(n, c.block_n), plan.split_k)
        sab_gemv_kernel[grid](
            x2, y, part, *weights, m, n, k, plan.blocks_per_split,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            **consts, BLOCK_M=c.block_m, BLOCK_N=c.block_n, SPLIT=split,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        if split:
            block = 1024
            sab_splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
                part, y, m, n, plan.split_k, y.stride(0), y.stride(1), BLOCK=block, num_warps=4,
            )
        return y
    if dot_in_fp32 is None:
        dot_in_fp32 = _interpreting() or x2.dtype == torch.float32
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n))
    sab_linear_kernel[grid](
        x2, y, *weights, m, n, k,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        **consts, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        DOT_FP32=dot_in_fp32,
        # fp32 inputs: IEEE products, not TF32, so float32 serving matches the reference.
        INPUT_PRECISION="ieee",
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return y


@functools.lru_cache(maxsize=4096)
def _validated(profile: fmt.LayerProfile, signature: tuple) -> tuple[int, int]:
    """Validate a layer's tensor names, shapes and dtypes once per distinct signature.

    ``signature`` is ``((name, shape, dtype), ...)``; returns ``(N, K)``.
    Raises format.FormatError (not cached: lru_cache does not store exceptions).
    """
    shapes = {name: (shape, dtype) for name, shape, dtype in signature}
    packed = shapes.get(fmt.PACKED)
    if packed is None or len(packed[0]) != 2:
        raise fmt.FormatError(f"triton_linear: missing or malformed tensor '{fmt.PACKED}'")
    n, k = packed[0][0], packed[0][1] * fmt.WORD_BITS
    # Shapes and dtypes only: value checks would sync the device on every call.
    fmt.validate(shapes, profile, n, k, where="triton_linear", check_values=False)
    return n, k


def _check_x(x: torch.Tensor, k: int, where: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x has K={x.shape[-1]} input features, the layer has K={k}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"{where}: x is on {x.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing triton, for CPU tests)"
        )


def _run(x2: torch.Tensor, weights: tuple, profile: fmt.LayerProfile, n: int, plan: Launch, **kw) -> torch.Tensor:
    if x2.device.type == "cuda" and x2.device.index is not None and x2.device.index != torch.cuda.current_device():
        with torch.cuda.device(x2.device):
            return launch(x2, weights, profile, n, plan, **kw)
    return launch(x2, weights, profile, n, plan, **kw)


def triton_linear(
    x: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    profile: fmt.LayerProfile,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    dot_in_fp32: bool | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``y = x @ W_hat^T`` with the Triton kernels, from packed format-v1 tensors (no bias).

    Matches :func:`reference_linear` up to float rounding: the decode kernel
    builds ``W_hat`` in float32 bit-identically and differs in summation order
    only; the prefill kernel likewise with ``dot_in_fp32``, else it rounds W to
    ``x.dtype`` before the dot.

    Kernel choice: ``config`` if given, else the gemm kernel with the given tiles
    if any of ``block_m``/``block_n``/``block_k`` is given (the previous API),
    else :func:`choose_launch`. The tensors' names, shapes and dtypes are
    validated once per distinct (name, shape, dtype) set (cached), never their
    values (that would synchronise the device).

    Args:
        x: activations ``[..., K]``, float16/bfloat16/float32; CUDA tensor, or
            CPU tensor when ``TRITON_INTERPRET=1`` (Triton's interpreter, which
            must be set before Triton is imported).
        tensors: ``{suffix: tensor}`` of one layer on ``x``'s device (see
            ``format.tensor_specs``); non-contiguous ones are copied.
        profile: the layer's storage profile.
        block_m, block_n, block_k: gemm tiles (powers of two >= 16, ``block_k``
            dividing ``profile.block_size``; unset ones from :data:`LAUNCH_TABLE`'s gemm row for ``M``).
        dot_in_fp32: gemm only: feed ``tl.dot`` float32 operands. Default: True
            for float32 ``x`` and always under the interpreter (its bf16 ``tl.dot``
            is wrong); else W is cast to ``x.dtype``.
        config: an explicit :class:`LaunchConfig` (benchmarks, tests); a gemv
            config needs ``M <= config.block_m``.

    Returns:
        ``[..., N]`` tensor of ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: ``x`` dtype not float16/bfloat16/float32, or ``profile`` not
            a ``format.LayerProfile``.
        ValueError: ``x.shape[-1]`` is not the layer's ``K``; a tensor on
            another device than ``x``; bad block sizes; a gemv config with ``M > block_m``.
        RuntimeError: ``x`` is not on CUDA and the interpreter is off.
        format.FormatError: the tensors do not follow ``profile``.
    """
    if not isinstance(profile, fmt.LayerProfile):
        raise TypeError(f"triton_linear: profile must be a format.LayerProfile, got {type(profile).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    signature = tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in tensors.items()))
    n, k = _validated(profile, signature)
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"triton_linear: x is on {x.device}, tensor '{name}' on {t.device}")
    _check_x(x, k, "triton_linear")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if block_k is not None and not (_pow2(block_k) and block_k >= 16 and profile.block_size % block_k == 0):
        raise ValueError(
            f"triton_linear: block_k={block_k}: need a power of two >= 16 dividing block_size={profile.block_size}"
        )
    if config is None and (block_m or block_n or block_k):
        base = table_config(max(m, 17))  # the gemm row for this M (gemv rows end at 16)
        config = replace(base, block_m=block_m or base.block_m, block_n=block_n or base.block_n,
                         block_k=block_k if block_k is not None else base.block_k)
    if config is None:
        plan = choose_launch(m, n, k, profile, x.device)
    else:
        if config.kernel == "gemv" and m > config.block_m:
            raise ValueError(f"triton_linear: gemv config has block_m={config.block_m} < M={m}")
        sms = INTERPRETER_SMS if x.device.type != "cuda" else _sm_count(
            x.device.index if x.device.index is not None else torch.cuda.current_device()
        )
        plan = resolve(config, n, k, profile, sms)
    weights = _weight_args({name: t if t.is_contiguous() else t.contiguous() for name, t in tensors.items()})
    y = _run(x2, weights, profile, n, plan, dot_in_fp32=dot_in_fp32)
    return y.reshape(*x.shape[:-1], n)


class PreparedLayer:
    """A layer validated once, for hot loops (benchmarks, a ``nn.Module`` wrapper).

    ``layer(x)`` computes ``x @ W_hat^T`` (``[..., K]`` -> ``[..., N]``, ``x``'s
    dtype) with :func:`choose_launch`'s plan and no per-call validation beyond
    ``x``'s last dimension. Holds contiguous references to the tensors.

    Args:
        tensors: ``{suffix: tensor}`` of one layer, all on one device.
        profile: the layer's profile.

    Raises:
        format.FormatError: the tensors do not follow ``profile`` (checked here, once).
        TypeError: ``profile`` is not a ``format.LayerProfile``.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], profile: fmt.LayerProfile):
        if not isinstance(profile, fmt.LayerProfile):
            raise TypeError(f"PreparedLayer: profile must be a format.LayerProfile, got {type(profile).__name__}")
        signature = tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in tensors.items()))
        self.n, self.k = _validated(profile, signature)
        self.profile = profile
        self.tensors = {name: t.contiguous() for name, t in tensors.items()}
        self.weights = _weight_args(self.tensors)
        self.device = self.tensors[fmt.PACKED].device

    def __call__(self, x: torch.Tensor, config: LaunchConfig | None = None) -> torch.Tensor:
        """``x @ W_hat^T``; ``config`` overrides the table (a gemv one needs ``M <= block_m``)."""
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        if config is None:
            plan = choose_launch(m, self.n, self.k, self.profile, x.device)
        else:
            sms = INTERPRETER_SMS if x.device.type != "cuda" else _sm_count(
                x.device.index if x.device.index is not None else torch.cuda.current_device()
            )
            plan = resolve(config, self.n, self.k, self.profile, sms)
        return _run(x2, self.weights, self.profile, self.n, plan).reshape(*x.shape[:-1], self.n)
