"""``uniform3``: a 3-bit uniform GPTQ anchor, stored in format v1 (zone bit + two sign planes)."""

from __future__ import annotations

import torch

from vllm_sab.format import BinaryComponents, LayerProfile

from .base import CalibrationStats
from .uniform2 import Uniform2Method, gptq_columns, gptq_setup

__all__ = ["Uniform3Method", "uniform3_profile", "gptq_uniform3"]

# Code q = 4 g + 2 b0 + b1 (g: zone bit, b0: plane 0, b1: plane 1), level mu + Delta (q - 3.5).
_G = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
_S0 = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0])
_S1 = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0])


def uniform3_profile(block_size: int = 128) -> LayerProfile:
    """Format v1 profile of the 3-bit uniform anchor.

    ``s = B`` (every column has two sign planes), ``zone_bits = 1`` with
    ``salient_zoned`` (the zone bit is the code's top bit: ``Z = 2`` zones, each with
    its own offset) and ``offset``: ``T = 4`` scale slots and 2 offsets per (row, block),
    no permutation (``docs/format.md`` section 3.4, row "3-bit uniform").
    """
    return LayerProfile(block_size=block_size, zone_bits=1, salient=block_size, salient_zoned=True, offset=True)


def _group_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 3-bit grid of each row of ``w`` (float32 ``[N, B]``), as the fp16 values stored.

    Returns ``(delta, half, off0, off1)``, float16 ``[N]`` each: ``delta = fp16((max - min) / 7)``,
    ``half = fp16(delta / 2)``, ``off_g = fp16(mid -+ 2 delta)`` with ``mid = (max + min) / 2``.
    """
    wmax, wmin = w.amax(dim=1), w.amin(dim=1)
    delta = ((wmax - wmin) / 7).to(torch.float16)
    half = (delta.float() / 2).to(torch.float16)
    mid = (wmax + wmin) / 2
    off0 = (mid - 2 * delta.float()).to(torch.float16)
    off1 = (mid + 2 * delta.float()).to(torch.float16)
    return delta, half, off0, off1


def _levels(delta, half, off0, off1) -> torch.Tensor:
    """float32 ``[N, 8]``: the value of each code, in ``format.compose``'s float32 order
    ``(a0 * s0 + a1 * s1) + mu_g``, so GPTQ compensates exactly what is served."""
    dev = delta.device
    s0, s1, g = _S0.to(dev), _S1.to(dev), _G.to(dev)
    mu = torch.stack([off0.float(), off1.float()], dim=1)[:, g]  # [N, 8]
    return (delta.float().unsqueeze(1) * s0 + half.float().unsqueeze(1) * s1) + mu


def gptq_uniform3(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    block_size: int = 128,
    percdamp: float = 0.01,
    where: str = "layer",
    info: dict | None = None,
) -> tuple[BinaryComponents, torch.Tensor]:
    """GPTQ (arXiv 2210.17323, Algorithm 1) with a 3-bit min-max grid per (row, block).

    See :class:`Uniform3Method` for the math and the storage.

    Args:
        weight: float ``[N, K]``; ``K`` a multiple of ``block_size``.
        hessian: float32 ``[K, K]``, ``H = 2/N sum x x^T``.
        block_size: ``B``: group size of the grid and lazy-batch width.
        percdamp: relative damping of ``H`` (GPTQ: 0.01).
        where: layer name for error messages.
        info: if given, receives ``"percdamp"``, the damping actually used.

    Returns:
        ``(components, Q)``: components with profile :func:`uniform3_profile` and the
        float32 ``[N, K]`` quantized weight; ``format.compose(components)`` equals ``Q``.

    Raises:
        FormatError: ``K`` is not a multiple of ``block_size``.
        ValueError: bad shapes, NaN/Inf weights, or a group range beyond fp16.
        HessianError: ``H`` cannot be inverted even with extra damping.
    """
    profile = uniform3_profile(block_size)
    w, u = gptq_setup(weight, hessian, profile, percdamp, where, info)
    n, k = w.shape
    nb = k // block_size

    scale = torch.empty(n, nb, 4, dtype=torch.float16, device=w.device)
    offset = torch.empty(n, nb, 2, dtype=torch.float16, device=w.device)

    def start_group(blk: int, w1: torch.Tensor) -> torch.Tensor:
        delta, half, off0, off1 = _group_grid(w1)
        if not all(bool(torch.isfinite(t).all()) for t in (delta, off0, off1)):
            raise ValueError(
                f"{where}: block {blk} has a weight range beyond float16 (the 3-bit step or offset would be Inf)"
            )
        # Slots (section 3.3 with n_ns = 0, Z = 2): t0 = z holds plane 0, t1 = 2 + z plane 1.
        scale[:, blk] = torch.stack([delta, delta, half, half], dim=1)
        offset[:, blk] = torch.stack([off0, off1], dim=1)
        return _levels(delta, half, off0, off1)

    def quantize_column(col: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Nearest stored level (the fp16-rounded offsets make the grid only nearly uniform).
        q = (col.unsqueeze(1) - levels).abs().argmin(dim=1)
        return q, levels.gather(1, q.unsqueeze(1)).squeeze(1)

    codes, q_all = gptq_columns(w, u, block_size, start_group, quantize_column)
    signs = torch.where((codes & 2) != 0, 1, -1).to(torch.int8)
    residual = torch.where((codes & 1) != 0, 1, -1).to(torch.int8).view(n, nb, block_size)
    zone = (codes >> 2).to(torch.uint8)
    comps = BinaryComponents(
        profile=profile, signs=signs, scale=scale, zone=zone, residual=residual, offset=offset
    )
    return comps, q_all


class Uniform3Method(Uniform2Method):
    """3-bit asymmetric min-max uniform quantization with GPTQ error compensation.

    The 3-bit neighbour of :class:`~.uniform2.Uniform2Method`, so that a binary profile of
    about 3-3.8 true bits has a uniform anchor of about its size. GPTQ (arXiv 2210.17323,
    Algorithm 1; no act-order; group = lazy block of ``B`` columns, grid from the
    compensated weights as the group starts):

        Delta = fp16((max w - min w) / 7),   mid = (max w + min w) / 2
        levels  mu + Delta (q - 3.5),  q = 0..7,  nearest stored level wins

    Storage in format v1 (``docs/format.md`` sections 2, 3.3, 3.4), profile
    :func:`uniform3_profile` (``zone_bits 1, s = B, salient_zoned, offset``), code
    ``q = 4 g + 2 b0 + b1``:

        zone bit  ``g``  -> zone ``z = g`` with offset ``fp16(mid + (2 g - 1) 2 Delta)``
        plane 0   ``b0`` -> slot ``z``, scale ``Delta``
        plane 1   ``b1`` -> slot ``2 + z``, scale ``fp16(Delta / 2)``

    so ``Delta (2 b0 - 1) + Delta/2 (2 b1 - 1) + mu_g`` gives every level, and
    ``format.compose`` of the result is bit-identical to the ``Q`` GPTQ compensated.
    The format repeats ``Delta`` in both zones' slots: 3 bits + 6 fp16 numbers per ``B``
    weights, **3 + 96/B true bits per weight** (3.75 at ``B = 128``, 3.5 at ``B = 192``).

    Options (``block_size``, ``percdamp``) as :class:`~.uniform2.Uniform2Method`.
    """

    name = "uniform3"

    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> BinaryComponents:
        """Quantize ``weight`` (float32 ``[N, K]``) to 3 bits with GPTQ using ``stats.hessian``.

        Raises:
            ValueError: ``stats`` is None, or see :func:`gptq_uniform3`.
        """
        if stats is None:
            raise ValueError(f"method {self.name!r} needs calibration statistics (the Hessian)")
        info: dict = {}
        comps, _ = gptq_uniform3(
            weight, stats.hessian.to(weight.device), self.block_size, self.percdamp, self.name, info
        )
        self.last_report = info
        return comps
