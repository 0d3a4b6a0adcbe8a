"""SAB-LVLM method: reweighting map, reduction to ARB-RC, variants, components."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vllm_sab import format as fmt
from vllm_sab.calibrate.methods import ARBRCMethod, CalibrationStats, SABMethod, get_method


def _stats(n_tok: int = 600, k: int = 128, seed: int = 0, samples: int = 6) -> tuple[torch.Tensor, CalibrationStats]:
    """A weight with outlier columns and statistics with distinct text / visual input distributions."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, k, generator=gen)
    w[:, :3] *= 6
    mix = torch.randn(k, k, generator=gen) * 0.3 + torch.eye(k)
    xt = torch.randn(n_tok, k, generator=gen) @ mix
    xv = torch.randn(n_tok, k, generator=gen) * torch.linspace(0.2, 3.0, k)
    x = torch.cat([xt, xv])
    e = torch.stack([(c * c).mean(0) for c in x.chunk(samples)])
    return w, CalibrationStats(
        hessian=2 * x.T @ x / len(x), n_tokens=len(x),
        hessian_text=2 * xt.T @ xt / n_tok, hessian_visual=2 * xv.T @ xv / n_tok,
        n_text=n_tok, n_visual=n_tok,
        sample_energy_sum=e.sum(0), sample_energy_sq=(e**2).sum(0), n_samples=samples,
    )


def _equal(a: fmt.BinaryComponents, b: fmt.BinaryComponents) -> None:
    for name in ("signs", "scale", "zone", "residual", "perm", "col_scale", "offset"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("significance", ["energy", "modality"])
def test_reweighting_map_in_unit_interval_and_r_is_a_fraction(significance):
    w, stats = _stats()
    m = SABMethod(significance=significance)
    lam, r = m.reweighting(w, stats)
    assert lam.shape == w.shape
    assert bool((lam >= 0).all() and (lam <= 1).all())
    assert 0.0 <= r <= 1.0
    assert float(lam.std()) > 0  # distinct input distributions give a non-constant map


def test_constant_lambda_reduces_to_arb_rc():
    """One calibration sample and no visual tokens: rho = 0, r = 0, Lambda = 1 -> exactly ARB-RC."""
    w, stats = _stats()
    stats = replace(stats, hessian_visual=None, n_visual=0, n_samples=1)
    lam, r = SABMethod().reweighting(w, stats)
    assert r == 0.0 and bool((lam == 1).all())
    _equal(SABMethod(salient_columns=4).quantize(w, stats), ARBRCMethod(salient_columns=4).quantize(w, stats))


def test_text_compensation_equals_arb_rc_on_the_text_hessian():
    w, stats = _stats()
    flat = replace(stats, hessian_visual=None, n_visual=0, n_samples=1)
    got = SABMethod(salient_columns=4, compensation="text").quantize(w, flat)
    want = ARBRCMethod(salient_columns=4).quantize(w, replace(flat, hessian=flat.hessian_text))
    _equal(got, want)


def test_sab_lowers_its_weighted_loss_against_arb_rc():
    """Without compensation coupling (identity Hessians), SAB's Lambda-weighted error is at most ARB-RC's."""
    w, stats = _stats()
    eye = torch.eye(w.shape[1])
    lam, _ = SABMethod(significance="modality").reweighting(w, stats)
    ident = replace(stats, hessian=eye)
    sab = fmt.compose(SABMethod(salient_columns=4, significance="modality").quantize(w, ident))
    arb = fmt.compose(ARBRCMethod(salient_columns=4).quantize(w, ident))
    loss = lambda q: float(((lam * (w - q)) ** 2).sum())  # noqa: E731
    assert loss(sab) <= loss(arb) * 1.0001


@pytest.mark.parametrize("compensation", ["pool", "text", "balanced"])
@pytest.mark.parametrize("significance", ["energy", "modality"])
def test_every_variant_gives_valid_components(significance, compensation):
    w, stats = _stats()
    comp = SABMethod(significance=significance, compensation=compensation).quantize(w, stats)
    comp.check()
    assert comp.profile.col_scale and comp.profile.zone_bits == 1
    q = fmt.compose(comp)
    assert bool(torch.isfinite(q).all())
    assert float((w - q).norm() / w.norm()) < 0.8


def test_options_are_checked():
    with pytest.raises(ValueError, match="significance"):
        SABMethod(significance="nope")
    with pytest.raises(ValueError, match="compensation"):
        SABMethod(compensation="nope")
    with pytest.raises(ValueError, match="has no option"):
        get_method("sab", alpha=3)
