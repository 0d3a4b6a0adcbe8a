"""Architecture adapters: where a supported VLM keeps its decoder layers and linears.

The calibrator never hard-codes one model: it asks the adapter for the
decoder layers of the language model and (optionally) the vision-side
linears, and groups linears the way vLLM fuses them (q/k/v -> qkv_proj,
gate/up -> gate_up_proj), because fused shards must share their K-indexed
tensors in a sab checkpoint (see ``vllm_sab.linear_method``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no calibrator adapter."""


# vLLM's packed_modules_mapping for LLaVA / Qwen2-VL / Qwen2.5-VL.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class Adapter:
    """How to find the parts of one VLM family (module paths in transformers 5 names).

    Attributes:
        model_type: ``config.model_type``.
        model_class: transformers class name to load it with.
        decoder_layers: path of the language model's ``ModuleList`` of decoder layers.
        vision_roots: paths whose linears ``--quantize-vision`` adds (vision tower, projector).
    """

    model_type: str
    model_class: str
    decoder_layers: str
    vision_roots: tuple[str, ...]
    # (in-memory prefix, checkpoint prefix) pairs where transformers 5's
    # in-memory names differ from the names vLLM loads. transformers 5.19 keeps
    # LLaVA's CLIPVisionModel without its `vision_model.` level in the state
    # dict (and save_pretrained drops it), but vLLM needs
    # `vision_tower.vision_model.*` (shared/notes/cpu-dev-env.md, problem 3).
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()

    def checkpoint_name(self, name: str) -> str:
        """Checkpoint key (the name vLLM and transformers load) of an in-memory state-dict name."""
        for mem, ckpt in self.checkpoint_prefixes:
            if name.startswith(mem) and not name.startswith(ckpt):
                return ckpt + name[len(mem):]
        return name

    def memory_name(self, key: str) -> str:
        """Inverse of :meth:`checkpoint_name`: in-memory state-dict name of a checkpoint key."""
        for mem, ckpt in self.checkpoint_prefixes:
            if key.startswith(ckpt):
                return mem + key[len(ckpt):]
        return key

    def load(self, model: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
        """Load the model with transformers on CPU (weights move per layer later)."""
        import transformers

        cls = getattr(transformers, self.model_class)
        return cls.from_pretrained(str(model), dtype=dtype, low_cpu_mem_usage=True)

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``[(name, decoder layer)]`` of the language model, in order."""
        layers = model.get_submodule(self.decoder_layers)
        return [(f"{self.decoder_layers}.{i}", layer) for i, layer in enumerate(layers)]

    def vision_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """``{name: nn.Linear}`` of the vision tower and projector that vLLM actually runs."""
        out: dict[str, nn.Linear] = {}
        for root in self.vision_roots:
            for name, mod in model.get_submodule(root).named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"{root}.{name}"] = mod
        if self.model_type == "llava":
            # vLLM builds CLIP only up to vision_feature_layer and drops deeper layers.
            n_layers = model.config.vision_config.num_hidden_layers
            feature_layer = model.config.vision_feature_layer
            if isinstance(feature_layer, int):
                used = n_layers + feature_layer + 1 if feature_layer < 0 else feature_layer + 1
                out = {k: v for k, v in out.items() if _clip_layer_index(k) is None or _clip_layer_index(k) < used}
        return out


def _clip_layer_index(name: str) -> int | None:
    marker = ".encoder.layers."
    if marker not in name:
        return None
    return int(name.split(marker, 1)[1].split(".", 1)[0])


ADAPTERS = {
    "llava": Adapter(
        "llava",
        "LlavaForConditionalGeneration",
        "model.language_model.layers",
        ("model.vision_tower", "model.multi_modal_projector"),
        (("model.vision_tower.", "model.vision_tower.vision_model."),),
    ),
    "qwen2_vl": Adapter(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", "model.language_model.layers", ("model.visual",)
    ),
    "qwen2_5_vl": Adapter(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "model.language_model.layers", ("model.visual",)
    ),
}


def adapter_for(model: str | Path, config=None) -> Adapter:
    """Adapter for a model folder or hub id, from its config alone (no weights read).

    Args:
        model: folder or hub id (used in messages, and to read the config).
        config: an already loaded transformers config, if any.

    Raises:
        UnsupportedArchitectureError: the ``model_type`` is not supported,
            naming it, the architectures and the supported types.
        OSError: the config cannot be found.
    """
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model))
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{model}: model_type {model_type!r} (architectures {getattr(config, 'architectures', None)}) "
            f"is not supported; sab-calibrate supports {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


def fused_groups(linears: dict[str, nn.Linear]) -> list[list[str]]:
    """Group linear names the way vLLM fuses them; other linears are singletons.

    Args:
        linears: ``{module name: nn.Linear}``.

    Returns:
        Groups in first-seen order, each a list of names (q, k, v order kept).
    """
    groups: list[list[str]] = []
    seen: set[str] = set()
    for name in linears:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        group = [name]
        for members in FUSED_GROUPS:
            if leaf in members:
                cand = [f"{parent}.{m}" for m in members]
                if all(c in linears for c in cand):
                    group = cand
                break
        seen.update(group)
        groups.append(group)
    return groups
