"""Triton kernel: ``y = x @ W_hat^T`` straight from sab packed format v1.

One kernel serves every format-v1 profile; the profile's fields are
``tl.constexpr`` so each profile compiles to a specialised kernel with the
absent parts compiled out. Weight bits are dequantized in registers by the
helpers of :mod:`vllm_sab.format_jit` (the jit twin of :mod:`vllm_sab.format`);
nothing here knows the bit layout.

Correctness first: block sizes are plain heuristics, not tuned.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
import triton
import triton.language as tl

from vllm_sab import format as fmt
from vllm_sab.format_jit import WORD_BITS, dequantize_tile

from .reference import SUPPORTED_DTYPES


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(v: int) -> bool:
    return v >= 16 and v & (v - 1) == 0


def triton_linear(
    x: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    profile: fmt.LayerProfile,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    dot_in_fp32: bool | None = None,
) -> torch.Tensor:
    """``y = x @ W_hat^T`` with the Triton kernel, from packed format-v1 tensors (no bias).

    Matches :func:`reference_linear` up to float rounding (accumulation order;
    with ``dot_in_fp32=False`` also W rounded to ``x.dtype`` before the dot).

    Args:
        x: activations ``[..., K]``, float16/bfloat16/float32; CUDA tensor, or
            CPU tensor when ``TRITON_INTERPRET=1`` (Triton's interpreter, which
            must be set before Triton is imported).
        tensors: ``{suffix: tensor}`` of one layer on ``x``'s device (see
            ``format.tensor_specs``); non-contiguous ones are copied.
        profile: the layer's storage profile.
        block_m, block_n: output tile (powers of two >= 16); default from ``M``.
        block_k: columns per dequantized chunk (power of two >= 16 dividing
            ``profile.block_size``); default the largest such, at most 128.
        dot_in_fp32: feed ``tl.dot`` float32 operands (exact-ish, slow on GPU
            for half inputs). Default: True for float32 ``x`` and always under
            the interpreter (its bf16 ``tl.dot`` is wrong); else W is cast to
            ``x.dtype``.

    Returns:
        ``[..., N]`` tensor of ``x.dtype`` on ``x.device``.

    Raises:
        TypeError: ``x`` dtype not float16/bfloat16/float32, or ``profile`` not
            a ``format.LayerProfile``.
        ValueError: ``x.shape[-1]`` is not the layer's ``K``; a tensor on
            another device than ``x``; bad block sizes.
        RuntimeError: ``x`` is not on CUDA and the interpreter is off.
        format.FormatError: the tensors do not follow ``profile``.
    """
    if not isinstance(profile, fmt.LayerProfile):
        raise TypeError(f"triton_linear: profile must be a format.LayerProfile, got {type(profile).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    packed = tensors.get(fmt.PACKED)
    if packed is None or packed.dim() != 2:
        raise fmt.FormatError(f"triton_linear: missing or malformed tensor '{fmt.PACKED}'")
    n, k = packed.shape[0], packed.shape[1] * fmt.WORD_BITS
    # Shapes and dtypes only: value checks would sync the device on every call.
    fmt.validate(tensors, profile, n, k, where="triton_linear", check_values=False)
    if x.shape[-1] != k:
        raise ValueError(f"triton_linear: x has K={x.shape[-1]} input features, the layer has K={k}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"triton_linear: x is on {x.device}, tensor '{name}' on {t.device}")
    interpreting = _interpreting()
    if x.device.type != "cuda" and not interpreting:
        raise RuntimeError(
            f"triton_linear: x is on {x.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing triton, for CPU tests)"
        )

    b = profile.block_size
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if block_n is None:
        block_n = 64
    if block_k is None:
        block_k = min(b & -b, 128)  # largest power of two dividing B (B is a multiple of 32)
    if not (_pow2(block_m) and _pow2(block_n) and _pow2(block_k)) or b % block_k:
        raise ValueError(
            f"triton_linear: block_m={block_m}, block_n={block_n}, block_k={block_k}: need powers of "
            f"two >= 16 and block_k dividing block_size={b}"
        )
    if dot_in_fp32 is None:
        dot_in_fp32 = interpreting or x.dtype == torch.float32

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    t = {name: v.contiguous() for name, v in tensors.items()}
    dummy = t[fmt.PACKED]  # stands in for absent tensors; the kernel never reads it
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    launch = dict(
        BLOCK_SIZE=b,
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_FP32=dot_in_fp32,
        # fp32 inputs: IEEE products, not TF32, so float32 serving matches the reference.
        INPUT_PRECISION="ieee",
    )
    args = (
        x2, y,
        t[fmt.PACKED], t.get(fmt.ZONE, dummy), t.get(fmt.RESIDUAL, dummy), t.get(fmt.PERM, dummy),
        t[fmt.SCALE], t.get(fmt.COL_SCALE, dummy), t.get(fmt.OFFSET, dummy),
        m, n, k,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
    )
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            sab_linear_kernel[grid](*args, **launch)
    else:
        sab_linear_kernel[grid](*args, **launch)
    return y.reshape(*x.shape[:-1], n)
