"""Triton (``@triton.jit``) twin of :mod:`vllm_sab.format.codec`: unpacking and dequantization.

:mod:`vllm_sab.format` is the single owner of packed format v1; this module is
the device-side mirror of its codec, for kernels that dequantize tiles in
registers. It restates no layout fact of its own: constants come from
:mod:`vllm_sab.format.layout` and every helper names the ``format`` function it
mirrors (all importable from ``vllm_sab.format``). **Any change to the codec's
bit order or evaluation order (or to the layout) must change this module with
it**; the kernel tests (``tests/test_kernels.py``) compare kernels built on
these helpers with ``format.dequantize`` over every optional part of the format.

Conventions of the helpers below (all are ``@triton.jit`` device functions):

* a "tile" is ``[BLOCK_N, BLOCK_K]``: ``BLOCK_N`` output rows by ``BLOCK_K``
  consecutive *stored* columns inside one quantization block;
* ``cols`` is int32 ``[1, BLOCK_K]``, the global stored column indices of the
  tile; ``pos`` is int32 ``[1, BLOCK_K]``, their position inside the block
  (``cols % B``);
* ``*_rows`` arguments are pointer tiles ``[BLOCK_N, 1]`` to the first element
  that row ``n`` owns in the named tensor (for the per-block tensors: the first
  element of row ``n``, block ``b``);
* ``mask`` is bool ``[BLOCK_N, BLOCK_K]`` (rows beyond ``N`` are masked);
  masked lanes read 0 and their results are to be discarded by the caller.

This module imports Triton at top level: import it only where Triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_sab.format import layout as fmt

# Bits per storage word of the sign and zone planes (int32, LSB first).
WORD_BITS = tl.constexpr(fmt.WORD_BITS)
# Bits per storage word of the residual plane: its spec dtype is uint8.
RESIDUAL_WORD_BITS = tl.constexpr(torch.iinfo(torch.uint8).bits)


@triton.jit
def plane_bits(plane_rows, cols, mask):
    """Bit ``cols`` of an LSB-first int32 plane (``weight_packed``, one zone plane).

    Mirrors ``format._unpack_bits(words, WORD_BITS)``: stored column ``c`` is
    bit ``c % 32`` of word ``c // 32``.

    Args:
        plane_rows: pointer tile ``[BLOCK_N, 1]`` to int32 word 0 of each row.
        cols: int32 ``[1, BLOCK_K]`` global stored columns.
        mask: bool ``[BLOCK_N, BLOCK_K]``.

    Returns:
        int32 ``[BLOCK_N, BLOCK_K]`` in {0, 1}.
    """
    # Every lane loads its own word; the 32 lanes of a word hit one address (cache-served).
    words = tl.load(plane_rows + cols // WORD_BITS, mask=mask, other=0)
    # Arithmetic shift of a negative word smears the sign bit, but `& 1` keeps only bit `cols % 32`.
    return (words >> (cols % WORD_BITS)) & 1


@triton.jit
def zone_index(zone_rows, plane_stride, cols, mask, ZONE_BITS: tl.constexpr):
    """Per-weight zone index ``g`` from the zone planes (``weight_zone``).

    Mirrors ``format.unpack``: bit ``p`` of ``g`` is plane ``p``.

    Args:
        zone_rows: pointer tile ``[BLOCK_N, 1]`` to int32 ``weight_zone[n, 0, 0]``.
        plane_stride: int32 words between planes (``K / 32``).
        cols, mask: as :func:`plane_bits`.
        ZONE_BITS: ``profile.zone_bits`` (1 or 2; 0 has no planes: use 0).

    Returns:
        int32 ``[BLOCK_N, BLOCK_K]`` in ``[0, 2**ZONE_BITS)``.
    """
    g = plane_bits(zone_rows, cols, mask)
    for p in tl.static_range(1, ZONE_BITS):
        g = g | (plane_bits(zone_rows + p * plane_stride, cols, mask) << p)
    return g


@triton.jit
def zone_of(g, pos, SALIENT: tl.constexpr, SALIENT_ZONED: tl.constexpr, NUM_NS: tl.constexpr):
    """Zone ``z`` of each weight: mirrors ``format.zone_of``.

    Args:
        g: int32 ``[BLOCK_N, BLOCK_K]`` zone index (zeros when ``zone_bits == 0``).
        pos: int32 ``[1, BLOCK_K]`` in-block stored positions.
        SALIENT: ``s``; SALIENT_ZONED: ``profile.salient_zoned``;
        NUM_NS: ``profile.num_nonsalient_zones``.

    Returns:
        int32 ``[BLOCK_N, BLOCK_K]`` in ``[0, Z)``.
    """
    if SALIENT_ZONED:
        g_sal = g
    else:
        g_sal = g * 0
    return tl.where(pos < SALIENT, NUM_NS + g_sal, g)


@triton.jit
def residual_bits(residual_rows, pos, mask):
    """Sign plane 1 (``weight_residual``, uint8, LSB first) at in-block positions ``pos``.

    Mirrors ``format.unpack``: salient position ``c`` is bit ``c % 8`` of byte ``c // 8``.

    Args:
        residual_rows: pointer tile ``[BLOCK_N, 1]`` to uint8 ``weight_residual[n, b, 0]``.
        pos: int32 ``[1, BLOCK_K]`` in-block stored positions.
        mask: bool ``[BLOCK_N, BLOCK_K]``; must also exclude ``pos >= s`` (no byte there
            when ``s`` is a multiple of 8).

    Returns:
        int32 ``[BLOCK_N, BLOCK_K]`` in {0, 1}.
    """
    byte = tl.load(residual_rows + pos // RESIDUAL_WORD_BITS, mask=mask, other=0).to(tl.int32)
    return (byte >> (pos % RESIDUAL_WORD_BITS)) & 1


@triton.jit
def signed(bit):
    """{0, 1} -> {-1.0, +1.0} float32: a set sign bit means +1 (``2*B - 1``)."""
    return (2 * bit - 1).to(tl.float32)


@triton.jit
def dequantize_tile(
    # pointer tiles [BLOCK_N, 1] at row n (per-block tensors: at row n, block b)
    packed_rows, zone_rows, residual_rows, scale_rows, offset_rows,
    # pointer to col_scale[0, 0] (float16 [T, K]) and its row stride (K)
    col_scale_ptr, stride_col_scale,
    # int32 words between zone planes (K / 32)
    zone_plane_stride,
    # column indices, int32 [1, BLOCK_K]: global stored columns and in-block positions
    cols, pos,
    # bool [BLOCK_N, 1]: rows inside N
    mask_n,
    # profile (format.LayerProfile and its derived sizes)
    ZONE_BITS: tl.constexpr, SALIENT: tl.constexpr, SALIENT_ZONED: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, HAS_OFFSET: tl.constexpr,
    NUM_NS: tl.constexpr, NUM_ZONES: tl.constexpr,
):
    """Dense float32 ``W_hat`` tile ``[BLOCK_N, BLOCK_K]`` in stored column order.

    Mirrors ``format.compose`` (without its final column permutation, which
    kernels apply to ``x`` instead), in the same fp32 evaluation order::

        w = (a_r[t0] * a_c[t0]) * (2*B0 - 1)
        w = w + (a_r[t1] * a_c[t1]) * (2*B1 - 1)    # salient positions only
        w = w + mu[z]                               # if offset

    Pointer dtypes: ``packed_rows``/``zone_rows`` int32, ``residual_rows``
    uint8, ``scale_rows``/``offset_rows``/``col_scale_ptr`` float16; see
    ``format.tensor_specs`` for the full shapes. Pointers of absent tensors
    are never read (their constexpr flags turn the code off).

    Returns:
        float32 ``[BLOCK_N, BLOCK_K]``; rows outside ``mask_n`` hold meaningless
        (finite) values computed from zero-filled loads.
    """
    mask = mask_n & (pos >= 0)  # broadcast to [BLOCK_N, BLOCK_K]
    if ZONE_BITS > 0:
        g = zone_index(zone_rows, zone_plane_stride, cols, mask, ZONE_BITS)
    else:
        g = tl.zeros(mask.shape, tl.int32)
    z = zone_of(g, pos, SALIENT, SALIENT_ZONED, NUM_NS)

    # Plane 0: every weight, slot t0 = z.
    a = tl.load(scale_rows + z, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        a = a * tl.load(col_scale_ptr + z * stride_col_scale + cols, mask=mask, other=0.0).to(tl.float32)
    w = a * signed(plane_bits(packed_rows, cols, mask))

    if SALIENT > 0:
        # Plane 1: salient positions only, slot t1 = Z + z - n_ns (format module doc).
        sal = pos < SALIENT
        mask_sal = mask & sal
        t1 = NUM_ZONES + z - NUM_NS
        a1 = tl.load(scale_rows + t1, mask=mask_sal, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            a1 = a1 * tl.load(col_scale_ptr + t1 * stride_col_scale + cols, mask=mask_sal, other=0.0).to(tl.float32)
        # tl.where, not `+ 0`: non-salient weights must stay bit-identical to format.compose.
        w = tl.where(sal, w + a1 * signed(residual_bits(residual_rows, pos, mask_sal)), w)

    if HAS_OFFSET:
        w = w + tl.load(offset_rows + z, mask=mask, other=0.0).to(tl.float32)
    return w
