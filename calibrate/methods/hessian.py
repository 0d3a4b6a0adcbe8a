"""Numerically safe inverse-Hessian factors shared by the Hessian-based methods."""

from __future__ import annotations

import torch

__all__ = ["HessianError", "damped_inverse_cholesky_upper", "inverse_cholesky_upper", "prepare_hessian"]

#: Damping retries: each multiplies the relative damping by 10.
MAX_DAMP_RETRIES = 4


class HessianError(RuntimeError):
    """The Hessian of a layer could not be inverted even with extra damping."""


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Handle dead input columns the way GPTQ does.

    A column whose Hessian diagonal is 0 never sees a non-zero input, so its
    weights do not matter: GPTQ (arXiv 2210.17323, reference ``gptq.py``) sets
    ``H_jj = 1`` and ``W[:, j] = 0``.

    Args:
        hessian: float32 ``[K, K]``.
        weight: float32 ``[N, K]``.

    Returns:
        ``(H, W)`` copies with dead columns fixed.
    """
    h = hessian.clone()
    w = weight.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float = 0.01, where: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1``: :func:`damped_inverse_cholesky_upper` without the damping.

    Raises:
        HessianError: see :func:`damped_inverse_cholesky_upper`.
    """
    return damped_inverse_cholesky_upper(hessian, percdamp, where)[0]


def damped_inverse_cholesky_upper(
    hessian: torch.Tensor, percdamp: float = 0.01, where: str = "layer"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1``, with ``lambda = d * mean(diag H)``, and ``d``.

    This is GPTQ's ``Hinv`` (arXiv 2210.17323, sec. 4 "Cholesky reformulation"),
    also used by BiLLM (arXiv 2402.04291, Alg. 1, ``H^c``) and ARB-LLM: the
    saliency is ``w_ij^2 / U_jj^2`` and the block error compensation is
    ``W[:, end:] -= ((W - Q) / diag(U)) @ U[blk, end:]``.

    ``d`` starts at ``percdamp``; if the factorization fails (an indefinite matrix from
    too few tokens or from round-off), it is multiplied by 10 and retried up to
    :data:`MAX_DAMP_RETRIES` times.

    Args:
        hessian: float32 ``[K, K]``, symmetric positive semi-definite.
        percdamp: relative damping to start from (0.01 in GPTQ, BiLLM, ARB-LLM, SAB-LVLM).
        where: what the Hessian belongs to, for error messages (callers that do not know
            the layer leave it to the pipeline, which prefixes the layer name).

    Returns:
        ``(U, d)``: float32 ``[K, K]`` upper-triangular ``U`` with ``U^T U = (H + lambda I)^-1``,
        and the relative damping ``d`` actually used (``percdamp * 10**retries``).

    Raises:
        HessianError: non-finite entries, or still not positive definite at
            ``percdamp * 10**MAX_DAMP_RETRIES``; the message names ``where`` and the
            method option that raises the starting damping.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise HessianError(f"{where}: the Hessian has NaN/Inf entries (non-finite calibration activations?)")
    h = hessian.double()
    k = h.shape[0]
    mean_diag = torch.diag(h).mean().clamp_min(1e-12)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.float(), damp
        damp *= 10
    raise HessianError(
        f"{where}: the Hessian is not positive definite even with damping {damp / 10:g} x mean(diag H) "
        f"(started at {percdamp:g}, {MAX_DAMP_RETRIES} retries); use more calibration samples "
        f"(--num-samples) or a larger starting damping (--option percdamp=VALUE)"
    )
