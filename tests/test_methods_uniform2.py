"""The 2-bit uniform GPTQ baseline (``calibrate/methods/uniform2.py``).

Checks it against an independent round-to-nearest 2-bit quantizer (GPTQ with ``H = I``
must reduce to it), checks that the stored format reproduces the exact ``Q`` the
compensation used, and that compensation lowers the output error on correlated inputs.
"""

from __future__ import annotations

import pytest
import torch

from vllm_sab.calibrate.methods.base import CalibrationStats
from vllm_sab.calibrate.methods.uniform2 import Uniform2Method, gptq_uniform2, uniform2_profile
from vllm_sab.format import (
    BinaryComponents,
    FormatError,
    compose,
    dequantize,
    pack,
    paper_weight_bits,
    true_bits_per_weight,
)


def rtn_reference(w: torch.Tensor, block: int) -> torch.Tensor:
    """Independent round-to-nearest: per (row, block) pick the nearest of the four levels.

    Levels ``mu + Delta (q - 1.5)`` with ``Delta = fp16((max - min) / 3)`` and
    ``mu = fp16((max + min) / 2)``, evaluated in float64 by brute force (no rounding formula).
    """
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    w64 = w.double()
    for r in range(n):
        for b0 in range(0, k, block):
            g = w64[r, b0 : b0 + block]
            hi, lo = float(g.max()), float(g.min())
            delta = float(torch.tensor((hi - lo) / 3, dtype=torch.float32).half())
            mu = float(torch.tensor((hi + lo) / 2, dtype=torch.float32).half())
            levels = torch.tensor([mu + delta * (q - 1.5) for q in range(4)], dtype=torch.float64)
            out[r, b0 : b0 + block] = levels[(g.unsqueeze(1) - levels).abs().argmin(dim=1)]
    return out


def correlated_inputs(k: int, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """``[tokens, K]`` inputs whose columns are strongly correlated (low-rank mixing plus noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, 16, generator=g)
    mix = torch.randn(16, k, generator=g)
    scales = torch.rand(k, generator=g) * 2 + 0.1
    return (z @ mix + 0.3 * torch.randn(tokens, k, generator=g)) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * (x.T @ x)


def randw(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("n,k,block", [(16, 256, 64), (8, 128, 128), (32, 256, 128)])
def test_identity_hessian_is_round_to_nearest(n, k, block):
    w = randw(n, k, seed=n + k)
    comps, q = gptq_uniform2(w, torch.eye(k), block)
    ref = rtn_reference(w, block)
    diff = (q.double() - ref).abs() > 1e-6
    # A mismatch is allowed only on an exact-rounding tie (float32 vs float64 arithmetic).
    if diff.any():
        rows, cols = diff.nonzero(as_tuple=True)
        gap = ((w.double()[rows, cols] - q.double()[rows, cols]).abs()
               - (w.double()[rows, cols] - ref[rows, cols]).abs()).abs()
        assert bool((gap < 1e-6).all()), f"{int(diff.sum())} non-tie mismatches"
        assert int(diff.sum()) <= 2
    # The Method object gives the same components.
    m = Uniform2Method(block_size=block)
    comps2 = m.quantize(w, CalibrationStats(hessian=torch.eye(k), n_tokens=1))
    assert torch.equal(compose(comps2), q)


def test_plane_algebra():
    """Delta B0 + Delta/2 B1 + mu == mu + Delta (q - 1.5) for q = 0..3 via format.compose."""
    block = 32
    profile = uniform2_profile(block)
    q = torch.arange(block).remainder(4).view(1, block)
    delta, mu = 0.5, 0.25  # exact in fp16
    comps = BinaryComponents(
        profile=profile,
        signs=torch.where(q >= 2, 1, -1).to(torch.int8),
        scale=torch.tensor([[[delta, delta / 2]]], dtype=torch.float16),
        residual=torch.where(q % 2 == 1, 1, -1).to(torch.int8).view(1, 1, block),
        offset=torch.tensor([[[mu]]], dtype=torch.float16),
    )
    comps.check()
    assert torch.equal(compose(comps), (mu + delta * (q.float() - 1.5)))
    assert profile.num_zones == 1 and profile.num_slots == 2 and not profile.has_perm


@pytest.mark.parametrize("block", [64, 128])
def test_compose_pack_roundtrip_exact(block):
    n, k = 24, 256
    w = randw(n, k, seed=3)
    h = hessian_of(correlated_inputs(k))
    comps, q = gptq_uniform2(w, h, block)
    comps.check()
    assert comps.profile == uniform2_profile(block)
    assert comps.scale.dtype == torch.float16 and comps.scale.shape == (n, k // block, 2)
    assert comps.offset.shape == (n, k // block, 1)
    assert comps.residual.shape == (n, k // block, block)
    assert torch.equal(compose(comps), q)
    tensors = pack(comps, "test.layer")
    assert torch.equal(dequantize(tensors, comps.profile, "test.layer"), q)


def test_values_on_group_grid():
    n, k, block = 16, 256, 64
    w = randw(n, k, seed=4)
    comps, q = gptq_uniform2(w, hessian_of(correlated_inputs(k, seed=5)), block)
    delta = comps.scale[..., 0].double()  # [N, nb]
    mu = comps.offset[..., 0].double()
    assert torch.equal(comps.scale[..., 1], (comps.scale[..., 0].float() / 2).half())
    levels = mu.unsqueeze(-1) + delta.unsqueeze(-1) * (torch.arange(4, dtype=torch.float64) - 1.5)  # [N, nb, 4]
    vals = q.double().view(n, k // block, block, 1)
    dist = (vals - levels.unsqueeze(2)).abs().amin(-1)
    tol = 1e-6 * (mu.abs() + delta).unsqueeze(-1) + 1e-12
    assert bool((dist <= tol).all())
    # Every group uses its full range: some weight at the lowest and the highest level.
    assert bool((delta > 0).all())


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    n, k, block = 64, 256, 128
    x = correlated_inputs(k, tokens=2048, seed=7)
    w = randw(n, k, seed=8)
    _, q_gptq = gptq_uniform2(w, hessian_of(x), block)
    q_rtn = rtn_reference(w, block).float()
    err_gptq = torch.linalg.norm((w - q_gptq) @ x.T)
    err_rtn = torch.linalg.norm((w - q_rtn) @ x.T)
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def test_true_bits():
    p = uniform2_profile(128)
    assert true_bits_per_weight(p, 4096, 4096) == pytest.approx(2.375)
    assert paper_weight_bits(p) == 2.0


def test_constant_groups_zero_rows_dead_columns_no_nan():
    n, k, block = 8, 256, 128
    w = randw(n, k, seed=9)
    w[0] = 0.0  # zero row
    w[1, :block] = 0.37  # constant group
    w[2] = -1.25  # constant row
    comps, q = gptq_uniform2(w, torch.eye(k), block)
    assert bool(torch.isfinite(q).all())
    assert bool(torch.isfinite(comps.scale.float()).all()) and bool(torch.isfinite(comps.offset.float()).all())
    assert torch.equal(q[0], torch.zeros(k))
    assert bool((q[1, :block] == float(torch.tensor(0.37).half())).all())
    assert bool((q[2] == -1.25).all())
    assert torch.equal(compose(comps), q)

    # With compensation: a zero row stays exactly zero; a dead input column is harmless.
    h = hessian_of(correlated_inputs(k, seed=10))
    h[5, :] = 0.0
    h[:, 5] = 0.0
    comps, q = gptq_uniform2(w, h, block)
    assert bool(torch.isfinite(q).all())
    assert torch.equal(q[0], torch.zeros(k))
    assert torch.equal(compose(comps), q)


def test_errors():
    m = Uniform2Method(block_size=64)
    w = randw(4, 128)
    with pytest.raises(ValueError, match="calibration statistics"):
        m.quantize(w, None)
    with pytest.raises(FormatError, match="multiple of block_size"):
        m.quantize(randw(4, 96), CalibrationStats(hessian=torch.eye(96), n_tokens=1))
    with pytest.raises(ValueError, match="hessian has shape"):
        m.quantize(w, CalibrationStats(hessian=torch.eye(64), n_tokens=1))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.quantize(bad, CalibrationStats(hessian=torch.eye(128), n_tokens=1))
    with pytest.raises(ValueError, match="percdamp"):
        Uniform2Method(percdamp=0.0)
    assert Uniform2Method.name == "uniform2" and Uniform2Method.needs_stats
