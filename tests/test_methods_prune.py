"""ATV-Pruning / Wanda mask, the ``atv-prune`` dense method and ``atv-prune+sab``, against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_sab import format as fmt
from vllm_sab.calibrate.layerwise import atv_visual_selection
from vllm_sab.calibrate.methods import CalibrationStats, SignMethod
from vllm_sab.calibrate.methods.prune import (
    ATVPruneMethod,
    ATVPruneSABMethod,
    prune_mask,
    resolve_sparsity,
    wanda_importance,
)


def _stats_from(x: torch.Tensor, xt: torch.Tensor | None = None, xv: torch.Tensor | None = None, samples: int = 4) -> CalibrationStats:
    e = torch.stack([(c * c).mean(0) for c in x.chunk(samples)])
    return CalibrationStats(
        hessian=2 * x.T @ x / len(x), n_tokens=len(x),
        hessian_text=None if xt is None else 2 * xt.T @ xt / len(xt),
        hessian_visual=None if xv is None else 2 * xv.T @ xv / len(xv),
        n_text=0 if xt is None else len(xt), n_visual=0 if xv is None else len(xv),
        sample_energy_sum=e.sum(0), sample_energy_sq=(e**2).sum(0), n_samples=len(e),
    )


def _layer(n: int = 32, k: int = 256, seed: int = 0) -> tuple[torch.Tensor, CalibrationStats]:
    """Heavy-tailed weight with outlier columns; text and visual inputs with different column scales."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, k, generator=gen).add(0.2) * 0.05
    w[:, :3] *= 5
    scale = torch.exp(torch.randn(k, generator=gen) * 0.7)
    mix = torch.randn(k, k, generator=gen) * 0.1 + torch.eye(k)
    xt = (torch.randn(384, k, generator=gen) @ mix) * scale
    xv = (torch.randn(192, k, generator=gen) @ mix) * scale * torch.linspace(0.3, 2.0, k)
    return w, _stats_from(torch.cat([xt, xv]), xt, xv)


def _brute_keep_row(scores: list[float], n_prune: int) -> list[bool]:
    """Prune the n_prune lowest (score, index) pairs: ties prune the lower index first."""
    order = sorted(range(len(scores)), key=lambda j: (scores[j], j))
    pruned = set(order[:n_prune])
    return [j not in pruned for j in range(len(scores))]


def _out_err(ref: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = ref - q
    return math.sqrt(float(((e @ h) * e).sum()) / float(((ref @ h) * ref).sum()))


# ---------------------------------------------------------------------------------------
# Importance and masks
# ---------------------------------------------------------------------------------------
def test_importance_is_weight_magnitude_times_input_column_norm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 24, generator=gen) * torch.linspace(0.1, 3.0, 24)
    w = torch.randn(7, 24, generator=gen)
    h = 2 * x.T @ x / len(x)
    want = w.abs() * x.norm(dim=0) * math.sqrt(2 / len(x))  # Wanda's |W| ||X_j||, up to sqrt(2/n)
    torch.testing.assert_close(wanda_importance(w, h), want, rtol=1e-5, atol=1e-6)
    # Same per-row ranking as Wanda's unscaled score.
    raw = w.abs() * x.norm(dim=0)
    assert torch.equal(prune_mask(wanda_importance(w, h), 0.5), prune_mask(raw, 0.5))


def test_importance_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="Hessian shape"):
        wanda_importance(torch.ones(3, 4), torch.eye(5))
    with pytest.raises(ValueError, match="2-D"):
        wanda_importance(torch.ones(4), torch.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        wanda_importance(torch.full((2, 4), float("nan")), torch.eye(4))


@pytest.mark.parametrize("k,sparsity", [(64, 0.5), (64, 0.6), (100, 0.29), (30, 0.25), (16, 0.0), (16, 0.99)])
def test_unstructured_mask_keeps_the_top_per_row(k, sparsity):
    gen = torch.Generator().manual_seed(k)
    imp = torch.rand(9, k, generator=gen)
    keep = prune_mask(imp, sparsity, "unstructured")
    n_prune = math.floor(sparsity * k + 1e-9)  # Wanda's int(K * ratio)
    assert keep.dtype == torch.bool and keep.shape == imp.shape
    assert bool((keep.sum(1) == k - n_prune).all())
    for i in range(imp.shape[0]):
        assert keep[i].tolist() == _brute_keep_row(imp[i].tolist(), n_prune)
        if 0 < n_prune < k:
            assert float(imp[i][keep[i]].min()) >= float(imp[i][~keep[i]].max())


def test_pruned_count_guards_float_round_off():
    # 0.29 * 100 = 28.999999999999996: the intended 29 are pruned.
    assert int((~prune_mask(torch.rand(2, 100), 0.29)).sum(1)[0]) == 29


@pytest.mark.parametrize("pattern,n_keep,m", [("2:4", 2, 4), ("4:8", 4, 8), ("6:8", 6, 8)])
def test_nm_mask_keeps_n_most_important_per_group(pattern, n_keep, m):
    gen = torch.Generator().manual_seed(m + n_keep)
    imp = torch.rand(6, 64, generator=gen)
    keep = prune_mask(imp, None, pattern)
    groups = keep.view(6, 64 // m, m)
    assert bool((groups.sum(-1) == n_keep).all())
    for i in range(6):
        for g in range(64 // m):
            scores = imp[i, g * m : (g + 1) * m].tolist()
            assert groups[i, g].tolist() == _brute_keep_row(scores, m - n_keep)
    assert torch.equal(keep, prune_mask(imp, 1 - n_keep / m, pattern))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_ties_are_deterministic(pattern):
    gen = torch.Generator().manual_seed(3)
    imp = torch.randint(0, 3, (5, 32), generator=gen).float()  # many ties
    s = 0.5
    keep = prune_mask(imp, s, pattern)
    assert torch.equal(keep, prune_mask(imp.clone(), s, pattern))
    m = 32 if pattern == "unstructured" else int(pattern.split(":")[1])
    for i in range(5):
        for g in range(32 // m):
            seg = imp[i, g * m : (g + 1) * m].tolist()
            assert keep[i, g * m : (g + 1) * m].tolist() == _brute_keep_row(seg, int(m * s))
    # All equal: the lower column indices are pruned first (Wanda's stable ascending sort).
    flat = prune_mask(torch.ones(2, 8), 0.5)
    assert flat[0].tolist() == [False] * 4 + [True] * 4


def test_nm_mask_needs_k_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of M=8"):
        prune_mask(torch.rand(2, 12), None, "4:8")


@pytest.mark.parametrize(
    "sparsity,pattern,match",
    [
        (-0.1, "unstructured", r"\[0, 1\)"),
        (1.0, "unstructured", r"\[0, 1\)"),
        (1.5, "unstructured", r"\[0, 1\)"),
        (float("nan"), "unstructured", "number"),
        (True, "unstructured", "number"),
        ("0.5", "unstructured", "number"),
        (None, "unstructured", "only allowed with an N:M"),
        (0.6, "2:4", "prunes exactly 0.5"),
        (0.5, "3:4", "prunes exactly 0.25"),
        (0.5, "bogus", "unknown sparsity pattern"),
        (0.5, "4:2", "unknown sparsity pattern"),
        (0.5, "0:4", "unknown sparsity pattern"),
        (0.5, None, "unknown sparsity pattern"),
    ],
)
def test_bad_options_raise_clear_errors(sparsity, pattern, match):
    with pytest.raises(ValueError, match=match):
        resolve_sparsity(sparsity, pattern)
    with pytest.raises(ValueError, match=match):
        prune_mask(torch.rand(2, 16), sparsity, pattern)
    with pytest.raises(ValueError, match=match):
        ATVPruneMethod(sparsity=sparsity, pattern=pattern)
    with pytest.raises(ValueError, match=match):
        ATVPruneSABMethod(sparsity=sparsity, pattern=pattern)


def test_bad_zone_bits_and_missing_stats():
    with pytest.raises(ValueError, match="zone_bits"):
        ATVPruneSABMethod(zone_bits=3)
    with pytest.raises(ValueError, match="statistics"):
        ATVPruneMethod().quantize(torch.ones(4, 128))
    with pytest.raises(ValueError, match="statistics"):
        ATVPruneSABMethod().quantize(torch.ones(4, 128))


# ---------------------------------------------------------------------------------------
# atv-prune (dense)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity,pattern", [(0.5, "unstructured"), (0.6, "unstructured"), (None, "2:4"), (0.5, "4:8")])
def test_atv_prune_zeroes_exactly_the_pruned_weights(sparsity, pattern):
    w, stats = _layer()
    m = ATVPruneMethod(sparsity=sparsity, pattern=pattern)
    assert m.name == "atv-prune" and m.needs_stats and m.dense_output
    out = m.quantize(w, stats)
    keep = prune_mask(wanda_importance(w, stats.hessian), sparsity, pattern)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert bool((out[~keep] == 0).all())
    assert torch.equal(out[keep], w[keep])
    s, _ = resolve_sparsity(sparsity, pattern)
    assert bool(((~keep).sum(1) == math.floor(s * w.shape[1] + 1e-9)).all())


def test_atv_prune_ranks_each_row_alone():
    """A fused group is passed stacked along rows: the mask of a row does not depend on the others."""
    w, stats = _layer()
    m = ATVPruneMethod()
    stacked = m.quantize(w, stats)
    assert torch.equal(stacked, torch.cat([m.quantize(w[:10], stats), m.quantize(w[10:], stats)]))


def test_token_pool_changes_the_mask():
    """ATV's pool (text + drift-selected visual tokens) and the all-token pool give different masks."""
    gen = torch.Generator().manual_seed(5)
    k, n_text, n_vis = 128, 40, 200
    vm = torch.cat([torch.zeros(n_text, dtype=torch.bool), torch.ones(n_vis, dtype=torch.bool)])
    x_in = torch.randn(n_text + n_vis, k, generator=gen)
    x_in[vm] *= torch.linspace(4.0, 0.1, k)  # visual tokens load other channels than text tokens
    drift = torch.rand(n_text + n_vis, 1, generator=gen) * 3  # per-token drift through the block
    x_out = x_in + drift * x_in.norm(dim=1, keepdim=True) / k**0.5 * torch.randn(x_in.shape, generator=gen)
    pool = atv_visual_selection(x_in, x_out, vm)
    assert 0 < int((pool & vm).sum()) < n_vis and bool(pool[~vm].all())
    w = torch.randn(16, k, generator=gen)
    masks = {
        name: ATVPruneMethod().quantize(w, _stats_from(x_in[sel])) != 0
        for name, sel in (("atv", pool), ("all", torch.ones_like(vm)))
    }
    assert not torch.equal(masks["atv"], masks["all"])
    assert int((masks["atv"] != masks["all"]).sum()) > 16  # not just a tie or two


# ---------------------------------------------------------------------------------------
# atv-prune+sab
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "zone_bits,pattern,compensate,salient",
    [
        (1, "unstructured", True, 4),
        (1, "4:8", False, 4),
        (2, "unstructured", True, 4),
        (2, "2:4", True, 0),
        (1, "unstructured", True, None),  # salient count searched over the kept weights
    ],
)
def test_prune_sab_components_zero_at_pruned_and_round_trip(zone_bits, pattern, compensate, salient):
    w, stats = _layer()
    m = ATVPruneSABMethod(
        zone_bits=zone_bits, pattern=pattern, sparsity=None if ":" in pattern else 0.5,
        compensate_pruning=compensate, salient_columns=salient, max_salient=4, iterations=5,
    )
    assert not getattr(m, "dense_output", False)
    res = m.quantize_blocks(w, stats)
    comp = res.components
    comp.check("test")
    p = comp.profile
    assert p.zone_bits == zone_bits and p.col_scale and p.salient == res.salient
    assert p.salient_zoned == (res.salient > 0)
    keep = ATVPruneMethod(sparsity=None if ":" in pattern else 0.5, pattern=pattern).quantize(w, stats) != 0
    q = fmt.compose(comp)
    assert torch.equal(q, res.dense)
    assert bool((q[~keep] == 0).all())  # exactly 0 after compensation
    assert m.last_sparsity == pytest.approx(0.5)
    tensors = fmt.pack(comp, where="test")
    assert torch.equal(fmt.dequantize(tensors, p, where="test"), q)
    # Output error on the calibration inputs: far below the sign of the pruned weight.
    w_pruned = torch.where(keep, w, 0.0)
    sign = fmt.compose(SignMethod().quantize(w_pruned))
    err = _out_err(w_pruned, q, stats.hessian)
    assert err < 0.75 * _out_err(w_pruned, sign, stats.hessian)
    assert _out_err(w, q, stats.hessian) < 0.75 * _out_err(w, sign, stats.hessian)


def test_zone_bits_two_splits_kept_weights_and_lowers_the_error():
    """zone_bits=2 (pruned / concentrated / sparse) fits the kept weights better than zone_bits=1 (pruned / kept)."""
    w, stats = _layer(seed=2)
    errs = {}
    for zb in (1, 2):
        q = fmt.compose(ATVPruneSABMethod(zone_bits=zb, salient_columns=4, iterations=5).quantize(w, stats))
        errs[zb] = _out_err(w, q, stats.hessian)
    assert errs[2] < errs[1]


def test_true_bits_of_the_profiles():
    """The zone planes and the zero scales of the pruned zones are real storage."""
    m1, m2 = ATVPruneSABMethod(zone_bits=1), ATVPruneSABMethod(zone_bits=2)
    bits = lambda p: fmt.true_bits_per_weight(p, 4096, 4096)  # noqa: E731
    assert bits(m1._profile(8)) == pytest.approx(2.83984375)  # = ARB-RC + CGB, s = 8
    assert bits(m1._profile(0)) == pytest.approx(2.2578125)
    assert bits(m2._profile(8)) == pytest.approx(4.61328125)
    assert bits(m2._profile(0)) == pytest.approx(3.515625)
    assert fmt.paper_weight_bits(m1._profile(8)) == pytest.approx(1.0625)
