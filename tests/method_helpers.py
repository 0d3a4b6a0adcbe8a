"""Shared checks of the method tests (imported by test_methods_*.py)."""

from __future__ import annotations

import torch

from vllm_sab.calibrate.methods.base import CalibrationStats
from vllm_sab.calibrate.methods.hessian import inverse_cholesky_upper, prepare_hessian


def stats_from(x: torch.Tensor) -> CalibrationStats:
    """Pool statistics of inputs ``x`` (``[tokens, K]``): ``H = 2/N · xᵀx``."""
    return CalibrationStats(hessian=2.0 / x.shape[0] * x.T @ x, n_tokens=x.shape[0])


def assert_block_compensation(seen: list[torch.Tensor], dense: torch.Tensor, weight: torch.Tensor,
                              stats: CalibrationStats, block_size: int, percdamp: float = 0.01) -> None:
    """Every block was fitted on the weight compensated for the earlier blocks' errors, as GPTQ does.

    Replays GPTQ's update independently: block ``i``'s error scaled by the
    inverse Cholesky diagonal, pushed onto the later columns through ``U``;
    ``seen[i]`` (what the method fitted) must equal the replayed weight.
    """
    h, expect = prepare_hessian(stats.hessian, weight)
    u = inverse_cholesky_upper(h, percdamp)
    expect = expect.clone()
    for i in range(weight.shape[1] // block_size):
        c = slice(i * block_size, (i + 1) * block_size)
        torch.testing.assert_close(seen[i], expect[:, c], rtol=1e-5, atol=1e-6)
        err = (expect[:, c] - dense[:, c]) / torch.diagonal(u)[c]
        expect[:, (i + 1) * block_size :] -= err @ u[c, (i + 1) * block_size :]
