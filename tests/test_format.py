"""Tests of ``vllm_sab/format/`` (the ``vllm_sab.format`` package) against ``docs/format.md`` (format v1).

The reference functions below (``ref_*``) are written from the document only, element by
element with plain Python loops: bit extraction (section 3.2), zones and slots (3.3), the
float32 dequantization formula in its evaluation order (3.4) and the column permutation
(3.1). Float32 arithmetic is done with numpy ``float32`` scalars, so every product and sum
is rounded to float32 exactly as the document prescribes; results are compared with
``torch.equal`` (bit-exact, no tolerance).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vllm_sab import format as fmt

P = fmt.LayerProfile
F32 = np.float32

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

# Suffixes of section 3 and which ones are indexed by output rows (the others, weight_perm
# and weight_col_scale, are "replicated over N").
SUFFIXES = (
    "weight_packed",
    "weight_zone",
    "weight_residual",
    "weight_perm",
    "weight_scale",
    "weight_col_scale",
    "weight_offset",
)
ROW_INDEXED = {"weight_packed", "weight_zone", "weight_residual", "weight_scale", "weight_offset"}
HEADER_DTYPE = {"weight_packed": "I32", "weight_zone": "I32", "weight_residual": "U8", "weight_perm": "I16",
                "weight_scale": "F16", "weight_col_scale": "F16", "weight_offset": "F16"}


# ---------------------------------------------------------------------------------------
# Reference implementation of docs/format.md (independent of vllm_sab.format)
# ---------------------------------------------------------------------------------------
def ref_counts(p: fmt.LayerProfile) -> dict[str, int]:
    """Derived counts of section 2: G, n_ns, n_s, Z, T."""
    B, s = p.block_size, p.salient
    G = 2 ** p.zone_bits
    n_ns = G if s < B else 0
    n_s = 0 if s == 0 else (G if p.salient_zoned else 1)
    Z = n_ns + n_s
    return {"G": G, "n_ns": n_ns, "n_s": n_s, "Z": Z, "T": Z + n_s}


def ref_specs(p: fmt.LayerProfile, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Table of section 3: ``{suffix: (dtype, shape)}`` of the tensors present for ``p``."""
    B, s = p.block_size, p.salient
    nb = k // B
    cnt = ref_counts(p)
    out = {"weight_packed": (torch.int32, (n, k // 32))}
    if p.zone_bits > 0:
        out["weight_zone"] = (torch.int32, (n, p.zone_bits, k // 32))
    if s > 0:
        out["weight_residual"] = (torch.uint8, (n, nb, -(-s // 8)))
    if 0 < s < B:
        out["weight_perm"] = (torch.int16, (k,))
    out["weight_scale"] = (torch.float16, (n, nb, cnt["T"]))
    if p.col_scale:
        out["weight_col_scale"] = (torch.float16, (cnt["T"], k))
    if p.offset:
        out["weight_offset"] = (torch.float16, (n, nb, cnt["Z"]))
    return out


def _to_int32(v: int) -> int:
    """Reinterpret an unsigned 32-bit value as a two's-complement int32."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _bit(word: int, i: int) -> int:
    """Bit ``i`` (value ``1 << i``) of a stored int32/uint8 word given as a Python int."""
    return ((word & 0xFFFFFFFF) >> i) & 1


def ref_pack(c: fmt.BinaryComponents) -> dict[str, torch.Tensor]:
    """Section 3.2 packing, one bit at a time, from components in stored order."""
    p = c.profile
    n, k = c.signs.shape
    B, s, nb = p.block_size, p.salient, k // p.block_size
    signs = c.signs.tolist()
    packed = [[_to_int32(sum(1 << i for i in range(32) if signs[r][32 * w + i] == 1)) for w in range(k // 32)]
              for r in range(n)]
    out = {"weight_packed": torch.tensor(packed, dtype=torch.int32).view(n, k // 32)}
    if p.zone_bits:
        zone = c.zone.tolist()
        planes = [[[_to_int32(sum(((zone[r][32 * w + i] >> pl) & 1) << i for i in range(32)))
                    for w in range(k // 32)] for pl in range(p.zone_bits)] for r in range(n)]
        out["weight_zone"] = torch.tensor(planes, dtype=torch.int32).view(n, p.zone_bits, k // 32)
    if s:
        res = c.residual.tolist()
        nbytes = -(-s // 8)
        data = [[[sum(1 << i for i in range(8) if 8 * j + i < s and res[r][b][8 * j + i] == 1)
                  for j in range(nbytes)] for b in range(nb)] for r in range(n)]
        out["weight_residual"] = torch.tensor(data, dtype=torch.uint8).view(n, nb, nbytes)
    if 0 < s < B:
        out["weight_perm"] = torch.tensor(c.perm.tolist(), dtype=torch.int16)
    out["weight_scale"] = c.scale.clone()
    if p.col_scale:
        out["weight_col_scale"] = c.col_scale.clone()
    if p.offset:
        out["weight_offset"] = c.offset.clone()
    return out


def ref_dequantize(t: dict[str, torch.Tensor], p: fmt.LayerProfile) -> torch.Tensor:
    """Sections 3.1-3.4: dense ``W_hat`` float32 from stored tensors, element by element."""
    B, s, zb = p.block_size, p.salient, p.zone_bits
    cnt = ref_counts(p)
    n_ns, Z = cnt["n_ns"], cnt["Z"]
    packed = t["weight_packed"].tolist()
    n, k = len(packed), len(packed[0]) * 32
    zone = t["weight_zone"].tolist() if zb else None
    resid = t["weight_residual"].tolist() if s else None
    perm = t["weight_perm"].tolist() if "weight_perm" in t else None
    # float16 -> float32 is exact; Python floats then hold the exact float32 values.
    a_r = t["weight_scale"].float().tolist()
    a_c = t["weight_col_scale"].float().tolist() if p.col_scale else None
    mu = t["weight_offset"].float().tolist() if p.offset else None
    out = [[float("nan")] * k for _ in range(n)]
    for r in range(n):
        for j in range(k):
            b, c = divmod(j, B)
            w, i = divmod(j, 32)
            b0 = _bit(packed[r][w], i)
            g = sum(_bit(zone[r][pl][w], i) << pl for pl in range(zb)) if zb else 0
            if c >= s:
                z = g
                t0 = z
                t1 = None
            else:
                z = n_ns + (g if p.salient_zoned else 0)
                t0 = z
                t1 = Z + z - n_ns
            ac0 = F32(a_c[t0][j]) if a_c is not None else F32(1.0)
            val = (F32(a_r[r][b][t0]) * ac0) * F32(2 * b0 - 1)
            if t1 is not None:
                b1 = _bit(resid[r][b][c // 8], c % 8)
                ac1 = F32(a_c[t1][j]) if a_c is not None else F32(1.0)
                val = val + (F32(a_r[r][b][t1]) * ac1) * F32(2 * b1 - 1)
            if mu is not None:
                val = val + F32(mu[r][b][z])
            assert isinstance(val, np.float32)
            idx = B * b + (perm[j] if perm is not None else c)
            out[r][idx] = float(val)
    return torch.tensor(out, dtype=torch.float32).view(n, k)


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------------------------------
# Random components
# ---------------------------------------------------------------------------------------
def make_components(p: fmt.LayerProfile, n: int, k: int, seed: int) -> fmt.BinaryComponents:
    """Random valid components; scales include zeros and negatives, offsets random."""
    g = torch.Generator().manual_seed(seed)
    B, nb = p.block_size, k // p.block_size
    cnt = ref_counts(p)

    def signs(*shape: int) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(torch.int8)

    def halves(*shape: int) -> torch.Tensor:
        v = torch.randn(shape, generator=g) * 3
        v[torch.rand(shape, generator=g) < 0.1] = 0.0  # pruned zones
        return v.half()

    return fmt.BinaryComponents(
        profile=p,
        signs=signs(n, k),
        scale=halves(n, nb, cnt["T"]),
        zone=torch.randint(0, cnt["G"], (n, k), generator=g).to(torch.uint8) if p.zone_bits else None,
        residual=signs(n, nb, p.salient) if p.salient else None,
        perm=torch.cat([torch.randperm(B, generator=g) for _ in range(nb)]) if 0 < p.salient < B else None,
        col_scale=halves(cnt["T"], k) if p.col_scale else None,
        offset=halves(n, nb, cnt["Z"]) if p.offset else None,
    )


@st.composite
def components(draw, max_n: int = 40) -> fmt.BinaryComponents:
    """Hypothesis strategy: random profile (every optional part) and random layer."""
    B = draw(st.sampled_from([32, 64, 128]))
    nb = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    zb = draw(st.integers(0, 2))
    s = draw(st.one_of(st.sampled_from([0, 1, 5, 8, 9, 13, B - 1, B]), st.integers(0, B)))
    zoned = draw(st.booleans()) if zb > 0 and s > 0 else False
    p = P(block_size=B, zone_bits=zb, salient=s, salient_zoned=zoned,
          col_scale=draw(st.booleans()), offset=draw(st.booleans()))
    return make_components(p, n, nb * B, draw(st.integers(0, 2**31 - 1)))


# A fixed list covering every optional part (used where hypothesis would be too slow).
PROFILES = [
    P(block_size=32),
    P(block_size=32, offset=True),
    P(block_size=64, zone_bits=1, col_scale=True),
    P(block_size=32, zone_bits=1, salient=5, offset=True),  # BiLLM, s not a multiple of 8
    P(block_size=64, zone_bits=1, salient=8, salient_zoned=True, offset=True),  # ARB-X + CGB
    P(block_size=64, zone_bits=1, salient=13, salient_zoned=True, col_scale=True),  # ARB-RC + CGB
    P(block_size=32, zone_bits=2, salient=31, salient_zoned=True, col_scale=True, offset=True),
    P(block_size=32, salient=32, offset=True),  # 2-bit uniform
    P(block_size=64, zone_bits=2, salient=64, salient_zoned=True, col_scale=True),
    P(block_size=32, zone_bits=2, salient=32, col_scale=True, offset=True),  # s == B, not zoned
    P(block_size=128, zone_bits=2, salient=1, col_scale=True, offset=True),
]
PROFILE_IDS = [p.key for p in PROFILES]


# ---------------------------------------------------------------------------------------
# 1. Reference implementation vs vllm_sab.format
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", PROFILES, ids=PROFILE_IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_matches_reference(p, seed):
    """dequantize(pack(c)) equals the element-by-element spec reference bit for bit."""
    n, k = 3, 2 * p.block_size
    c = make_components(p, n, k, seed)
    packed = fmt.pack(c)
    ref = ref_dequantize(packed, p)
    assert not torch.isnan(ref).any(), "reference: weight_perm must write every column once"
    got = fmt.dequantize(packed, p)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got, ref)
    assert torch.equal(fmt.compose(c), ref)


@pytest.mark.parametrize("p", PROFILES, ids=PROFILE_IDS)
def test_pack_matches_reference_bits(p):
    """pack() writes exactly the words/bytes of section 3.2 (LSB first, padding 0)."""
    c = make_components(p, 4, 3 * p.block_size, 7)
    got, want = fmt.pack(c), ref_pack(c)
    assert list(got) == [s for s in SUFFIXES if s in want]
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    # The reference dequantizer on the reference packing gives compose() too.
    assert torch.equal(fmt.compose(c), ref_dequantize(want, p))


@settings(max_examples=40, **HYPOTHESIS)
@given(components(max_n=6))
def test_dequantize_matches_reference_property(c):
    """Property: dequantize(pack(c)) equals the spec reference for random profiles/shapes."""
    packed = fmt.pack(c)
    assert torch.equal(fmt.dequantize(packed, c.profile), ref_dequantize(packed, c.profile))


# ---------------------------------------------------------------------------------------
# 2. Property tests
# ---------------------------------------------------------------------------------------
@settings(max_examples=80, **HYPOTHESIS)
@given(components())
def test_pack_roundtrip_property(c):
    """pack -> unpack returns every component exactly; shapes/dtypes/bits follow the spec."""
    p = c.profile
    n, k = c.shape
    packed = fmt.pack(c, where="m")

    # Tensor names, dtypes and shapes: fmt.tensor_specs and the section 3 table.
    specs = fmt.tensor_specs(p, n, k)
    want = ref_specs(p, n, k)
    assert list(packed) == list(specs)
    assert set(packed) == set(want)
    for name, t in packed.items():
        assert (t.dtype, tuple(t.shape)) == (specs[name].dtype, specs[name].shape), name
        assert (t.dtype, tuple(t.shape)) == want[name], name
        assert t.is_contiguous(), name

    # Round trip.
    u = fmt.unpack(packed, p, "m")
    assert u.profile == p
    for name in ("signs", "scale", "zone", "residual", "perm", "col_scale", "offset"):
        a, b = getattr(c, name), getattr(u, name)
        if a is None:
            assert b is None, name
        else:
            assert b is not None and b.dtype == a.dtype and torch.equal(a, b), name

    # Dequantization.
    assert torch.equal(fmt.dequantize(packed, p), fmt.compose(c))

    # Size accounting (section 4), from the actual tensors.
    assert fmt.true_bits_per_weight(p, n, k) == 8 * nbytes(packed) / (n * k)
    assert fmt.paper_weight_bits(p) == 1 + p.salient / p.block_size


@settings(max_examples=60, **HYPOTHESIS)
@given(components(max_n=12), st.data())
def test_split_rows_property(c, data):
    """split_rows then pack equals pack then row-split; K-indexed tensors are shared."""
    n = c.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    parts = c.split_rows(sizes)
    assert len(parts) == len(sizes)
    whole = fmt.pack(c)
    w_hat = fmt.compose(c)
    row = 0
    for size, part in zip(sizes, parts):
        assert part.shape == (size, c.shape[1]) and part.profile == c.profile
        if size == 0:
            continue
        packed = fmt.pack(part)
        assert list(packed) == list(whole)
        for name, t in packed.items():
            if name in ROW_INDEXED:
                assert torch.equal(t, whole[name][row:row + size]), name
            else:
                assert torch.equal(t, whole[name]), name
        assert torch.equal(fmt.compose(part), w_hat[row:row + size])
        row += size


def test_split_rows_bad_sizes():
    """split_rows rejects sizes that do not sum to N."""
    c = make_components(PROFILES[5], 6, 64, 0)
    with pytest.raises(fmt.FormatError, match="N=6"):
        c.split_rows([2, 3])


@pytest.mark.parametrize("p", PROFILES, ids=PROFILE_IDS)
def test_k_block_sharding(p):
    """Packing a block range of columns equals slicing the packed tensors along their K dim."""
    n, nb = 3, 3
    B = p.block_size
    k = nb * B
    c = make_components(p, n, k, 3)
    whole = fmt.pack(c)
    b0, b1 = 1, 3
    lo, hi = b0 * B, b1 * B

    def cols(t):
        return None if t is None else t[..., lo:hi].contiguous()

    part = fmt.BinaryComponents(
        profile=p, signs=cols(c.signs), scale=c.scale[:, b0:b1].contiguous(), zone=cols(c.zone),
        residual=None if c.residual is None else c.residual[:, b0:b1].contiguous(),
        perm=cols(c.perm), col_scale=cols(c.col_scale),
        offset=None if c.offset is None else c.offset[:, b0:b1].contiguous(),
    )
    packed = fmt.pack(part)
    specs = fmt.tensor_specs(p, n, k)
    for name, t in packed.items():
        spec = specs[name]
        assert spec.k_unit in (1, 32, B)
        sl = [slice(None)] * t.dim()
        sl[spec.k_dim] = slice(lo // spec.k_unit, hi // spec.k_unit)
        assert torch.equal(t, whole[name][tuple(sl)]), name
    assert torch.equal(fmt.compose(part), fmt.compose(c)[:, lo:hi])


def test_tensor_spec_sharding_dims():
    """TensorSpec n_dim/k_dim/k_unit follow the 'shards along' column of section 3."""
    p = P(block_size=64, zone_bits=2, salient=5, salient_zoned=True, col_scale=True, offset=True)
    specs = fmt.tensor_specs(p, 8, 128)
    got = {name: (s.n_dim, s.k_dim, s.k_unit) for name, s in specs.items()}
    assert got == {
        "weight_packed": (0, 1, 32),
        "weight_zone": (0, 2, 32),
        "weight_residual": (0, 1, 64),
        "weight_perm": (None, 0, 1),
        "weight_scale": (0, 1, 64),
        "weight_col_scale": (None, 1, 1),
        "weight_offset": (0, 1, 64),
    }


def test_suffixes_avoid_vllm_reserved_names():
    """No tensor suffix ends in g_idx/k_scale/v_scale/q_scale; the suffix list is section 3's."""
    assert tuple(fmt.ALL_SUFFIXES) == SUFFIXES
    for s in fmt.ALL_SUFFIXES:
        assert not s.endswith(("g_idx", "k_scale", "v_scale", "q_scale")), s


@pytest.mark.parametrize("B", [32, 64, 128, 96])
def test_derived_counts(B):
    """LayerProfile's G, zone and slot counts follow section 2 for every valid combination."""
    for zb in range(3):
        for s in sorted({0, 1, 8, B - 1, B}):
            for zoned in ([False, True] if zb and s else [False]):
                p = P(block_size=B, zone_bits=zb, salient=s, salient_zoned=zoned)
                cnt = ref_counts(p)
                assert p.num_groups == cnt["G"]
                assert p.num_nonsalient_zones == cnt["n_ns"]
                assert p.num_salient_zones == cnt["n_s"]
                assert p.num_zones == cnt["Z"]
                assert p.num_slots == cnt["T"]
                assert p.residual_bytes == -(-s // 8)
                assert p.has_perm == (0 < s < B)


# ---------------------------------------------------------------------------------------
# 3. Fixed, hand-checked examples
# ---------------------------------------------------------------------------------------
def _one_row(signs_plus: set[int], k: int = 32) -> torch.Tensor:
    return torch.tensor([[1 if j in signs_plus else -1 for j in range(k)]], dtype=torch.int8)


@pytest.mark.parametrize(
    "plus, word",
    [
        (set(), 0),
        ({0}, 1),
        ({0, 2}, 5),
        ({1, 31}, -2147483646),  # 2 + 2**31 as int32
        ({31}, -2147483648),
        (set(range(32)), -1),
    ],
)
def test_packed_word_known_values(plus, word):
    """A 1x32 sign layer packs to a known int32 word (LSB = column 0, bit 31 -> negative)."""
    p = P(block_size=32)
    c = fmt.BinaryComponents(profile=p, signs=_one_row(plus), scale=torch.tensor([[[0.5]]], dtype=torch.float16))
    packed = fmt.pack(c)
    assert packed["weight_packed"].dtype == torch.int32
    assert packed["weight_packed"].tolist() == [[word]]
    expected = torch.tensor([[0.5 if j in plus else -0.5 for j in range(32)]])
    assert torch.equal(fmt.dequantize(packed, p), expected)
    # Reading a hand-written word gives the same signs.
    u = fmt.unpack({"weight_packed": torch.tensor([[word]], dtype=torch.int32),
                    "weight_scale": torch.tensor([[[0.5]]], dtype=torch.float16)}, p)
    assert torch.equal(u.signs, _one_row(plus))


def test_zone_planes_known_words():
    """Zone index g = j % 4 packs to planes 0xAAAAAAAA and 0xCCCCCCCC (as int32)."""
    p = P(block_size=32, zone_bits=2)
    c = fmt.BinaryComponents(
        profile=p, signs=_one_row(set()), scale=torch.ones(1, 1, 4, dtype=torch.float16),
        zone=torch.tensor([[j % 4 for j in range(32)]], dtype=torch.uint8),
    )
    packed = fmt.pack(c)
    assert packed["weight_zone"].tolist() == [[[_to_int32(0xAAAAAAAA)], [_to_int32(0xCCCCCCCC)]]]
    assert packed["weight_zone"].tolist() == [[[-1431655766], [-858993460]]]


def test_residual_bytes_known_values():
    """Residual of s=10: +1 at salient positions 0, 3, 9 -> bytes [0b1001, 0b10]; padding 0."""
    p = P(block_size=32, salient=10)
    res = torch.full((1, 1, 10), -1, dtype=torch.int8)
    res[0, 0, [0, 3, 9]] = 1
    c = fmt.BinaryComponents(
        profile=p, signs=_one_row(set()), scale=torch.ones(1, 1, 3, dtype=torch.float16),
        residual=res, perm=torch.arange(32),
    )
    packed = fmt.pack(c)
    assert packed["weight_residual"].dtype == torch.uint8
    assert packed["weight_residual"].tolist() == [[[9, 2]]]


def test_residual_padding_bits_ignored():
    """Padding bits of weight_residual (positions >= s) are ignored when read."""
    p = P(block_size=32, zone_bits=1, salient=10, salient_zoned=True, col_scale=True, offset=True)
    c = make_components(p, 5, 64, 11)
    packed = fmt.pack(c)
    dirty = dict(packed)
    dirty["weight_residual"] = packed["weight_residual"] | torch.tensor([0, 0b11111100], dtype=torch.uint8)
    assert not torch.equal(dirty["weight_residual"], packed["weight_residual"])
    assert torch.equal(fmt.dequantize(dirty, p), fmt.dequantize(packed, p))
    assert torch.equal(fmt.unpack(dirty, p).residual, c.residual)


def test_zone_of_unzoned_salient_positions_ignored():
    """Without salient_zoned, zone bits at salient positions do not change the weights."""
    p = P(block_size=32, zone_bits=2, salient=6, offset=True, col_scale=True)
    c = make_components(p, 4, 64, 5)
    z2 = c.zone.clone()
    z2.view(4, 2, 32)[:, :, :6] = (z2.view(4, 2, 32)[:, :, :6] + 1) % 4
    c2 = fmt.BinaryComponents(p, c.signs, c.scale, z2, c.residual, c.perm, c.col_scale, c.offset)
    assert not torch.equal(fmt.pack(c2)["weight_zone"], fmt.pack(c)["weight_zone"])
    assert torch.equal(fmt.dequantize(fmt.pack(c2), p), fmt.dequantize(fmt.pack(c), p))


def test_hand_computed_layer():
    """A 1x32 BiLLM-style layer (zones, 2 salient columns, offset, perm) dequantizes as worked out by hand."""
    # G=2, n_ns=2, n_s=1, Z=3, T=4: slots 0,1 = non-salient zones 0,1; slot 2 = salient
    # zone plane 0; slot 3 = salient zone plane 1.
    p = P(block_size=32, zone_bits=1, salient=2, offset=True)
    perm = [5, 3] + [c for c in range(32) if c not in (5, 3)]  # stored 0 -> orig 5, stored 1 -> orig 3
    signs = [1, -1] + [1] + [-1] * 29  # stored col 2 (orig 0) is +1
    zone = [1, 1, 1] + [0] * 29  # salient zone bits are ignored (not salient_zoned)
    c = fmt.BinaryComponents(
        profile=p,
        signs=torch.tensor([signs], dtype=torch.int8),
        scale=torch.tensor([[[1.0, 2.0, 4.0, 8.0]]], dtype=torch.float16),
        zone=torch.tensor([zone], dtype=torch.uint8),
        residual=torch.tensor([[[-1, 1]]], dtype=torch.int8),
        perm=torch.tensor(perm),
        offset=torch.tensor([[[0.25, 0.5, 0.125]]], dtype=torch.float16),
    )
    expected = [-0.75] * 32  # zone 0, sign -1: -1 + 0.25
    expected[5] = 4 * 1 + 8 * -1 + 0.125  # -3.875
    expected[3] = 4 * -1 + 8 * 1 + 0.125  # 4.125
    expected[0] = 2 * 1 + 0.5  # zone 1, sign +1: 2.5
    w = fmt.dequantize(fmt.pack(c), p)
    assert w.tolist() == [expected]
    assert torch.equal(ref_dequantize(fmt.pack(c), p), w)


def test_float32_evaluation_order():
    """The formula is evaluated in float32 in the spec's order: ((t0 + t1) + mu), not float64."""
    # n_ns = 0, Z = 1, T = 2 (s == B). t0 = 1024 * 1 * (+1), t1 = 2^-14 * 2^-10 * (+-1) = +-2^-24,
    # mu = -1024. float32: 1024 +- 2^-24 rounds to 1024, then + mu = 0. Float64, or adding mu
    # before t1, would give +-2^-24.
    p = P(block_size=32, salient=32, col_scale=True, offset=True)
    res = torch.tensor([[[1, -1] * 16]], dtype=torch.int8)
    c = fmt.BinaryComponents(
        profile=p,
        signs=torch.ones(1, 32, dtype=torch.int8),
        scale=torch.tensor([[[1024.0, 2.0**-14]]], dtype=torch.float16),
        residual=res,
        col_scale=torch.tensor([[1.0] * 32, [2.0**-10] * 32], dtype=torch.float16),
        offset=torch.tensor([[[-1024.0]]], dtype=torch.float16),
    )
    w = fmt.dequantize(fmt.pack(c), p)
    assert w.tolist() == [[0.0] * 32]
    assert torch.equal(ref_dequantize(fmt.pack(c), p), w)
    # Sanity of the construction: without float32 rounding the result is not 0.
    assert (1024.0 + 2.0**-24) - 1024.0 != 0.0


def test_true_bits_sign_profile():
    """Sign profile b128-z0: 1.125 true bits/weight, 1.0 paper bits (section 4 table)."""
    p = P(block_size=128)
    assert p.key == "b128-z0"
    assert fmt.true_bits_per_weight(p, 4096, 4096) == 1.125
    assert fmt.paper_weight_bits(p) == 1.0


def test_true_bits_arb_rc_cgb_example():
    """ARB-RC + CGB s=8 (b128-z1-s8g-rc) on 4096x4096: 2.83984375 true bits, 1.0625 paper bits."""
    p = P(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
    assert p.key == "b128-z1-s8g-rc"
    n = k = 4096
    # packed 1 + zone 1 + residual 8/128 + perm 16/4096 + scale 6*16/128 + col_scale 6*16/4096
    hand = 1 + 1 + 8 / 128 + 16 / 4096 + 6 * 16 / 128 + 6 * 16 / 4096
    assert hand == 2.83984375
    assert fmt.true_bits_per_weight(p, n, k) == hand
    assert round(fmt.true_bits_per_weight(p, n, k), 4) == 2.8398
    spec_bytes = sum(np.prod(shape) * torch.empty(0, dtype=dt).element_size() for dt, shape in ref_specs(p, n, k).values())
    assert 8 * spec_bytes / (n * k) == hand
    assert fmt.paper_weight_bits(p) == 1.0625


def test_profile_key_examples():
    """LayerProfile.key gives the names used in docs/format.md."""
    assert P(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True, offset=True).key == \
        "b128-z1-s8g-rc-mu"
    assert P(block_size=64, zone_bits=1, salient=5, offset=True).key == "b64-z1-s5-mu"


# ---------------------------------------------------------------------------------------
# 4. Validation errors
# ---------------------------------------------------------------------------------------
FULL = P(block_size=64, zone_bits=1, salient=5, salient_zoned=True, col_scale=True, offset=True)
FN, FK = 3, 128
WHERE = "model.layers.7.mlp.down_proj"


def _full_layer() -> dict[str, torch.Tensor]:
    return fmt.pack(make_components(FULL, FN, FK, 21))


def _raises(tensors, *needles, n=FN, k=FK, p=FULL, **kw) -> str:
    with pytest.raises(fmt.FormatError) as e:
        fmt.validate(tensors, p, n, k, WHERE, **kw)
    msg = str(e.value)
    for s in needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def test_validate_accepts_packed_layer():
    """validate() accepts pack()'s output, and header tuples of it."""
    t = _full_layer()
    fmt.validate(t, FULL, FN, FK, WHERE)
    fmt.validate({k: (list(v.shape), HEADER_DTYPE[k]) for k, v in t.items()}, FULL, FN, FK, WHERE)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_validate_missing_tensor(suffix):
    """A missing tensor is rejected naming module, tensor, expected dtype and shape."""
    t = _full_layer()
    spec = ref_specs(FULL, FN, FK)[suffix]
    del t[suffix]
    _raises(t, WHERE, suffix, HEADER_DTYPE[suffix], str(list(spec[1])))
    with pytest.raises(fmt.FormatError, match="down_proj"):
        fmt.dequantize(t, FULL, WHERE)


def test_validate_unexpected_tensor():
    """An extra tensor (or one the profile does not have) is rejected naming it."""
    t = _full_layer()
    t["weight_g_idx"] = torch.zeros(FK, dtype=torch.int32)
    _raises(t, WHERE, "weight_g_idx")
    p = P(block_size=64, zone_bits=1)  # no salient -> no residual/perm; no col_scale/offset
    t = fmt.pack(make_components(p, FN, FK, 1))
    t["weight_offset"] = torch.zeros(FN, 2, 2, dtype=torch.float16)
    _raises(t, WHERE, "weight_offset", p=p)


@pytest.mark.parametrize("suffix, bad", [
    ("weight_packed", torch.uint8), ("weight_zone", torch.int64), ("weight_residual", torch.int8),
    ("weight_perm", torch.int32), ("weight_scale", torch.float32), ("weight_col_scale", torch.bfloat16),
    ("weight_offset", torch.float32),
])
def test_validate_wrong_dtype(suffix, bad):
    """A wrong dtype is rejected naming module, tensor and the expected dtype."""
    t = _full_layer()
    t[suffix] = t[suffix].to(bad)
    _raises(t, WHERE, suffix, HEADER_DTYPE[suffix])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_validate_wrong_shape(suffix):
    """A wrong shape is rejected naming module, tensor and the expected shape."""
    t = _full_layer()
    good = t[suffix]
    t[suffix] = torch.cat([good, good[..., :1]], dim=-1)
    _raises(t, WHERE, suffix, str(list(good.shape)))


def test_validate_k_not_multiple_of_block():
    """K not a multiple of block_size is rejected naming module, K and block_size."""
    t = _full_layer()
    _raises(t, WHERE, "K=96", "block_size=64", k=96)
    with pytest.raises(fmt.FormatError, match="block_size"):
        fmt.tensor_specs(FULL, 4, 96)


def test_validate_bad_permutation():
    """A weight_perm block that is not a permutation is rejected naming module, tensor and block."""
    t = _full_layer()
    t["weight_perm"] = t["weight_perm"].clone()
    t["weight_perm"][64:66] = t["weight_perm"][64]  # duplicate inside block 1
    _raises(t, WHERE, "weight_perm", "block 1")
    t["weight_perm"] = _full_layer()["weight_perm"].clone()
    t["weight_perm"][0] = 64  # out of range for B=64
    _raises(t, WHERE, "weight_perm", "block 0")
    with pytest.raises(fmt.FormatError, match="weight_perm"):
        fmt.dequantize(t, FULL, WHERE)
    # Header-only checks cannot see values.
    fmt.validate({k: (tuple(v.shape), HEADER_DTYPE[k]) for k, v in t.items()}, FULL, FN, FK, WHERE)
    fmt.validate(t, FULL, FN, FK, WHERE, check_values=False)


@pytest.mark.parametrize("suffix, value", [
    ("weight_scale", float("nan")), ("weight_scale", float("inf")),
    ("weight_col_scale", float("nan")), ("weight_offset", float("-inf")),
])
def test_validate_non_finite_scale(suffix, value):
    """NaN/Inf in scales or offsets is rejected naming module and tensor."""
    t = _full_layer()
    t[suffix] = t[suffix].clone()
    t[suffix].view(-1)[3] = value
    _raises(t, WHERE, suffix, "NaN")


def test_validate_header_only():
    """Header-only validation with (shape, dtype string) tuples checks names, dtypes, shapes."""
    t = {k: (list(v.shape), HEADER_DTYPE[k]) for k, v in _full_layer().items()}
    fmt.validate(t, FULL, FN, FK, WHERE)
    bad = dict(t, weight_scale=(t["weight_scale"][0], "F32"))
    _raises(bad, WHERE, "weight_scale", "F16")
    bad = dict(t, weight_zone=([FN, 2, FK // 32], "I32"))
    _raises(bad, WHERE, "weight_zone", str([FN, 1, FK // 32]))
    bad = dict(t)
    del bad["weight_residual"]
    _raises(bad, WHERE, "weight_residual", "U8", str([FN, 2, 1]))
    _raises(dict(t, weight_k_scale=([1], "F32")), WHERE, "weight_k_scale")


def test_components_check_rejects_bad_fields():
    """pack() rejects components that do not match the profile, naming the field."""
    c = make_components(FULL, FN, FK, 2)
    bad = fmt.BinaryComponents(**{**c.__dict__, "offset": None})
    with pytest.raises(fmt.FormatError, match="offset"):
        fmt.pack(bad, WHERE)
    bad = fmt.BinaryComponents(**{**c.__dict__, "zone": c.zone + 2})
    with pytest.raises(fmt.FormatError, match="zone"):
        fmt.pack(bad, WHERE)
    bad = fmt.BinaryComponents(**{**c.__dict__, "signs": c.signs * 0})
    with pytest.raises(fmt.FormatError, match="signs"):
        fmt.pack(bad, WHERE)
    bad = fmt.BinaryComponents(**{**c.__dict__, "scale": c.scale.float()})
    with pytest.raises(fmt.FormatError, match="scale"):
        fmt.pack(bad, WHERE)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(block_size=48), "block_size"),
    (dict(block_size=16), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=-32), "block_size"),
    (dict(zone_bits=3), "zone_bits"),
    (dict(zone_bits=-1), "zone_bits"),
    (dict(block_size=64, salient=65), "salient"),
    (dict(salient=-1), "salient"),
    (dict(zone_bits=0, salient=8, salient_zoned=True), "salient_zoned"),
    (dict(zone_bits=1, salient=0, salient_zoned=True), "salient_zoned"),
])
def test_layer_profile_invalid(kwargs, needle):
    """LayerProfile rejects invalid combinations of section 2 (direct and via from_dict)."""
    with pytest.raises(fmt.FormatError, match=needle):
        P(**kwargs)
    with pytest.raises(fmt.FormatError) as e:
        P.from_dict(kwargs, "quantization_config.profiles.x")
    assert "quantization_config.profiles.x" in str(e.value) and needle in str(e.value)


def test_layer_profile_from_dict():
    """LayerProfile round-trips through to_dict/from_dict and rejects unknown keys."""
    p = P(block_size=96, zone_bits=2, salient=7, salient_zoned=True, col_scale=True, offset=True)
    assert P.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(fmt.FormatError) as e:
        P.from_dict({**p.to_dict(), "groupsize": 4}, "where.x")
    assert "where.x" in str(e.value) and "groupsize" in str(e.value)


def test_layer_profile_field_types_from_config():
    """A config profile with non-int/non-bool field values (e.g. salient 8.5) is rejected (section 2 types)."""
    for bad in ({"salient": 8.5}, {"block_size": 128.0}, {"zone_bits": True},
                {"col_scale": "false"}, {"offset": 1}):
        d = {**P(block_size=128, zone_bits=1).to_dict(), **bad}
        try:
            got = P.from_dict(d, "qc.profiles.p")
        except fmt.FormatError:
            continue
        raise AssertionError(
            f"BUG in format.LayerProfile: profile field values {bad} are accepted (got {got}); section 2 "
            "types are int (block_size, zone_bits, salient) and bool (salient_zoned, col_scale, offset)"
        )


# ---- SabQuantizationConfig ----------------------------------------------------------------
def _qc_dict() -> dict:
    p = P(block_size=128)
    q = P(block_size=64, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
    return {
        "quant_method": "sab",
        "format_version": 1,
        "method": "arb-rc",
        "block_size": 128,
        "profiles": {p.key: p.to_dict(), q.key: q.to_dict()},
        "modules": {
            "model.language_model.layers.0.self_attn.q_proj": {"profile": p.key, "shape": [256, 128]},
            "model.language_model.layers.0.mlp.down_proj": {"profile": q.key, "shape": [64, 192]},
        },
    }


def test_config_round_trip():
    """SabQuantizationConfig.from_dict/to_dict round-trips, keeping informational keys."""
    d = _qc_dict()
    qc = fmt.SabQuantizationConfig.from_dict(d)
    assert qc.method == "arb-rc" and qc.extra == {"block_size": 128}
    assert qc.modules["model.language_model.layers.0.mlp.down_proj"] == fmt.QuantizedModule("b64-z1-s8g-rc", (64, 192))
    assert qc.profile_of("model.language_model.layers.0.mlp.down_proj") == P(
        block_size=64, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
    out = json.loads(json.dumps(qc.to_dict()))
    assert out == d
    assert fmt.SabQuantizationConfig.from_dict(out) == qc
    with pytest.raises(KeyError):
        qc.profile_of("model.language_model.layers.0.self_attn.o_proj")


def test_config_quant_method_case_insensitive():
    """quant_method "SAB" is accepted (vLLM lower-cases it)."""
    fmt.SabQuantizationConfig.from_dict({**_qc_dict(), "quant_method": "SAB"})


@pytest.mark.parametrize("version", [2, 0, "1", None, 99])
def test_config_unknown_format_version(version):
    """An unknown format_version is rejected with a message naming the version."""
    with pytest.raises(fmt.FormatError) as e:
        fmt.SabQuantizationConfig.from_dict({**_qc_dict(), "format_version": version}, "cfg")
    assert "format_version" in str(e.value) and repr(version) in str(e.value) and "cfg" in str(e.value)


def test_config_format_version_true_rejected():
    """format_version true (JSON boolean) is not the version 1 (section 1: any other value is rejected)."""
    try:
        fmt.SabQuantizationConfig.from_dict({**_qc_dict(), "format_version": True})
    except fmt.FormatError:
        return
    raise AssertionError(
        "BUG in SabQuantizationConfig.from_dict: format_version true is accepted as 1 "
        "(`True in (1,)` is True); only the integer 1 is format v1"
    )


def test_config_wrong_quant_method():
    """quant_method other than sab is rejected."""
    with pytest.raises(fmt.FormatError, match="gptq"):
        fmt.SabQuantizationConfig.from_dict({**_qc_dict(), "quant_method": "gptq"})
    d = _qc_dict()
    del d["quant_method"]
    with pytest.raises(fmt.FormatError, match="quant_method"):
        fmt.SabQuantizationConfig.from_dict(d)


def test_config_unknown_profile_reference():
    """A module referring to a profile that does not exist is rejected naming module and profile."""
    d = _qc_dict()
    d["modules"]["model.language_model.layers.0.mlp.down_proj"]["profile"] = "b64-nope"
    with pytest.raises(fmt.FormatError) as e:
        fmt.SabQuantizationConfig.from_dict(d)
    assert "down_proj" in str(e.value) and "b64-nope" in str(e.value)


@pytest.mark.parametrize("shape", [[64], [64, 100], "64x192", [64, 192, 1], [0, 192], [64.0, 192], None])
def test_config_bad_shape(shape):
    """A module shape that is not [N, K] with K % B == 0 is rejected naming the module."""
    d = _qc_dict()
    d["modules"]["model.language_model.layers.0.mlp.down_proj"]["shape"] = shape
    with pytest.raises(fmt.FormatError, match="down_proj"):
        fmt.SabQuantizationConfig.from_dict(d)


def test_config_bad_profile_entry():
    """An invalid profile entry is rejected naming the profile."""
    d = _qc_dict()
    d["profiles"]["b128-z0"]["zone_bits"] = 3
    with pytest.raises(fmt.FormatError, match="b128-z0"):
        fmt.SabQuantizationConfig.from_dict(d)


# ---------------------------------------------------------------------------------------
# 5. validate_checkpoint
# ---------------------------------------------------------------------------------------
QMOD = "model.language_model.layers.0.mlp.down_proj"
QMOD2 = "model.language_model.layers.0.self_attn.q_proj"
DENSE = "model.language_model.layers.0.self_attn.o_proj"


def _checkpoint_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    d = _qc_dict()
    tensors = {}
    for mod, entry in d["modules"].items():
        p = P.from_dict(d["profiles"][entry["profile"]])
        for suffix, t in fmt.pack(make_components(p, *entry["shape"], 4)).items():
            tensors[f"{mod}.{suffix}"] = t
    tensors[f"{DENSE}.weight"] = torch.zeros(128, 256, dtype=torch.float16)
    tensors[f"{QMOD}.bias"] = torch.zeros(64, dtype=torch.float16)
    tensors["model.language_model.embed_tokens.weight"] = torch.zeros(10, 128, dtype=torch.float16)
    return tensors, d


def _write(folder: Path, tensors: dict[str, torch.Tensor], qc: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for i in range(shards):
        part = {name: tensors[name].contiguous() for name in names[i::shards]}
        save_file(part, str(folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    cfg = {"model_type": "qwen3_vl", "architectures": ["X"], "quantization_config": qc}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _ckpt_raises(tmp_path: Path, tensors, qc, *needles) -> str:
    folder = _write(tmp_path / "ckpt", tensors, qc)
    with pytest.raises(fmt.FormatError) as e:
        fmt.validate_checkpoint(folder)
    msg = str(e.value)
    for s in needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("shards", [1, 2])
def test_validate_checkpoint_ok(tmp_path, shards):
    """A correct checkpoint (one or several safetensors files) passes and returns its config."""
    tensors, qc = _checkpoint_tensors()
    folder = _write(tmp_path / "ckpt", tensors, qc, shards)
    got = fmt.validate_checkpoint(folder)
    assert got == fmt.SabQuantizationConfig.from_dict(qc)
    headers = fmt.read_safetensors_headers(folder)
    assert headers[f"{QMOD}.weight_packed"] == ((64, 192 // 32), "I32")
    assert headers[f"{QMOD}.weight_perm"] == ((192,), "I16")


def test_validate_checkpoint_missing_tensor(tmp_path):
    """A missing tensor of a listed module is rejected naming module and tensor."""
    tensors, qc = _checkpoint_tensors()
    del tensors[f"{QMOD}.weight_residual"]
    _ckpt_raises(tmp_path, tensors, qc, QMOD, "weight_residual")


def test_validate_checkpoint_wrong_shape(tmp_path):
    """A wrong shape is rejected naming module, tensor and expected shape."""
    tensors, qc = _checkpoint_tensors()
    tensors[f"{QMOD2}.weight_scale"] = torch.zeros(256, 1, 2, dtype=torch.float16)
    _ckpt_raises(tmp_path, tensors, qc, QMOD2, "weight_scale", "[256, 1, 1]")


def test_validate_checkpoint_wrong_dtype(tmp_path):
    """A wrong dtype is rejected naming module, tensor and expected dtype."""
    tensors, qc = _checkpoint_tensors()
    tensors[f"{QMOD}.weight_col_scale"] = tensors[f"{QMOD}.weight_col_scale"].float()
    _ckpt_raises(tmp_path, tensors, qc, QMOD, "weight_col_scale", "F16")


def test_validate_checkpoint_dense_weight_of_listed_module(tmp_path):
    """A listed module that also stores a dense .weight is rejected naming it."""
    tensors, qc = _checkpoint_tensors()
    tensors[f"{QMOD2}.weight"] = torch.zeros(256, 128, dtype=torch.float16)
    _ckpt_raises(tmp_path, tensors, qc, QMOD2, f"{QMOD2}.weight")


def test_validate_checkpoint_unlisted_sab_tensors(tmp_path):
    """sab tensors of a module not listed in quantization_config.modules are rejected."""
    tensors, qc = _checkpoint_tensors()
    tensors[f"{DENSE}.weight_packed"] = torch.zeros(128, 8, dtype=torch.int32)
    _ckpt_raises(tmp_path, tensors, qc, DENSE, "weight_packed")


def test_validate_checkpoint_listed_module_without_tensors(tmp_path):
    """A listed module with none of its tensors (stored dense under another name) is rejected."""
    tensors, qc = _checkpoint_tensors()
    qc["modules"][DENSE] = {"profile": "b128-z0", "shape": [128, 256]}
    del tensors[f"{DENSE}.weight"]
    _ckpt_raises(tmp_path, tensors, qc, DENSE, "weight_packed")


def test_validate_checkpoint_bad_config(tmp_path):
    """An unknown format_version in config.json is rejected naming the version and file."""
    tensors, qc = _checkpoint_tensors()
    _ckpt_raises(tmp_path, tensors, {**qc, "format_version": 7}, "format_version", "7", "config.json")


def test_validate_checkpoint_no_quantization_config(tmp_path):
    """A folder without quantization_config or without safetensors is rejected."""
    tensors, qc = _checkpoint_tensors()
    folder = _write(tmp_path / "a", tensors, qc)
    (folder / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(fmt.FormatError, match="quantization_config"):
        fmt.validate_checkpoint(folder)
    empty = tmp_path / "b"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"quantization_config": qc}))
    with pytest.raises(fmt.FormatError, match="safetensors"):
        fmt.validate_checkpoint(empty)


def test_bits_by_tensor_splits_the_true_bits():
    """Per-tensor bits: independent arithmetic for sign and ARB-RC profiles, summing to the true bits."""
    p = fmt.LayerProfile(block_size=128)
    assert fmt.bits_by_tensor(p, 4096, 4096) == {"weight_packed": 1.0, "weight_scale": 16 / 128}
    q = fmt.LayerProfile(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
    got = fmt.bits_by_tensor(q, 4096, 4096)
    t = 6  # slots: 2 non-salient + 2 salient zones, plus plane 1 of the 2 salient zones
    want = {"weight_packed": 1.0, "weight_zone": 1.0, "weight_residual": 8 / 128, "weight_perm": 16 / 4096,
            "weight_scale": t * 16 / 128, "weight_col_scale": t * 16 / 4096}
    assert got == pytest.approx(want)
    assert sum(got.values()) == pytest.approx(fmt.true_bits_per_weight(q, 4096, 4096))


FP8 = P(block_size=64, zone_bits=1, salient=8, salient_zoned=True, col_scale=True, scale_dtype="float8_e4m3fn")


def test_float8_row_scales_profile():
    """scale_dtype float8_e4m3fn: spec dtype, key, config round trip, exact bits saved, rules."""
    n, k = 40, 192
    assert FP8.key == "b64-z1-s8g-rc-e4m3"
    assert fmt.tensor_specs(FP8, n, k)[fmt.SCALE].dtype == torch.float8_e4m3fn
    assert P.from_dict(FP8.to_dict()) == FP8 and FP8.to_dict()["scale_dtype"] == "float8_e4m3fn"
    assert "scale_dtype" not in P(block_size=64).to_dict()  # float16 profiles read as before
    half = dataclasses.replace(FP8, scale_dtype="float16")
    saved = fmt.true_bits_per_weight(half, n, k) - fmt.true_bits_per_weight(FP8, n, k)
    assert saved == pytest.approx(8 * FP8.num_slots / FP8.block_size)  # 8 of 16 bits per row scale
    with pytest.raises(fmt.FormatError, match="needs col_scale"):
        P(block_size=64, scale_dtype="float8_e4m3fn")
    with pytest.raises(fmt.FormatError, match="scale_dtype must be one of"):
        P(block_size=64, col_scale=True, scale_dtype="bfloat16")


def test_float8_row_scales_dequantize_and_checkpoint(tmp_path):
    """The element-wise reference reads e4m3 row scales; safetensors keeps them as F8_E4M3;
    validation finds a NaN among them (e4m3fn has NaN but no Inf)."""
    from test_kernels import random_components

    n, k = 24, 128
    c = random_components(FP8, n, k, seed=3)
    t = fmt.pack(c)
    assert t[fmt.SCALE].dtype == torch.float8_e4m3fn
    assert torch.equal(fmt.dequantize(t, FP8), ref_dequantize(t, FP8))
    mod = "model.language_model.layers.0.mlp.down_proj"
    qc = {"quant_method": "sab", "format_version": 1, "profiles": {FP8.key: FP8.to_dict()},
          "modules": {mod: {"profile": FP8.key, "shape": [n, k]}}}
    folder = _write(tmp_path / "ckpt", {f"{mod}.{s}": v for s, v in t.items()}, qc)
    assert fmt.validate_checkpoint(folder).profiles[FP8.key] == FP8
    assert fmt.read_safetensors_headers(folder)[f"{mod}.{fmt.SCALE}"] == ((n, k // 64, FP8.num_slots), "F8_E4M3")
    bad = dict(t)
    bad[fmt.SCALE] = t[fmt.SCALE].clone()
    bad[fmt.SCALE].view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3fn NaN
    with pytest.raises(fmt.FormatError, match="NaN"):
        fmt.validate(bad, FP8, n, k, where=mod, check_values=True)
