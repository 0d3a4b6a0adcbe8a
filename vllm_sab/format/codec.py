"""Codec of sab packed format v1: components <-> stored tensors <-> dense weights.

The reference (pure torch) implementation of how a layer's values become the
bits :mod:`vllm_sab.format.layout` describes and back: the unpacked
:class:`BinaryComponents` a calibration method produces, packing LSB first
(:func:`pack`), unpacking (:func:`unpack`), dequantization in the evaluation
order of the layout's formula (:func:`compose`, :func:`dequantize`), the column
permutation's gather indices and the kernels' flat argument list
(:func:`flat_layer`). Its device-side twin is
:mod:`vllm_sab.format.codec_jit`: a change to the bit order or the evaluation
order here must change that module with it (``tests/test_kernels.py`` compares
the two over every optional part of the format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_sab.format.layout import (
    COL_SCALE,
    OFFSET,
    PACKED,
    PERM,
    RESIDUAL,
    SCALE,
    WORD_BITS,
    ZONE,
    FormatError,
    LayerProfile,
    _check_perm,
    tensor_specs,
    validate,
)

# ---------------------------------------------------------------------------------------
# Unpacked components
# ---------------------------------------------------------------------------------------
@dataclass
class BinaryComponents:
    """The unpacked, method-level description of one quantized linear.

    Columns are in *stored order* (salient columns first in each block).

    Attributes:
        profile: storage profile.
        signs: int8 ``[N, K]``, values in {-1, +1}: sign plane 0.
        scale: float16 (the profile's ``scale_dtype``) ``[N, K/B, T]``: row scales per
            (row, block, slot).
        zone: uint8 ``[N, K]`` zone index in ``[0, G)``, or None if
            ``zone_bits == 0``. For salient positions of a profile that is not
            ``salient_zoned`` it is stored but not used.
        residual: int8 ``[N, K/B, s]`` in {-1, +1}: sign plane 1 of the salient
            positions, or None if ``s == 0``.
        perm: int64 ``[K]``: original in-block column of each stored column,
            or None unless ``0 < s < B``.
        col_scale: float16 ``[T, K]`` or None.
        offset: float16 ``[N, K/B, Z]`` or None.
    """

    profile: LayerProfile
    signs: torch.Tensor
    scale: torch.Tensor
    zone: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the layer."""
        return tuple(self.signs.shape)  # type: ignore[return-value]

    def check(self, where: str = "components") -> None:
        """Check presence, dtypes, shapes and value ranges against the profile.

        Raises:
            FormatError: naming ``where`` and the offending field.
        """
        p = self.profile
        if self.signs.dim() != 2:
            raise FormatError(f"{where}: signs must be 2-D [N, K], got {tuple(self.signs.shape)}")
        n, k = self.shape
        tensor_specs(p, n, k)  # checks K
        nb = k // p.block_size
        expect: dict[str, tuple[bool, torch.dtype, tuple[int, ...]]] = {
            "signs": (True, torch.int8, (n, k)),
            "scale": (True, p.scale_torch_dtype, (n, nb, p.num_slots)),
            "zone": (p.zone_bits > 0, torch.uint8, (n, k)),
            "residual": (p.salient > 0, torch.int8, (n, nb, p.salient)),
            "perm": (p.has_perm, torch.int64, (k,)),
            "col_scale": (p.col_scale, torch.float16, (p.num_slots, k)),
            "offset": (p.offset, torch.float16, (n, nb, p.num_zones)),
        }
        for name, (needed, dtype, shape) in expect.items():
            t = getattr(self, name)
            if needed and t is None:
                raise FormatError(f"{where}: profile {p.key} needs '{name}' {dtype} {list(shape)}")
            if not needed and t is not None:
                raise FormatError(f"{where}: profile {p.key} has no '{name}', but one was given")
            if t is None:
                continue
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise FormatError(
                    f"{where}: '{name}' must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
                )
        if not bool(((self.signs == 1) | (self.signs == -1)).all()):
            raise FormatError(f"{where}: signs must be +1/-1")
        if self.residual is not None and not bool(((self.residual == 1) | (self.residual == -1)).all()):
            raise FormatError(f"{where}: residual signs must be +1/-1")
        if self.zone is not None and int(self.zone.max()) >= p.num_groups:
            raise FormatError(f"{where}: zone index must be < {p.num_groups}")
        if self.perm is not None:
            _check_perm(self.perm, p.block_size, where)


    def split_rows(self, sizes: list[int]) -> list["BinaryComponents"]:
        """Split a fused layer (rows stacked, e.g. q/k/v) into per-module components.

        Row-indexed fields are split; column-indexed ones (``perm``,
        ``col_scale``) are shared, which is what vLLM's fused layers need.

        Args:
            sizes: output rows of each part; must sum to ``N``.

        Raises:
            FormatError: if ``sizes`` do not sum to ``N``.
        """
        if sum(sizes) != self.shape[0]:
            raise FormatError(f"split_rows: sizes {sizes} do not sum to N={self.shape[0]}")
        rows = {
            name: getattr(self, name).split(sizes, dim=0)
            for name in ("signs", "scale", "zone", "residual", "offset")
            if getattr(self, name) is not None
        }
        return [
            BinaryComponents(
                profile=self.profile,
                perm=self.perm,
                col_scale=self.col_scale,
                **{name: parts[i] for name, parts in rows.items()},
            )
            for i in range(len(sizes))
        ]



# ---------------------------------------------------------------------------------------
# Bit packing (LSB first)
# ---------------------------------------------------------------------------------------
def _pack_bits(bits: torch.Tensor, word_bits: int) -> torch.Tensor:
    """Pack the last dim of a 0/1 tensor, LSB first, into int32 (32) or uint8 (8) words."""
    *lead, length = bits.shape
    assert length % word_bits == 0
    shifts = torch.arange(word_bits, device=bits.device, dtype=torch.int64)
    words = (bits.to(torch.int64).view(*lead, length // word_bits, word_bits) << shifts).sum(-1)
    if word_bits == 32:
        # Values are in [0, 2**32): reinterpret the upper half as negative int32.
        words = torch.where(words >= 2**31, words - 2**32, words)
        return words.to(torch.int32)
    return words.to(torch.uint8)


def _unpack_bits(words: torch.Tensor, word_bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: int32/uint8 words -> 0/1 uint8, last dim x word_bits."""
    shifts = torch.arange(word_bits, device=words.device, dtype=torch.int32)
    bits = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * word_bits).to(torch.uint8)


def pack(c: BinaryComponents, where: str = "components") -> dict[str, torch.Tensor]:
    """Pack components into the stored tensors of format v1.

    Args:
        c: the layer's components (checked with :meth:`BinaryComponents.check`).
        where: name used in error messages (the module name).

    Returns:
        ``{suffix: tensor}`` exactly as :func:`tensor_specs` describes, on the
        device of ``c.signs``, contiguous.

    Raises:
        FormatError: if the components do not match their profile.
    """
    c.check(where)
    p = c.profile
    n, k = c.shape
    nb = k // p.block_size
    out = {PACKED: _pack_bits(c.signs > 0, WORD_BITS)}
    if p.zone_bits:
        planes = [((c.zone.to(torch.int32) >> i) & 1) for i in range(p.zone_bits)]
        out[ZONE] = torch.stack([_pack_bits(pl, WORD_BITS) for pl in planes], dim=1)
    if p.salient:
        bits = (c.residual > 0).to(torch.uint8)
        pad = p.residual_bytes * 8 - p.salient
        if pad:
            bits = torch.cat([bits, bits.new_zeros(n, nb, pad)], dim=2)
        out[RESIDUAL] = _pack_bits(bits, 8)
    if p.has_perm:
        out[PERM] = c.perm.to(torch.int16)
    out[SCALE] = c.scale
    if p.col_scale:
        out[COL_SCALE] = c.col_scale
    if p.offset:
        out[OFFSET] = c.offset
    # Own storage per tensor: fused shards share col_scale/perm objects and
    # split_rows returns views, and safetensors refuses (or silently dedups) shared storage.
    return {name: t.contiguous().clone() for name, t in out.items()}


def unpack(
    tensors: Mapping[str, torch.Tensor], profile: LayerProfile, where: str = "layer", *, check: bool = True
) -> BinaryComponents:
    """Reference unpacking of stored tensors into components (inverse of :func:`pack`).

    Args:
        tensors: ``{suffix: tensor}`` of one layer (extra keys are an error).
        profile: the layer's profile.
        where: name used in error messages.
        check: validate first (set False on hot paths whose tensors were
            validated at load time; validation reads values back to the host).

    Raises:
        FormatError: via :func:`validate`.
    """
    packed = tensors.get(PACKED)
    if packed is None or packed.dim() != 2:
        raise FormatError(f"{where}: missing or malformed tensor '{PACKED}'")
    n, k = packed.shape[0], packed.shape[1] * WORD_BITS
    if check:
        validate(tensors, profile, n, k, where)
    nb = k // profile.block_size
    signs = _unpack_bits(packed, WORD_BITS).to(torch.int8) * 2 - 1
    zone = residual = perm = None
    if profile.zone_bits:
        planes = _unpack_bits(tensors[ZONE], WORD_BITS)  # [N, zone_bits, K]
        zone = sum((planes[:, i].to(torch.int32) << i) for i in range(profile.zone_bits)).to(torch.uint8)
    if profile.salient:
        bits = _unpack_bits(tensors[RESIDUAL], 8)[:, :, : profile.salient]
        residual = bits.to(torch.int8) * 2 - 1
    if profile.has_perm:
        perm = tensors[PERM].to(torch.int64)
    return BinaryComponents(
        profile=profile,
        signs=signs.view(n, k),
        scale=tensors[SCALE],
        zone=zone,
        residual=residual,
        perm=perm,
        col_scale=tensors.get(COL_SCALE),
        offset=tensors.get(OFFSET),
    )


def zone_of(c: BinaryComponents) -> torch.Tensor:
    """Zone ``z`` of every weight, int64 ``[N, K]`` in stored order (see :mod:`~vllm_sab.format.layout`)."""
    p = c.profile
    n, k = c.shape
    b = p.block_size
    g = c.zone.to(torch.int64) if c.zone is not None else torch.zeros(n, k, dtype=torch.int64, device=c.signs.device)
    salient_pos = (torch.arange(k, device=g.device) % b) < p.salient  # [K]
    g_sal = g if p.salient_zoned else torch.zeros_like(g)
    return torch.where(salient_pos, p.num_nonsalient_zones + g_sal, g)


def compose(c: BinaryComponents) -> torch.Tensor:
    """Dense ``W_hat`` (float32 ``[N, K]``, original column order) from components.

    Implements the dequantization formula of :mod:`vllm_sab.format.layout`'s
    docstring in that evaluation order, so any implementation following ``docs/format.md`` gets
    the same floats.
    """
    p = c.profile
    n, k = c.shape
    b, nb = p.block_size, k // p.block_size
    if p.num_slots == 1 and not p.offset:
        # One slot, no offset (sign profile, with or without column scale): skip the zone gathers.
        a = c.scale.float()  # [N, nb, 1] broadcasts over the block
        if c.col_scale is not None:
            a = a * c.col_scale.float().view(1, nb, b)
        return (a * c.signs.view(n, nb, b).float()).reshape(n, k)
    z = zone_of(c).view(n, nb, b)
    scale = c.scale.float()
    col = c.col_scale.float() if c.col_scale is not None else None

    def term(slot: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        a = scale.gather(2, slot)  # [N, nb, B]
        if col is not None:
            a_c = col.view(p.num_slots, nb, b)  # [T, nb, B]
            cols = torch.arange(b, device=slot.device).expand_as(slot)
            blocks = torch.arange(nb, device=slot.device).view(1, nb, 1).expand_as(slot)
            a = a * a_c[slot, blocks, cols]
        return a * sign.float()

    w = term(z, c.signs.view(n, nb, b))
    if p.salient:
        s = p.salient
        slot1 = p.num_zones + z[:, :, :s] - p.num_nonsalient_zones
        w_sal = w[:, :, :s]
        # Slots of plane 1 only exist for salient zones; the residual covers stored positions < s.
        a1 = scale.gather(2, slot1)
        if col is not None:
            a_c = col.view(p.num_slots, nb, b)
            cols = torch.arange(s, device=z.device).expand_as(slot1)
            blocks = torch.arange(nb, device=z.device).view(1, nb, 1).expand_as(slot1)
            a1 = a1 * a_c[slot1, blocks, cols]
        w = torch.cat([w_sal + a1 * c.residual.float(), w[:, :, s:]], dim=2)
    if c.offset is not None:
        w = w + c.offset.float().gather(2, z)
    w = w.reshape(n, k)
    if c.perm is not None:
        w = w[:, inverse_column_index(c.perm, b)]
    return w


def stored_column_index(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 ``[K]``: original column of each stored column (``x`` gather index).

    ``y = x[:, idx] @ W_stored.T`` equals ``x @ W_hat.T``.
    """
    k = perm.numel()
    base = torch.arange(0, k, block_size, device=perm.device).repeat_interleave(block_size)
    return base + perm.to(torch.int64)


def inverse_column_index(perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 ``[K]``: stored column of each original column (``W_stored[:, inv] = W_hat``)."""
    idx = stored_column_index(perm, block_size)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel(), device=idx.device)
    return inv


def flat_layer(tensors: Mapping[str, torch.Tensor], profile: LayerProfile) -> tuple:
    """A layer as the kernels' flat argument list (``sab::linear``, the C++ CPU kernels).

    Returns:
        ``(weight_packed, weight_zone, weight_residual, weight_perm, weight_scale,
        weight_col_scale, weight_offset, block_size, zone_bits, salient, salient_zoned,
        col_scale, offset)``: the seven tensors of section 3 in that fixed order, None for
        those the profile has none of, then the profile's fields.

    Raises:
        KeyError: ``weight_packed`` or ``weight_scale`` is missing.
    """
    return (
        tensors[PACKED], tensors.get(ZONE), tensors.get(RESIDUAL), tensors.get(PERM), tensors[SCALE],
        tensors.get(COL_SCALE), tensors.get(OFFSET), profile.block_size, profile.zone_bits,
        profile.salient, profile.salient_zoned, profile.col_scale, profile.offset,
    )


def dequantize(
    tensors: Mapping[str, torch.Tensor], profile: LayerProfile, where: str = "layer", *, check: bool = True
) -> torch.Tensor:
    """Reference dequantization: dense ``W_hat`` float32 ``[N, K]`` from stored tensors.

    ``check=False`` skips validation (see :func:`unpack`).

    Raises:
        FormatError: if the tensors do not follow the profile.
    """
    return compose(unpack(tensors, profile, where, check=check))

