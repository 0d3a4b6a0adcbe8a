"""Layer-wise calibration machinery: capture decoder inputs, accumulate statistics, run layers.

The sequential post-training quantization loop of GPTQ / BiLLM / ARB-LLM /
SAB-LVLM, for transformers VLMs:

1. :func:`capture_layer_inputs` runs the model once per calibration sample
   and stops at the first decoder layer, keeping its input hidden states and
   every keyword argument the layer needs (attention mask, position ids,
   rotary embeddings: for Qwen2-VL / Qwen2.5-VL the 3-D mRoPE ``cos``/``sin``
   the model computed from the image grid), on CPU.
2. For each decoder layer, :func:`collect_stats` runs the (full precision)
   layer on every sample with forward hooks on its linears and accumulates,
   per linear input, the compensation Hessian over a token pool, the text and
   visual Hessians separately, and the per-sample column-energy moments
   (running sums only). It also returns the layer's outputs, from which the
   ATV pool measures each visual token's drift.
3. The caller quantizes the layer's linears, writes ``W_hat`` into the layer,
   and :func:`run_layer` produces the next layer's inputs from the quantized
   layer.

Activations live on CPU between layers; only the current layer is on the
compute device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .methods.base import CalibrationStats

__all__ = ["LayerInput", "StatsAccumulator", "TOKEN_POOLS", "atv_visual_selection", "capture_layer_inputs", "collect_stats", "run_layer"]

#: Token pools the compensation Hessian may be built from.
TOKEN_POOLS = ("all", "text", "atv")


@dataclass
class LayerInput:
    """What one calibration sample feeds a decoder layer.

    Attributes:
        hidden: float ``[1, L, D]`` hidden states (CPU).
        kwargs: the other keyword arguments of the layer call (tensors on CPU,
            tuples of tensors kept as tuples).
        visual_mask: bool ``[L]``, True at image tokens.
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    visual_mask: torch.Tensor


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


# Keyword arguments of a decoder layer that must not be replayed (caches).
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position")


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    first_layer: nn.Module,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    device: torch.device,
) -> list[LayerInput]:
    """Inputs of ``first_layer`` for every calibration sample.

    Args:
        model: the transformers VLM; everything but the decoder layers must be
            on ``device`` (the caller moves it).
        first_layer: the first decoder layer (also on ``device``; it never runs).
        batches: ``(processor inputs, visual_mask [L] bool)`` per sample, batch size 1.
        device: compute device.

    Returns:
        One :class:`LayerInput` per sample, on CPU.

    Raises:
        RuntimeError: the forward never reached ``first_layer``.
    """
    captured: list[LayerInput] = []
    current_mask: list[torch.Tensor] = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
        captured.append(LayerInput(hidden.detach().cpu(), _to(kw, "cpu"), current_mask[-1]))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for inputs, visual_mask in batches:
            current_mask.append(visual_mask.bool().cpu())
            before = len(captured)
            try:
                model(**_to(inputs, device), use_cache=False)
            except _StopForward:
                pass
            if len(captured) != before + 1:
                raise RuntimeError("calibration forward did not reach the first decoder layer")
    finally:
        handle.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput], device: torch.device, where: str = "layer") -> list[LayerInput]:
    """Run a decoder layer on every sample; the outputs become the next layer's inputs.

    Args:
        layer: decoder layer on ``device``.
        inputs: per-sample inputs (CPU).
        device: compute device.
        where: layer name for errors.

    Returns:
        New :class:`LayerInput` objects (same kwargs and masks, new hidden states on CPU).

    Raises:
        FloatingPointError: NaN/Inf in an output, naming ``where``.
    """
    dtype = next(layer.parameters()).dtype
    outs = []
    for inp in inputs:
        h = _layer_output(layer(inp.hidden.to(device, dtype), **_to(inp.kwargs, device)))
        if not bool(torch.isfinite(h).all()):
            raise FloatingPointError(f"{where}: NaN/Inf in the layer output")
        outs.append(LayerInput(h.cpu(), inp.kwargs, inp.visual_mask))
    return outs


def atv_visual_selection(
    x_in: torch.Tensor, x_out: torch.Tensor, visual_mask: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """ATV-Pruning's per-sample visual token choice for the calibration pool.

    Drift of token ``t`` through the block: ``d_t = 1 - cos(x_in[t], x_out[t])``.
    The pool keeps every text token and the ``K = round(min(1, alpha * mean_visual(d)) * n_text)``
    visual tokens of largest drift (capped at the number of visual tokens), so
    the number of visual tokens adapts per layer (ATV-Pruning, arXiv 2603.16001,
    reference ``ActivationAwarePruner._prune``, method ``atv``).

    Args:
        x_in: float ``[L, D]`` block input of one sample.
        x_out: float ``[L, D]`` block output.
        visual_mask: bool ``[L]``.
        alpha: drift multiplier (1.0 in the reference).

    Returns:
        bool ``[L]``: True for the tokens in the pool.
    """
    keep = ~visual_mask.clone()
    n_vis = int(visual_mask.sum())
    if n_vis == 0:
        return keep
    drift = 1 - torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    vis_idx = visual_mask.nonzero().flatten()
    d_vis = drift[vis_idx]
    n_text = int(keep.sum())
    k = min(n_vis, round(min(1.0, alpha * float(d_vis.mean())) * n_text))
    if k > 0:
        keep[vis_idx[d_vis.topk(k).indices]] = True
    return keep


@dataclass
class StatsAccumulator:
    """Running sums of one linear input's statistics (see :class:`CalibrationStats`).

    Attributes:
        k: input features.
        device: where the sums live.
    """

    k: int
    device: torch.device
    h: torch.Tensor = field(init=False)
    h_text: torch.Tensor = field(init=False)
    h_vis: torch.Tensor = field(init=False)
    e_sum: torch.Tensor = field(init=False)
    e_sq: torch.Tensor = field(init=False)
    n: int = 0
    n_text: int = 0
    n_vis: int = 0
    n_samples: int = 0

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=self.device)  # noqa: E731
        self.h, self.h_text, self.h_vis = z(self.k, self.k), z(self.k, self.k), z(self.k, self.k)
        self.e_sum, self.e_sq = z(self.k), z(self.k)

    def add(self, x: torch.Tensor, visual_mask: torch.Tensor, pool: torch.Tensor) -> None:
        """Add one sample.

        Args:
            x: ``[L, K]`` inputs of the linear for one sample.
            visual_mask: bool ``[L]``.
            pool: bool ``[L]``: tokens of the compensation Hessian.
        """
        x = x.float()
        vm = visual_mask.to(x.device)
        pool = pool.to(x.device)
        n_vis = int(vm.sum())
        xt = x[~vm] if n_vis else x
        # The Gram matrices are most of the statistics' cost (2 L K^2 flops each), so the
        # pool's is built from the modality Grams it shares instead of being recomputed:
        # pool = text tokens + some (or all, or no) visual tokens, the three pools there are.
        g_text = xt.T @ xt
        g_vis = None
        if n_vis:
            xv = x[vm]
            g_vis = xv.T @ xv
            self.h_vis += g_vis
        self.h_text += g_text
        pool_vis = int((pool & vm).sum())
        pool_text = int(pool.sum()) - pool_vis
        if pool_text == xt.shape[0]:
            self.h += g_text
            if pool_vis == n_vis and g_vis is not None:
                self.h += g_vis
            elif pool_vis:
                xs = x[pool & vm]
                self.h.addmm_(xs.T, xs)
        else:  # a pool that drops text tokens: its own Gram
            xp = x[pool]
            self.h.addmm_(xp.T, xp)
        self.n += pool_text + pool_vis
        self.n_text += xt.shape[0]
        self.n_vis += n_vis
        energy = (x * x).mean(0)
        self.e_sum += energy
        self.e_sq += energy * energy
        self.n_samples += 1

    def finish(self) -> CalibrationStats:
        """The statistics, with ``H = 2/n * sum x x^T`` per pool.

        Raises:
            ValueError: no token was added.
        """
        if self.n == 0:
            raise ValueError("no calibration tokens reached this linear")
        return CalibrationStats(
            hessian=self.h * (2.0 / self.n),
            n_tokens=self.n,
            hessian_text=self.h_text * (2.0 / self.n_text) if self.n_text else None,
            hessian_visual=self.h_vis * (2.0 / self.n_vis) if self.n_vis else None,
            n_text=self.n_text,
            n_visual=self.n_vis,
            sample_energy_sum=self.e_sum,
            sample_energy_sq=self.e_sq,
            n_samples=self.n_samples,
        )


@torch.no_grad()
def collect_stats(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list[LayerInput],
    device: torch.device,
    *,
    token_pool: str = "all",
    atv_alpha: float = 1.0,
    where: str = "layer",
) -> dict[str, CalibrationStats]:
    """Run ``layer`` on every sample and accumulate the statistics of each linear's input.

    Linears that share an input (q/k/v, gate/up) get identical statistics;
    the caller passes one of them per fused group to save work.

    Args:
        layer: decoder layer on ``device``.
        linears: ``{name: module}`` inside ``layer`` to hook.
        inputs: per-sample layer inputs (CPU).
        device: compute device.
        token_pool: ``"all"`` tokens, ``"text"`` tokens only, or ``"atv"`` (all
            text tokens plus drift-selected visual tokens, per sample and layer;
            :func:`atv_visual_selection`) for the compensation Hessian. The text
            and visual Hessians always use all tokens of their modality.
        atv_alpha: ATV's alpha.
        where: layer name for errors.

    Returns:
        ``{name: CalibrationStats}``.

    Raises:
        ValueError: unknown ``token_pool``.
        FloatingPointError: NaN/Inf activations, naming the linear.
    """
    if token_pool not in TOKEN_POOLS:
        raise ValueError(f"unknown token pool {token_pool!r}; choose one of {', '.join(TOKEN_POOLS)}")
    acc = {name: StatsAccumulator(lin.in_features, device) for name, lin in linears.items()}
    stash: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_mod, args):
            stash[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    dtype = next(layer.parameters()).dtype
    try:
        for inp in inputs:
            stash.clear()
            x_in = inp.hidden.to(device, dtype)
            x_out = _layer_output(layer(x_in, **_to(inp.kwargs, device)))
            vm = inp.visual_mask.to(device)
            if token_pool == "all":
                pool = torch.ones_like(vm)
            elif token_pool == "text":
                pool = ~vm
            else:
                pool = atv_visual_selection(x_in[0], x_out[0], vm, atv_alpha)
            for name, x in stash.items():
                if not bool(torch.isfinite(x).all()):
                    raise FloatingPointError(f"{where}: NaN/Inf in the input of {name}")
                acc[name].add(x, vm, pool)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in acc.items():
        try:
            out[name] = a.finish()
        except ValueError as e:
            raise ValueError(f"{name}: {e} (token pool {token_pool!r})") from None
    return out
