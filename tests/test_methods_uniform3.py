"""The 3-bit uniform GPTQ anchor (``calibrate/methods/uniform3.py``).

Checks it against an independent round-to-nearest 3-bit quantizer (GPTQ with ``H = I``
reduces to it), that the stored format (zone bit + two sign planes, per-zone offsets)
reproduces the exact ``Q`` the compensation used through pack/dequantize, and that
compensation lowers the output error on correlated inputs.
"""

from __future__ import annotations

import pytest
import torch
from test_methods_uniform2 import correlated_inputs, hessian_of, randw

from vllm_sab.calibrate.methods import get_method
from vllm_sab.calibrate.methods.base import CalibrationStats
from vllm_sab.calibrate.methods.uniform3 import Uniform3Method, gptq_uniform3, uniform3_profile
from vllm_sab.format import compose, dequantize, pack, paper_weight_bits, true_bits_per_weight


def rtn3_reference(w: torch.Tensor, block: int) -> torch.Tensor:
    """Per (row, block): the nearest of the eight levels, in float64 by brute force.

    The levels are those the format stores: ``Delta = fp16((max - min) / 7)``, zone
    offsets ``fp16(mid -+ 2 Delta)``, plane scales ``Delta`` and ``fp16(Delta / 2)``.
    """
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    h = lambda v: float(torch.tensor(v, dtype=torch.float32).half())  # noqa: E731
    for r in range(n):
        for b0 in range(0, k, block):
            g = w[r, b0 : b0 + block].float()
            hi, lo = float(g.max()), float(g.min())
            delta = h((hi - lo) / 7)
            half = h(delta / 2)
            mid = (hi + lo) / 2
            offs = [h(mid - 2 * delta), h(mid + 2 * delta)]
            levels = torch.tensor(
                [offs[q >> 2] + delta * (1 if q & 2 else -1) + half * (1 if q & 1 else -1) for q in range(8)],
                dtype=torch.float64,
            )
            out[r, b0 : b0 + block] = levels[(g.double().unsqueeze(1) - levels).abs().argmin(dim=1)]
    return out


@pytest.mark.parametrize("n,k,block", [(16, 256, 64), (8, 192, 96), (12, 256, 128)])
def test_identity_hessian_is_round_to_nearest(n, k, block):
    w = randw(n, k, seed=n + k)
    _, q = gptq_uniform3(w, torch.eye(k), block)
    ref = rtn3_reference(w, block)
    diff = (q.double() - ref).abs() > 1e-6
    if diff.any():  # only exact ties (float32 vs float64 distances) may differ
        rows, cols = diff.nonzero(as_tuple=True)
        gap = ((w.double()[rows, cols] - q.double()[rows, cols]).abs()
               - (w.double()[rows, cols] - ref[rows, cols]).abs()).abs()
        assert bool((gap < 1e-6).all()) and int(diff.sum()) <= 2
    # Eight distinct levels are used somewhere (the zone bit is really the top bit).
    assert len(torch.unique(q[0, :block])) >= 6


@pytest.mark.parametrize("block", [64, 128])
def test_stored_format_reproduces_q(block):
    n, k = 24, 256
    w = randw(n, k, seed=3)
    comps, q = gptq_uniform3(w, hessian_of(correlated_inputs(k)), block)
    comps.check()
    assert comps.profile == uniform3_profile(block)
    assert comps.scale.shape == (n, k // block, 4) and comps.offset.shape == (n, k // block, 2)
    assert comps.zone.shape == (n, k) and comps.perm is None
    assert torch.equal(compose(comps), q)
    tensors = pack(comps, "test.layer")
    assert torch.equal(dequantize(tensors, comps.profile, "test.layer"), q)


def test_gptq_beats_round_to_nearest_and_uniform2():
    n, k, block = 64, 256, 128
    x = correlated_inputs(k, tokens=2048, seed=7)
    w = randw(n, k, seed=8)
    _, q3 = gptq_uniform3(w, hessian_of(x), block)
    q_rtn = rtn3_reference(w, block).float()
    q2 = get_method("uniform2", block_size=block).quantize(w, CalibrationStats(hessian=hessian_of(x), n_tokens=2048))
    err = lambda q: float(torch.linalg.norm((w - q) @ x.T))  # noqa: E731
    assert err(q3) < 0.8 * err(q_rtn)
    assert err(q3) < 0.6 * err(compose(q2))


def test_true_bits_and_method_registry():
    p = uniform3_profile(128)
    assert true_bits_per_weight(p, 4096, 4096) == pytest.approx(3 + 96 / 128)
    assert true_bits_per_weight(uniform3_profile(192), 576, 576) == pytest.approx(3.5)
    assert paper_weight_bits(p) == 2.0  # the papers' convention counts sign planes only
    m = get_method("uniform3", block_size=64)
    assert isinstance(m, Uniform3Method) and m.needs_stats
    with pytest.raises(ValueError, match="calibration statistics"):
        m.quantize(randw(4, 128), None)


def test_constant_and_zero_rows_are_exact():
    n, k, block = 6, 128, 64
    w = randw(n, k, seed=9)
    w[0] = 0.0
    w[1, :block] = 0.37
    comps, q = gptq_uniform3(w, torch.eye(k), block)
    assert bool(torch.isfinite(q).all())
    assert torch.equal(q[0], torch.zeros(k))
    assert bool((q[1, :block] - float(torch.tensor(0.37).half())).abs().max() < 1e-3)
    assert torch.equal(compose(comps), q)
