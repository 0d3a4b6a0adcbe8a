"""sab packed checkpoint format, version 1: the single owner of the bit layout.

Everything that knows how a binarized linear layer is stored lives here: tensor
names, shapes, dtypes and bit order (:func:`tensor_specs`), packing
(:func:`pack`), the reference unpacking and dequantization (:func:`unpack`,
:func:`compose`, :func:`dequantize`), the honest size accounting
(:func:`true_bits_per_weight`) and validation (:func:`validate`,
:func:`validate_checkpoint`). ``docs/format.md`` is the prose specification; the
tests check this module against it with an independent element-by-element
implementation.

Summary of one quantized linear ``W`` of shape ``[N, K]`` (``N`` outputs, ``K``
inputs), block size ``B`` (input columns per scale block), ``nb = K / B``:

==================  ===========  ==========================  ==========================
suffix              dtype        shape                       present when
==================  ===========  ==========================  ==========================
``weight_packed``   int32        ``[N, K/32]``               always (sign plane 0)
``weight_zone``     int32        ``[N, zone_bits, K/32]``    ``zone_bits > 0``
``weight_residual`` uint8        ``[N, nb, ceil(s/8)]``      ``s > 0`` (sign plane 1)
``weight_perm``     int16        ``[K]``                     ``0 < s < B``
``weight_scale``    float16      ``[N, nb, T]``              always (row scales)
``weight_col_scale`` float16     ``[T, K]``                  ``col_scale``
``weight_offset``   float16      ``[N, nb, Z]``              ``offset``
==================  ===========  ==========================  ==========================

Bits are LSB-first along K in every storage word: bit ``j`` of word ``w`` holds
stored column ``32 w + j`` (``8 w + j`` for the uint8 residual). A set sign bit
means +1, a clear one -1. Columns are stored in *stored order*: within each
block the ``s`` salient columns come first; ``weight_perm[b*B + c]`` is the
original in-block column of stored position ``c`` (in-block, so the tensor
shards along K at block boundaries with no renumbering).

Each weight has a zone ``z``: its zone index ``g`` (the zone planes, bit ``p``
of ``g`` in plane ``p``) and whether its stored position ``c < s`` is salient.
Non-salient zones are ``0 .. G-1`` (``G = 2**zone_bits``, absent if ``s == B``);
salient zones follow (``G`` of them if ``salient_zoned``, else one). Every zone
has plane 0 (scale slot ``z``); salient zones also have plane 1 (slot
``Z + z - n_ns``). Dequantization (fp32, this evaluation order)::

    W_hat[n, k] = (a_r[n,b,t0] * a_c[t0,k]) * (2*B0[n,k] - 1)
                + (a_r[n,b,t1] * a_c[t1,k]) * (2*B1[n,k] - 1)   # salient only
                + mu[n,b,z]                                       # if offset

with ``a_c = 1`` when there are no column scales.

Sources: the layout meets ``shared/DESIGN.md`` section 2; the dequantization
identity is ARB-LLM_RC's (``papers.md`` section 7.6:
``W_hat = sum_groups M_g * sum_planes a_r a_c^T * B``), extended with BiLLM's
per-zone mean (arXiv 2402.04291, eq. 6-8) as the offset.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
QUANT_METHOD = "sab"
WORD_BITS = 32
MAX_ZONE_BITS = 2

# Tensor-name suffixes, appended to the module name with a dot.
PACKED = "weight_packed"
ZONE = "weight_zone"
RESIDUAL = "weight_residual"
PERM = "weight_perm"
SCALE = "weight_scale"
COL_SCALE = "weight_col_scale"
OFFSET = "weight_offset"
ALL_SUFFIXES = (PACKED, ZONE, RESIDUAL, PERM, SCALE, COL_SCALE, OFFSET)

# safetensors header dtype strings of the dtypes used above.
SAFETENSORS_DTYPE = {
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.float16: "F16",
}


class FormatError(ValueError):
    """A tensor, config entry or checkpoint does not follow format v1.

    The message names the module or file, the tensor and what was expected.
    """


@dataclass(frozen=True)
class LayerProfile:
    """Static storage description of one quantized linear (format v1).

    All shapes of a layer follow from its profile and ``(N, K)``, so vLLM can
    allocate parameters before reading any tensor.

    Attributes:
        block_size: ``B``, input columns per scale block; a multiple of 32.
        zone_bits: bits of the per-weight zone index (0, 1 or 2). 1 is the
            BiLLM/ARB concentrated/sparse group bitmap; 2 leaves room for four
            quantile groups (Bi-VLM, ARB's 4-group ablation).
        salient: ``s``, salient columns per block (0 <= s <= B). They are
            stored first in each block and get a second (residual) sign plane.
        salient_zoned: whether the zone index also splits the salient columns
            (ARB-LLM's column-group bitmap) or they form one zone (BiLLM).
        col_scale: per-(slot, input column) scales ``a_c`` (ARB-RC, SAB).
        offset: per-(row, block, zone) additive offset ``mu`` (BiLLM, ARB-X).

    Raises:
        FormatError: on an inconsistent combination.
    """

    block_size: int = 128
    zone_bits: int = 0
    salient: int = 0
    salient_zoned: bool = False
    col_scale: bool = False
    offset: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "zone_bits", "salient"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"{name} must be an int, got {v!r}")
        for name in ("salient_zoned", "col_scale", "offset"):
            if not isinstance(getattr(self, name), bool):
                raise FormatError(f"{name} must be true or false, got {getattr(self, name)!r}")
        b = self.block_size
        if not isinstance(b, int) or b <= 0 or b % WORD_BITS:
            raise FormatError(f"block_size must be a positive multiple of {WORD_BITS}, got {b!r}")
        if self.zone_bits not in range(MAX_ZONE_BITS + 1):
            raise FormatError(f"zone_bits must be in 0..{MAX_ZONE_BITS}, got {self.zone_bits!r}")
        if not 0 <= self.salient <= b:
            raise FormatError(f"salient must be in 0..block_size={b}, got {self.salient!r}")
        if self.salient_zoned and (self.zone_bits == 0 or self.salient == 0):
            raise FormatError("salient_zoned needs zone_bits > 0 and salient > 0")

    # ---- derived sizes -------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """``G``: values of the zone index."""
        return 1 << self.zone_bits

    @property
    def num_nonsalient_zones(self) -> int:
        """Zones of non-salient positions (0 when every column is salient)."""
        return self.num_groups if self.salient < self.block_size else 0

    @property
    def num_salient_zones(self) -> int:
        """Zones of salient positions (each has two sign planes)."""
        if self.salient == 0:
            return 0
        return self.num_groups if self.salient_zoned else 1

    @property
    def num_zones(self) -> int:
        """``Z``: zones; the offset has one entry per zone."""
        return self.num_nonsalient_zones + self.num_salient_zones

    @property
    def num_slots(self) -> int:
        """``T``: (zone, plane) scale slots."""
        return self.num_zones + self.num_salient_zones

    @property
    def residual_bytes(self) -> int:
        """Bytes of residual bits per row per block, ``ceil(s / 8)``."""
        return (self.salient + 7) // 8

    @property
    def has_perm(self) -> bool:
        """Whether an in-block column permutation is stored (``0 < s < B``)."""
        return 0 < self.salient < self.block_size

    @property
    def key(self) -> str:
        """Short stable name, e.g. ``b128-z1-s8g-rc-mu``."""
        parts = [f"b{self.block_size}", f"z{self.zone_bits}"]
        if self.salient:
            parts.append(f"s{self.salient}{'g' if self.salient_zoned else ''}")
        if self.col_scale:
            parts.append("rc")
        if self.offset:
            parts.append("mu")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``profiles`` entries of ``quantization_config``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "profile") -> "LayerProfile":
        """Build from a ``quantization_config`` profile entry.

        Raises:
            FormatError: unknown keys or invalid values, naming ``where``.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise FormatError(f"{where}: unknown profile keys {sorted(unknown)}; expected {sorted(known)}")
        try:
            return cls(**dict(d))
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None


@dataclass(frozen=True)
class TensorSpec:
    """Expected dtype and shape of one stored tensor.

    ``n_dim``/``k_dim`` say which dimension is indexed by output rows / by
    (a function of) input columns, for tensor-parallel sharding; ``k_unit`` is
    how many input columns one index of ``k_dim`` covers.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    n_dim: int | None
    k_dim: int
    k_unit: int


def tensor_specs(profile: LayerProfile, n: int, k: int) -> dict[str, TensorSpec]:
    """Every tensor a quantized ``[n, k]`` linear stores, by suffix.

    Args:
        profile: the layer's storage profile.
        n: output features ``N`` (rows of ``W``).
        k: input features ``K`` (columns of ``W``); must be a multiple of
            ``profile.block_size``.

    Returns:
        ``{suffix: TensorSpec}`` in a fixed order.

    Raises:
        FormatError: if ``k`` is not a positive multiple of the block size or
            ``n`` is not positive.
    """
    b = profile.block_size
    if n <= 0 or k <= 0 or k % b:
        raise FormatError(
            f"weight shape [{n}, {k}]: K={k} must be a positive multiple of block_size={b}"
        )
    nb = k // b
    specs = {PACKED: TensorSpec(torch.int32, (n, k // WORD_BITS), 0, 1, WORD_BITS)}
    if profile.zone_bits:
        specs[ZONE] = TensorSpec(torch.int32, (n, profile.zone_bits, k // WORD_BITS), 0, 2, WORD_BITS)
    if profile.salient:
        specs[RESIDUAL] = TensorSpec(torch.uint8, (n, nb, profile.residual_bytes), 0, 1, b)
    if profile.has_perm:
        specs[PERM] = TensorSpec(torch.int16, (k,), None, 0, 1)
    specs[SCALE] = TensorSpec(torch.float16, (n, nb, profile.num_slots), 0, 1, b)
    if profile.col_scale:
        specs[COL_SCALE] = TensorSpec(torch.float16, (profile.num_slots, k), None, 1, 1)
    if profile.offset:
        specs[OFFSET] = TensorSpec(torch.float16, (n, nb, profile.num_zones), 0, 1, b)
    return specs


def true_bits_per_weight(profile: LayerProfile, n: int, k: int) -> float:
    """All stored bits of a layer divided by its ``n * k`` weights.

    Counts every tensor of :func:`tensor_specs` (sign planes, zone planes,
    residual bytes with their padding, permutation, row and column scales,
    offsets), which is exactly the layer's bytes on disk.

    Raises:
        FormatError: as :func:`tensor_specs`.
    """
    return sum(bits_by_tensor(profile, n, k).values())


def bits_by_tensor(profile: LayerProfile, n: int, k: int) -> dict[str, float]:
    """Where a layer's bits go: ``{suffix: stored bits of that tensor / (n * k)}``.

    The values sum to :func:`true_bits_per_weight`; suffixes in :func:`tensor_specs`
    order (``weight_packed`` = sign plane 0, ``weight_zone`` = zone planes,
    ``weight_residual`` = plane 1 with padding, ``weight_perm``, ``weight_scale`` = row
    scales, ``weight_col_scale``, ``weight_offset``).

    Raises:
        FormatError: as :func:`tensor_specs`.
    """
    return {
        suffix: math.prod(spec.shape) * torch.tensor([], dtype=spec.dtype).element_size() * 8 / (n * k)
        for suffix, spec in tensor_specs(profile, n, k).items()
    }


def paper_weight_bits(profile: LayerProfile) -> float:
    """The papers' "weight bits" convention: ``1 + salient fraction``.

    BiLLM (arXiv 2402.04291, eq. 14) and its successors count only the sign
    planes (``N_param = 2 r + 1 (1 - r)``), leaving out bitmaps, scales and
    indices; reported beside :func:`true_bits_per_weight`, never instead of it.
    """
    return 1.0 + profile.salient / profile.block_size


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
        scale: float16 ``[N, K/B, T]``: row scales per (row, block, slot).
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
            "scale": (True, torch.float16, (n, nb, p.num_slots)),
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


def _check_perm(perm: torch.Tensor, block_size: int, where: str) -> None:
    blocks = perm.to(torch.int64).view(-1, block_size)
    want = torch.arange(block_size, device=perm.device)
    if not bool((blocks.sort(dim=1).values == want).all()):
        bad = int((blocks.sort(dim=1).values != want).any(dim=1).nonzero()[0])
        raise FormatError(
            f"{where}: {PERM} block {bad} is not a permutation of 0..{block_size - 1}"
        )


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
    """Zone ``z`` of every weight, int64 ``[N, K]`` in stored order (see module doc)."""
    p = c.profile
    n, k = c.shape
    b = p.block_size
    g = c.zone.to(torch.int64) if c.zone is not None else torch.zeros(n, k, dtype=torch.int64, device=c.signs.device)
    salient_pos = (torch.arange(k, device=g.device) % b) < p.salient  # [K]
    g_sal = g if p.salient_zoned else torch.zeros_like(g)
    return torch.where(salient_pos, p.num_nonsalient_zones + g_sal, g)


def compose(c: BinaryComponents) -> torch.Tensor:
    """Dense ``W_hat`` (float32 ``[N, K]``, original column order) from components.

    Implements the dequantization formula of the module docstring in that
    evaluation order, so any implementation following ``docs/format.md`` gets
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


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
def validate(
    tensors: Mapping[str, Any],
    profile: LayerProfile,
    n: int,
    k: int,
    where: str = "layer",
    *,
    check_values: bool = True,
) -> None:
    """Check one layer's stored tensors against format v1.

    Args:
        tensors: ``{suffix: torch.Tensor}``, or ``{suffix: (shape, dtype)}`` for
            header-only checks (then values are not checked).
        profile: the layer's profile; ``n``, ``k``: its weight shape.
        where: module name used in messages.
        check_values: also check the permutation and that scales are finite.

    Raises:
        FormatError: missing tensor, unexpected tensor, wrong dtype or shape,
            K not a multiple of the block size, bad permutation, non-finite
            scale. The message names ``where``, the tensor and what was expected.
    """
    try:
        specs = tensor_specs(profile, n, k)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    for name in tensors:
        if name not in specs:
            raise FormatError(
                f"{where}: unexpected tensor '{name}' for profile {profile.key} "
                f"(expected {sorted(specs)})"
            )
    for name, spec in specs.items():
        if name not in tensors:
            raise FormatError(
                f"{where}: missing tensor '{name}' ({_dtype_name(spec.dtype)} {list(spec.shape)}) "
                f"required by profile {profile.key}"
            )
        t = tensors[name]
        shape, dtype = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else (tuple(t[0]), t[1])
        if _dtype_name(dtype) != _dtype_name(spec.dtype):
            raise FormatError(
                f"{where}.{name}: dtype {_dtype_name(dtype)}, expected {_dtype_name(spec.dtype)}"
            )
        if shape != spec.shape:
            raise FormatError(f"{where}.{name}: shape {list(shape)}, expected {list(spec.shape)}")
    if check_values and all(isinstance(t, torch.Tensor) for t in tensors.values()):
        if PERM in tensors:
            _check_perm(tensors[PERM], profile.block_size, f"{where}")
        for name in (SCALE, COL_SCALE, OFFSET):
            if name in tensors and not bool(torch.isfinite(tensors[name]).all()):
                raise FormatError(f"{where}.{name}: contains NaN or Inf")


def _dtype_name(dtype: Any) -> str:
    """safetensors-style name (``I32``, ``F16``...) of a torch dtype or header string."""
    if isinstance(dtype, str):
        return dtype.upper()
    return SAFETENSORS_DTYPE.get(dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------
# Checkpoint-level config (config.json "quantization_config")
# ---------------------------------------------------------------------------------------
@dataclass
class QuantizedModule:
    """One quantized linear as listed in ``quantization_config.modules``."""

    profile: str
    shape: tuple[int, int]


@dataclass
class SabQuantizationConfig:
    """The ``quantization_config`` of a sab checkpoint (format v1).

    Attributes:
        profiles: ``{profile name: LayerProfile}``.
        modules: ``{checkpoint module name: QuantizedModule}``: the explicit
            list of quantized linears, in checkpoint (Hugging Face) naming.
            Every other linear is stored unquantized.
        method: calibration method that produced the checkpoint (informational).
        extra: other informational keys, kept on round trip.
    """

    profiles: dict[str, LayerProfile]
    modules: dict[str, QuantizedModule]
    method: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for ``config.json``."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "profiles": {name: p.to_dict() for name, p in self.profiles.items()},
            "modules": {
                name: {"profile": m.profile, "shape": list(m.shape)} for name, m in self.modules.items()
            },
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "quantization_config") -> "SabQuantizationConfig":
        """Parse and check a ``quantization_config`` dict.

        Raises:
            FormatError: wrong ``quant_method``, unknown ``format_version``,
                unknown profile reference, bad shapes; naming ``where``.
        """
        qm = str(d.get("quant_method", "")).lower()
        if qm != QUANT_METHOD:
            raise FormatError(f"{where}: quant_method is {d.get('quant_method')!r}, expected 'sab'")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"{where}: unknown format_version {version!r}; this vllm-sab reads "
                f"{list(SUPPORTED_FORMAT_VERSIONS)} (upgrade vllm-sab for newer checkpoints)"
            )
        raw_profiles = d.get("profiles")
        raw_modules = d.get("modules")
        if not isinstance(raw_profiles, Mapping) or not isinstance(raw_modules, Mapping):
            raise FormatError(f"{where}: needs 'profiles' and 'modules' mappings")
        profiles = {
            name: LayerProfile.from_dict(p, f"{where}.profiles.{name}") for name, p in raw_profiles.items()
        }
        modules = {}
        for name, m in raw_modules.items():
            if not isinstance(m, Mapping) or not isinstance(m.get("profile"), str) or m["profile"] not in profiles:
                raise FormatError(
                    f"{where}.modules.{name}: profile {m.get('profile') if isinstance(m, Mapping) else m!r} "
                    f"is not one of {sorted(profiles)}"
                )
            shape = m.get("shape")
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
                raise FormatError(f"{where}.modules.{name}: 'shape' must be [N, K], got {shape!r}")
            try:
                tensor_specs(profiles[m["profile"]], shape[0], shape[1])
            except FormatError as e:
                raise FormatError(f"{where}.modules.{name}: {e}") from None
            modules[name] = QuantizedModule(m["profile"], (shape[0], shape[1]))
        known = {"quant_method", "format_version", "method", "profiles", "modules"}
        extra = {key: v for key, v in d.items() if key not in known}
        return cls(profiles, modules, str(d.get("method", "unknown")), extra)

    def profile_of(self, module: str) -> LayerProfile:
        """Profile of a quantized module (checkpoint name). Raises KeyError if not quantized."""
        return self.profiles[self.modules[module].profile]


def read_safetensors_headers(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, safetensors dtype string)}`` of all ``*.safetensors`` in a folder.

    Reads only the JSON headers (cheap even for a 72B checkpoint).

    Raises:
        FormatError: no safetensors file in ``model_dir``, or an unreadable header.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir}: no *.safetensors file")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as e:
            raise FormatError(f"{f}: unreadable safetensors header ({e})") from None
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (tuple(info["shape"]), info["dtype"])
    return out


def load_quantization_config(model_dir: str | Path) -> SabQuantizationConfig:
    """Read and parse ``config.json``'s ``quantization_config`` of a sab checkpoint.

    Raises:
        FormatError: missing config.json or quantization_config, or invalid content.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: not found")
    cfg = json.loads(path.read_text())
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if qc is None:
        raise FormatError(f"{path}: no quantization_config (not a sab checkpoint)")
    return SabQuantizationConfig.from_dict(qc, f"{path}:quantization_config")


def validate_checkpoint(model_dir: str | Path) -> SabQuantizationConfig:
    """Check a sab checkpoint folder from its config and safetensors headers.

    Every module of ``quantization_config.modules`` must have exactly the
    tensors of its profile with the right dtypes and shapes, and no leftover
    dense ``.weight``.

    Returns:
        The parsed config.

    Raises:
        FormatError: naming the file, module and tensor at fault.
    """
    qc = load_quantization_config(model_dir)
    headers = read_safetensors_headers(model_dir)
    by_module: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name, info in headers.items():
        mod, _, suffix = name.rpartition(".")
        if suffix in ALL_SUFFIXES:
            by_module.setdefault(mod, {})[suffix] = info
    for mod, entry in qc.modules.items():
        tensors = by_module.pop(mod, {})
        if f"{mod}.weight" in headers:
            raise FormatError(f"{model_dir}: {mod} is listed as quantized but stores a dense '{mod}.weight'")
        validate(tensors, qc.profiles[entry.profile], *entry.shape, where=f"{model_dir}: {mod}")
    if by_module:
        stray = sorted(by_module)[0]
        raise FormatError(
            f"{model_dir}: {stray} stores sab tensors {sorted(by_module[stray])} but is not listed "
            "in quantization_config.modules"
        )
    return qc
