"""vLLM ``QuantizationConfig`` for sab checkpoints (``--quantization sab``).

Reads ``config.json``'s ``quantization_config`` (format v1, see
``vllm_sab.format``), maps its explicit module list from checkpoint names to
vLLM module names, and hands every vLLM linear a method: :class:`SabLinearMethod`
for quantized ones, vLLM's ``UnquantizedLinearMethod`` for the others, and
``None`` for non-linear layers (attention, embeddings, ``lm_head``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from . import format as fmt
from .linear_method import SabLinearMethod


@register_quantization_config(fmt.QUANT_METHOD)
class SabConfig(QuantizationConfig):
    """Quantization config of a sab checkpoint.

    Args:
        checkpoint: the parsed ``quantization_config``; None when vLLM builds
            the config from ``--quantization sab`` alone on a checkpoint that
            has none (then :meth:`maybe_update_config` raises a clear error).

    Must stay picklable: vLLM sends it to the engine and worker processes.
    """

    def __init__(self, checkpoint: fmt.SabQuantizationConfig | None = None) -> None:
        super().__init__()  # sets packed_modules_mapping, which vLLM updates in place
        self.checkpoint = checkpoint
        # Module name -> profile name, in checkpoint names and (after
        # apply_vllm_mapper) vLLM names too; a union, so re-mapping is harmless.
        self.module_profiles: dict[str, str] = (
            {name: m.profile for name, m in checkpoint.modules.items()} if checkpoint else {}
        )

    def __repr__(self) -> str:
        n = len(self.checkpoint.modules) if self.checkpoint else 0
        return f"SabConfig(format_version={fmt.FORMAT_VERSION}, quantized_modules={n})"

    # ---- QuantizationConfig contract -------------------------------------------------
    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        """75: the Triton kernel's fp16/fp32 ``tl.dot`` runs on Turing (sm75) or newer. bfloat16
        needs 8.0; :func:`~vllm_sab.linear_method.check_activation_dtype` refuses it below that
        when the layers are created."""
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SabConfig":
        """Parse ``quantization_config``.

        Raises:
            FormatError: unknown ``format_version`` or malformed content.
        """
        return cls(fmt.SabQuantizationConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Check the checkpoint's tensors before the engine starts (front-end process).

        Reads only safetensors headers, so a missing tensor or a wrong
        shape/dtype fails here with the module and tensor named, instead of deep
        inside weight loading.

        Raises:
            FormatError: no sab quantization_config, or a tensor that does not
                follow format v1.
        """
        if self.checkpoint is None:
            raise fmt.FormatError(
                f"{model_name}: --quantization sab needs a sab checkpoint (config.json with a "
                "quantization_config whose quant_method is 'sab'); make one with sab-calibrate"
            )
        if Path(model_name).is_dir():
            fmt.validate_checkpoint(model_name)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Add the vLLM names of the quantized modules (idempotent; vLLM may call it twice).

        Uses ``WeightsMapper.apply_list``, the public API every vLLM version of the supported
        range has (in-tree configs use it too); a name the mapper drops keeps only its
        checkpoint name.
        """
        for name, profile in list(self.module_profiles.items()):
            for mapped in hf_to_vllm_mapper.apply_list([name]):
                self.module_profiles[mapped] = profile

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        """Method for the vLLM module ``prefix``.

        Raises:
            FormatError: the shards of a fused layer (q/k/v, gate/up) are
                partly quantized or use different profiles.
        """
        if not isinstance(layer, LinearBase):
            return None
        shards = self._shard_names(prefix)
        profiles = [self.module_profiles.get(s) for s in shards]
        if all(p is None for p in profiles):
            return UnquantizedLinearMethod()
        if any(p is None for p in profiles) or len(set(profiles)) > 1:
            raise fmt.FormatError(
                f"{prefix}: fused shards must all be quantized with one profile, got "
                + ", ".join(f"{s}={p or 'unquantized'}" for s, p in zip(shards, profiles))
            )
        return SabLinearMethod(self.checkpoint.profiles[profiles[0]], prefix)

    def _shard_names(self, prefix: str) -> list[str]:
        """Checkpoint-side module names fused into the vLLM module ``prefix``."""
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        if not parts or parts == [proj]:
            return [prefix]
        return [f"{head}.{p}" if head else p for p in parts]
