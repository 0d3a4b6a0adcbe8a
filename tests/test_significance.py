"""SAB-LVLM significance pieces against closed forms and brute force."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sab.calibrate.methods.significance import (
    column_hoyer_sparsity,
    hoyer_sparsity,
    modality_partition,
    modality_sensitivity,
    reweighting_map,
    uni_mass_ratio,
)


def test_hoyer_sparsity_of_known_vectors():
    assert float(hoyer_sparsity(torch.tensor([0.0, 0.0, 5.0, 0.0]))) == 1.0
    assert abs(float(hoyer_sparsity(torch.tensor([2.0, 2.0, 2.0, 2.0])))) < 1e-6
    # [1, 1, 0, 0]: l1/l2 = sqrt(2); (2 - sqrt 2) / (2 - 1).
    assert math.isclose(float(hoyer_sparsity(torch.tensor([1.0, 1.0, 0.0, 0.0]))), 2 - math.sqrt(2), rel_tol=1e-6)
    assert float(hoyer_sparsity(torch.zeros(5))) == 0.0
    assert float(hoyer_sparsity(torch.tensor([3.0]))) == 0.0


def test_column_hoyer_from_running_sums_equals_materialized_per_sample_significance():
    """rho from (sum e, sum e^2) equals the Hoyer sparsity of the full [N, K, z] tensor w^2 e_z[j]."""
    gen = torch.Generator().manual_seed(0)
    n, k, z = 5, 7, 9
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    e = torch.rand(z, k, generator=gen, dtype=torch.float64) ** 3
    h = (w**2)[:, :, None] * e.T[None, :, :]  # [N, K, z]
    ref = hoyer_sparsity(h, dim=-1)
    got = column_hoyer_sparsity(e.sum(0), (e**2).sum(0), z)
    torch.testing.assert_close(got[None, :].expand(n, k), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(r=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_reweighting_map_in_unit_interval(r, seed):
    rho = torch.rand(6, 8, generator=torch.Generator().manual_seed(seed))
    lam = reweighting_map(r, rho)
    assert bool((lam >= 0).all() and (lam <= 1).all())
    torch.testing.assert_close(lam, r * rho + (1 - r) * (1 - rho))


def test_reweighting_map_rejects_bad_r():
    import pytest

    with pytest.raises(ValueError, match="r must be"):
        reweighting_map(1.5, torch.zeros(2))


def test_modality_sensitivity_equals_obs_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    h = (2 * x.T @ x / 200).float()
    w = torch.randn(4, 16, generator=gen)
    s = modality_sensitivity(w, h, percdamp=0.01)
    hd = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(16, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    torch.testing.assert_close(s.double(), w.double() ** 2 / torch.diag(u) ** 2, rtol=1e-4, atol=1e-7)


def test_modality_partition_is_a_partition_and_follows_the_definition():
    gen = torch.Generator().manual_seed(2)
    s_t = torch.rand(20, 30, generator=gen) ** 4
    s_v = torch.rand(20, 30, generator=gen) ** 4
    part = modality_partition(s_t, s_v, salient_top_p=0.1, diff_quantile=0.5)
    stack = torch.stack([part.text_only, part.vision_only, part.cross, part.none]).int()
    assert bool((stack.sum(0) == 1).all())
    # Brute force: top 10 % per modality (60 of 600 weights).
    sal_t = torch.zeros(600, dtype=torch.bool)
    sal_t[(s_t / s_t.sum()).flatten().argsort(descending=True)[:60]] = True
    sal_v = torch.zeros(600, dtype=torch.bool)
    sal_v[(s_v / s_v.sum()).flatten().argsort(descending=True)[:60]] = True
    assert torch.equal(part.none.flatten(), ~(sal_t | sal_v))
    assert bool((part.text_only.flatten() & sal_v & ~sal_t).sum() == 0)
    assert torch.equal((part.text_only | part.vision_only | part.cross).flatten(), sal_t | sal_v)
    # r is the sensitivity mass on unimodal weights.
    s = s_t + s_v
    assert math.isclose(uni_mass_ratio(s_t, s_v, part), float(s[part.unimodal].sum() / s.sum()), rel_tol=1e-6)


def test_identical_modalities_have_no_unimodal_weights():
    s = torch.rand(10, 10, generator=torch.Generator().manual_seed(3))
    part = modality_partition(s, s.clone(), salient_top_p=0.2)
    assert not bool(part.unimodal.any())
    assert uni_mass_ratio(s, s, part) == 0.0
