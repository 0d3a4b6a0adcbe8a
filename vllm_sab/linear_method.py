"""vLLM ``LinearMethodBase`` for sab layers: parameters, loading, and ``apply``.

Every tensor of format v1 becomes one parameter. Tensors indexed by output
rows (``n_dim`` in ``format.tensor_specs``) are vLLM ``ModelWeightParameter``s,
so vLLM's own loaders shard them for tensor parallelism and place q/k/v and
gate/up shards of fused layers. Tensors indexed only by input columns (the
in-block permutation and column scales) are shared by the shards of a fused
layer: every shard stores the same copy, which is checked on load, and
row-parallel layers slice them along K.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import BasevLLMParameter, ModelWeightParameter

from . import format as fmt
from . import ops


class SharedKParameter(BasevLLMParameter):
    """A parameter indexed by input columns only (``weight_perm``, ``weight_col_scale``).

    Its ``weight_loader`` is set by :class:`SabLinearMethod`; vLLM's
    per-shard placement does not apply because the tensor has no output dim.
    """


@register_weight_loader_v2_supported_method
class SabLinearMethod(LinearMethodBase):
    """Linear method for one sab-quantized vLLM linear (possibly fused).

    Args:
        profile: the layer's storage profile (shared by all fused shards).
        prefix: the vLLM module name, used in error messages.
    """

    def __init__(self, profile: fmt.LayerProfile, prefix: str) -> None:
        self.profile = profile
        # What the kernels read: float8 row scales are widened to float16 once at load.
        self.serving_profile = dataclasses.replace(profile, scale_dtype="float16")
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Register one parameter per format v1 tensor, with this rank's shapes.

        Raises:
            FormatError: this rank's K is not a multiple of the block size
                (e.g. a row-parallel layer at a tensor-parallel size that cuts a block).
            ValueError: bfloat16 activations on a CUDA GPU below compute capability 8.0
                (see :func:`check_activation_dtype`).
        """
        check_activation_dtype(params_dtype, _device_capability(), self.prefix)
        self.params_dtype = params_dtype  # the activation dtype the kernel is chosen for
        n, k = sum(output_partition_sizes), input_size_per_partition
        k_split = input_size // input_size_per_partition
        try:
            specs = fmt.tensor_specs(self.profile, n, k)
        except fmt.FormatError as e:
            raise fmt.FormatError(
                f"{self.prefix}: {e} (input size {input_size} split {k_split} ways by tensor "
                "parallelism); use a smaller tensor-parallel size or a smaller block size"
            ) from None
        self.tensor_names = tuple(specs)  # what apply() passes, fixed per layer
        vllm_loader = extra_weight_attrs["weight_loader"]
        layer.sab_loaded = defaultdict(set)
        layer.sab_expected_shards = _expected_shards(layer)
        for name, spec in specs.items():
            data = torch.empty(spec.shape, dtype=spec.dtype)
            if spec.n_dim is not None:
                param = ModelWeightParameter(
                    data=data,
                    input_dim=spec.k_dim,
                    output_dim=spec.n_dim,
                    weight_loader=_checked_loader(layer, name, spec, k_split, vllm_loader, self.prefix),
                )
            else:
                param = SharedKParameter(
                    data=data, weight_loader=_shared_loader(layer, name, spec, k_split, self.prefix)
                )
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check the loaded layer once, so that ``apply`` (the hot path) needs no checks.

        Checks that every tensor (and every fused shard of it) was loaded, then the values
        the safetensors headers cannot show (:func:`vllm_sab.format.validate` with
        ``check_values``): each block of ``weight_perm`` is a permutation of
        ``0..block_size-1`` (the kernels gather with it unchecked) and ``weight_scale``,
        ``weight_col_scale`` and ``weight_offset`` are finite.

        Then chooses the layer's kernel for its device and activation dtype
        (``vllm_sab.kernels.chooser``), once.

        Raises:
            FormatError: naming the vLLM module and the tensor (and shard) that the
                checkpoint did not provide or whose values are invalid.
            ValueError: ``SAB_KERNEL`` forces a kernel that cannot run this layer.
        """
        n, k = _nk(layer)
        specs = fmt.tensor_specs(self.profile, n, k)
        for name in specs:
            got = layer.sab_loaded.get(name, set())
            if None in got:
                continue
            missing = layer.sab_expected_shards - got
            if missing:
                which = "" if missing == {None} else f" (shards {sorted(map(str, missing))})"
                raise fmt.FormatError(f"{self.prefix}: tensor '{name}' missing from the checkpoint{which}")
        scale = layer._parameters[fmt.SCALE]
        # A reload copies the checkpoint's float8 scales into the float16 parameter the first
        # load left (exactly: float16 holds every e4m3 value), so check against either.
        loaded_as = self.profile if scale.dtype == self.profile.scale_torch_dtype else self.serving_profile
        fmt.validate({name: getattr(layer, name).data for name in specs}, loaded_as, n, k, where=self.prefix)
        if scale.dtype != torch.float16:
            # The kernels read float16 row scales; e4m3 -> float16 is exact. In memory the
            # layer then holds float16 scales (the checkpoint keeps its float8 ones).
            scale.data = scale.data.to(torch.float16)
        # Start the next load from scratch: an in-place weight reload (vLLM's reload_weights)
        # runs the loaders and this method again, and must see what that load provided.
        layer.sab_loaded = defaultdict(set)
        layer.sab_meta_counted = set()
        # The kernel is chosen once per layer, here, not per call (vllm_sab.kernels.chooser).
        layer.sab_kernel = ops.choose_kernel(
            layer._parameters[fmt.PACKED].device, self.params_dtype, self.serving_profile, where=self.prefix
        )

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x W_hat^T (+ bias) through the ``sab::linear`` custom op."""
        tensors = {name: getattr(layer, name) for name in self.tensor_names}
        y = ops.linear(x, tensors, self.serving_profile, layer.sab_kernel)
        return y if bias is None else y + bias


#: Compute capability (major * 10 + minor) the Triton kernel's bfloat16 ``tl.dot`` needs (Ampere).
BF16_MIN_CAPABILITY = 80


def check_activation_dtype(dtype: torch.dtype, capability: int | None, prefix: str = "sab") -> None:
    """Refuse an activation dtype the Triton kernel cannot run on this GPU.

    fp16 and fp32 run from compute capability 7.5 (:meth:`SabConfig.get_min_capability`);
    bfloat16 ``tl.dot`` needs 8.0.

    Args:
        dtype: the model's activation dtype (vLLM's ``params_dtype``).
        capability: the CUDA device's ``major * 10 + minor``, or None off CUDA (CPU serving
            runs the torch path, which takes every dtype).
        prefix: module name for the message.

    Raises:
        ValueError: ``dtype`` is bfloat16 and ``capability`` is below 80; the message names
            the module, the capability and the dtype to use instead.
    """
    if dtype == torch.bfloat16 and capability is not None and capability < BF16_MIN_CAPABILITY:
        raise ValueError(
            f"{prefix}: sab's Triton kernel needs compute capability 8.0 for bfloat16 activations "
            f"(this GPU has {capability // 10}.{capability % 10}); serve with --dtype float16"
        )


def _device_capability() -> int | None:
    """``major * 10 + minor`` of the current CUDA device, or None when vLLM is not on CUDA."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    cap = current_platform.get_device_capability()
    return None if cap is None else cap.to_int()


def _nk(layer: torch.nn.Module) -> tuple[int, int]:
    packed = layer._parameters[fmt.PACKED]
    return packed.shape[0], packed.shape[1] * fmt.WORD_BITS


def _expected_shards(layer: torch.nn.Module) -> set:
    if isinstance(layer, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(layer, MergedColumnParallelLinear):
        return set(range(len(layer.output_sizes)))
    return {None}


def _record(layer: torch.nn.Module, name: str, shard_id: Any) -> None:
    ids = shard_id if isinstance(shard_id, tuple) else (shard_id,)
    layer.sab_loaded[name].update(ids)


def _check_meta(loaded: torch.Tensor, name: str, spec: fmt.TensorSpec, k_split: int, prefix: str) -> None:
    """Check dtype and every non-row dim of a checkpoint tensor (full-K shape on disk)."""
    if loaded.dtype != spec.dtype:
        raise fmt.FormatError(
            f"{prefix}.{name}: checkpoint dtype {loaded.dtype}, expected {spec.dtype} (format v1)"
        )
    want = list(spec.shape)
    want[spec.k_dim] *= k_split
    got = list(loaded.shape)
    if len(got) != len(want) or any(
        g != w for d, (g, w) in enumerate(zip(got, want)) if d != spec.n_dim
    ):
        shown = ["N" if d == spec.n_dim else w for d, w in enumerate(want)]
        raise fmt.FormatError(f"{prefix}.{name}: checkpoint shape {got}, expected {shown} (format v1)")


def _checked_loader(
    layer: torch.nn.Module, name: str, spec: fmt.TensorSpec, k_split: int, vllm_loader: Callable, prefix: str
) -> Callable:
    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        _check_meta(loaded_weight, name, spec, k_split, prefix)
        vllm_loader(param, loaded_weight, *args, **kwargs)
        if not param.is_meta:  # see _shared_loader
            _record(layer, name, args[0] if args else kwargs.get("loaded_shard_id"))

    return load


def _shared_loader(
    layer: torch.nn.Module, name: str, spec: fmt.TensorSpec, k_split: int, prefix: str
) -> Callable:
    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        _check_meta(loaded_weight, name, spec, k_split, prefix)
        if k_split > 1:
            local = param.data.shape[spec.k_dim]
            loaded_weight = loaded_weight.narrow(spec.k_dim, layer.tp_rank * local, local)
        if param.is_meta:
            # vLLM's in-place weight reload first runs every loader on meta tensors to count
            # the elements a layer gets (it processes the layer once the count reaches the
            # layer's size), then materializes the layer and replays the loads: only the
            # replay holds values to compare and record. Every fused shard brings the same
            # K-indexed tensor: count (copy) it once, or the layer would be processed before
            # its last shard arrived.
            counted = layer.__dict__.setdefault("sab_meta_counted", set())
            if name not in counted:
                counted.add(name)
                param.data.copy_(loaded_weight)
            return
        if layer.sab_loaded.get(name) and not torch.equal(param.data, loaded_weight.to(param.device)):
            raise fmt.FormatError(
                f"{prefix}.{name}: fused shards store different values; sab needs the shards of a "
                "fused layer (q/k/v, gate/up) to share their K-indexed tensors (calibrate with sab-calibrate)"
            )
        param.data.copy_(loaded_weight)
        _record(layer, name, shard_id)

    return load
