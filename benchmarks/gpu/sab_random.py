"""Random, valid sab layers made directly on a device, and an ``nn.Linear`` stand-in that serves them.

Benchmarks need packed layers of Llama-2-70B size (a 57344 x 8192 gate_up has 470M
weights): packing random components through :func:`vllm_sab.format.pack` on the
host would take minutes, so :func:`random_packed` draws the stored tensors
themselves on the device, with the shapes and dtypes of
:func:`vllm_sab.format.tensor_specs` and the value rules of ``docs/format.md``
(any bit pattern is a valid sign or zone plane; residual padding bits are 0;
``weight_perm`` is a permutation per block; scales are finite), and checks the
result with :func:`vllm_sab.format.validate`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vllm_sab import format as fmt
from vllm_sab.kernels.triton_kernel import PreparedLayer

#: The two profiles the GPU benchmark times: the sign profile (1.125 true bits/weight at
#: B=128) and the ARB-RC/SAB column-group bitmap with 8 salient columns (2.84).
SIGN = fmt.LayerProfile(block_size=128)
BITMAP = fmt.LayerProfile(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
PROFILES = {SIGN.key: SIGN, BITMAP.key: BITMAP}


def random_packed(
    profile: fmt.LayerProfile, n: int, k: int, device: torch.device | str, seed: int = 0, weight_std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Stored tensors of a random ``[n, k]`` layer of ``profile`` on ``device``.

    Args:
        profile: the layer's storage profile.
        n, k: weight shape (``k`` a multiple of ``profile.block_size``).
        device: where to make them (no host round trip for the big planes).
        seed: seed of a generator on ``device``.
        weight_std: row scales are drawn around ``weight_std * sqrt(2/pi)`` (the mean
            absolute value of a normal weight of that deviation), so activations keep
            the magnitude of a normally initialised layer.

    Returns:
        ``{suffix: tensor}`` exactly as ``format.tensor_specs(profile, n, k)``, validated.

    Raises:
        format.FormatError: ``k`` is not a multiple of the block size (from ``tensor_specs``).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = fmt.tensor_specs(profile, n, k)
    b, nb = profile.block_size, k // profile.block_size
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if spec.dtype == torch.int32:  # sign and zone planes: every bit pattern is valid
            words = torch.randint(0, 2**32, spec.shape, generator=gen, device=device, dtype=torch.int64)
            out[name] = (words - 2**31).to(torch.int32)
        elif name == fmt.RESIDUAL:
            bytes_ = torch.randint(0, 256, spec.shape, generator=gen, device=device, dtype=torch.int32)
            pad = profile.residual_bytes * 8 - profile.salient
            if pad:  # padding bits of the last byte are written as 0 (docs/format.md 3.2)
                bytes_[..., -1] &= (1 << (8 - pad)) - 1
            out[name] = bytes_.to(torch.uint8)
        elif name == fmt.PERM:
            out[name] = torch.argsort(torch.rand(nb, b, generator=gen, device=device), dim=1).to(torch.int16).reshape(k)
        elif name == fmt.SCALE:
            a = weight_std * math.sqrt(2 / math.pi)
            out[name] = (a * (0.5 + torch.rand(spec.shape, generator=gen, device=device))).half()
        elif name == fmt.COL_SCALE:
            out[name] = (0.5 + torch.rand(spec.shape, generator=gen, device=device)).half()
        elif name == fmt.OFFSET:
            out[name] = (0.05 * weight_std * torch.randn(spec.shape, generator=gen, device=device)).half()
        else:  # pragma: no cover - tensor_specs lists no other suffix
            raise AssertionError(name)
    fmt.validate(out, profile, n, k, where=f"random {profile.key} [{n}, {k}]")
    return out


def layer_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a layer's stored tensors (what one product reads of the weight)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SabLinear(nn.Module):
    """``nn.Linear`` stand-in: ``y = x W_hat^T (+ bias)`` through the Triton sab kernels.

    Holds the packed tensors as buffers and a :class:`PreparedLayer` (validated once).

    Args:
        tensors: ``{suffix: tensor}`` of one layer (format v1), on the device it runs on.
        profile: the layer's profile.
        bias: optional ``[N]`` bias in the activations' dtype.

    Shapes: ``x`` ``[..., K]`` float16/bfloat16/float32 -> ``[..., N]`` in ``x``'s dtype.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], profile: fmt.LayerProfile, bias: torch.Tensor | None = None):
        super().__init__()
        self.layer = PreparedLayer(tensors, profile)
        self.in_features, self.out_features = self.layer.k, self.layer.n
        for name, t in self.layer.tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y if self.bias is None else y + self.bias


def replace_linears(
    root: nn.Module, profile: fmt.LayerProfile, *, names: tuple[str, ...], seed: int = 0
) -> int:
    """Replace every ``nn.Linear`` (or :class:`SabLinear`) under ``root`` whose attribute
    name is in ``names`` by a :class:`SabLinear` with random packed weights of ``profile``.

    The dense weight is dropped (its memory freed once nothing else holds it).

    Returns:
        How many modules were replaced.

    Raises:
        format.FormatError: a layer's ``K`` is not a multiple of the block size.
    """
    count = 0
    for parent in list(root.modules()):
        for attr, child in list(parent.named_children()):
            if attr not in names or not isinstance(child, (nn.Linear, SabLinear)):
                continue
            n, k = child.out_features, child.in_features
            device = child.bias.device if child.bias is not None else next(
                (t.device for t in list(child.parameters()) + list(child.buffers())), torch.device("cpu")
            )
            bias = None if child.bias is None else child.bias.detach()
            setattr(parent, attr, SabLinear(random_packed(profile, n, k, device, seed + count), profile, bias))
            count += 1
    return count
