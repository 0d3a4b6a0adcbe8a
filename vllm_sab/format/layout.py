"""Layout of sab packed format v1: what one quantized linear stores.

The single owner of the bit layout's static facts: tensor names (suffixes),
shapes, dtypes and which dimension shards (:class:`LayerProfile`,
:func:`tensor_specs`), the honest size accounting (:func:`true_bits_per_weight`,
:func:`paper_weight_bits`) and the check of stored tensors against them
(:func:`validate`). How values become those bits and back is
:mod:`vllm_sab.format.codec`; the checkpoint's ``quantization_config`` and
headers are :mod:`vllm_sab.format.checkpoint`. ``docs/format.md`` is the prose
specification; ``tests/test_format.py`` checks the package against it with an
independent element-by-element implementation.

Summary of one quantized linear ``W`` of shape ``[N, K]`` (``N`` outputs, ``K``
inputs), block size ``B`` (input columns per scale block), ``nb = K / B``:

==================  ===========  ==========================  ==========================
suffix              dtype        shape                       present when
==================  ===========  ==========================  ==========================
``weight_packed``   int32        ``[N, K/32]``               always (sign plane 0)
``weight_zone``     int32        ``[N, zone_bits, K/32]``    ``zone_bits > 0``
``weight_residual`` uint8        ``[N, nb, ceil(s/8)]``      ``s > 0`` (sign plane 1)
``weight_perm``     int16        ``[K]``                     ``0 < s < B``
``weight_scale``    float16 [*]  ``[N, nb, T]``              always (row scales)
``weight_col_scale`` float16     ``[T, K]``                  ``col_scale``
``weight_offset``   float16      ``[N, nb, Z]``              ``offset``
==================  ===========  ==========================  ==========================

[*] float8_e4m3fn when the profile's ``scale_dtype`` says so (only with ``col_scale``).

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
per-zone mean (arXiv 2402.04291, eq. 6-8) as the offs"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
    torch.float8_e4m3fn: "F8_E4M3",
}

# Row-scale storage dtypes a profile may name (``LayerProfile.scale_dtype``).
SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn}


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
        scale_dtype: storage dtype of the row scales ``weight_scale``: ``"float16"``
            (default) or ``"float8_e4m3fn"`` (half the bits; needs ``col_scale``, whose
            per-column scales carry the magnitude so that the row scales can be
            normalized into e4m3's range). Omitted from :meth:`to_dict` when float16.

    Raises:
        FormatError: on an inconsistent combination.
    """

    block_size: int = 128
    zone_bits: int = 0
    salient: int = 0
    salient_zoned: bool = False
    col_scale: bool = False
    offset: bool = False
    scale_dtype: str = "float16"

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
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.scale_dtype != "float16" and not self.col_scale:
            raise FormatError(f"scale_dtype {self.scale_dtype!r} needs col_scale (the column scales carry the magnitude)")

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
        if self.scale_dtype == "float8_e4m3fn":
            parts.append("e4m3")
        return "-".join(parts)

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        """torch dtype of ``weight_scale``."""
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``profiles`` entries of ``quantization_config``); the
        default ``scale_dtype`` is left out, so float16 profiles read as before."""
        d = asdict(self)
        if d["scale_dtype"] == "float16":
            del d["scale_dtype"]
        return d

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
    specs[SCALE] = TensorSpec(profile.scale_torch_dtype, (n, nb, profile.num_slots), 0, 1, b)
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
    return sum(_stored_bits(profile, n, k).values()) / (n * k)


def bits_by_tensor(profile: LayerProfile, n: int, k: int) -> dict[str, float]:
    """Where a layer's bits go: ``{suffix: stored bits of that tensor / (n * k)}``.

    The values sum to :func:`true_bits_per_weight`; suffixes in :func:`tensor_specs`
    order (``weight_packed`` = sign plane 0, ``weight_zone`` = zone planes,
    ``weight_residual`` = plane 1 with padding, ``weight_perm``, ``weight_scale`` = row
    scales, ``weight_col_scale``, ``weight_offset``).

    Raises:
        FormatError: as :func:`tensor_specs`.
    """
    return {suffix: bits / (n * k) for suffix, bits in _stored_bits(profile, n, k).items()}


def _stored_bits(profile: LayerProfile, n: int, k: int) -> dict[str, int]:
    """``{suffix: stored bits}`` of a layer (integers, so sums are exact)."""
    return {
        suffix: math.prod(spec.shape) * torch.tensor([], dtype=spec.dtype).element_size() * 8
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
# Validation
# ---------------------------------------------------------------------------------------
def _check_perm(perm: torch.Tensor, block_size: int, where: str) -> None:
    """Raise FormatError unless every block of ``perm`` (int ``[K]``) is a permutation of ``0..B-1``."""
    blocks = perm.to(torch.int64).view(-1, block_size)
    want = torch.arange(block_size, device=perm.device)
    if not bool((blocks.sort(dim=1).values == want).all()):
        bad = int((blocks.sort(dim=1).values != want).any(dim=1).nonzero()[0])
        raise FormatError(
            f"{where}: {PERM} block {bad} is not a permutation of 0..{block_size - 1}"
        )


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
            if name in tensors and not bool(torch.isfinite(tensors[name].float()).all()):
                raise FormatError(f"{where}.{name}: contains NaN or Inf")


def _dtype_name(dtype: Any) -> str:
    """safetensors-style name (``I32``, ``F16``...) of a torch dtype or header string."""
    if isinstance(dtype, str):
        return dtype.upper()
    return SAFETENSORS_DTYPE.get(dtype, str(dtype).replace("torch.", ""))

