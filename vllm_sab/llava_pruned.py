"""vLLM's LLaVA-1.5 with visual-token pruning (architecture ``SabPrunedLlavaForConditionalGeneration``).

Selected per model with ``hf_overrides`` (:func:`vllm_sab.token_pruning.vllm_hf_overrides`);
the checkpoint is an ordinary LLaVA checkpoint (full precision or sab) and its
weights load unchanged. Two pieces must agree on ``k`` per image:

- the processing info reports ``k = num_kept(n_visual, keep_ratio)`` image
  tokens, so the prompt holds ``k`` placeholders (and the KV cache, the
  scheduler and the dummy profiling run see the shorter prompt), and its HF
  processor expands ``<image>`` to ``k`` tokens too;
- the model's image encoder returns the ``k`` selected projector outputs
  (:func:`vllm_sab.token_pruning.select_visual_tokens`) in raster order.

Precomputed ``image_embeds`` inputs are passed through unpruned: their token
count is the caller's. Imported by vLLM only (it imports vLLM internals).
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .token_pruning import n_visual_tokens, num_kept, pruned_llava_processor, pruning_options, select_visual_tokens

__all__ = ["SabPrunedLlavaForConditionalGeneration", "SabPrunedLlavaProcessingInfo"]


class SabPrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA processing info that counts ``k`` image tokens per image instead of ``n_visual``."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return num_kept(n, pruning_options(self.get_hf_config())[0])

    def get_hf_processor(self, **kwargs: object):
        processor = super().get_hf_processor(**kwargs)
        config = self.get_hf_config()
        return pruned_llava_processor(processor, n_visual_tokens(config), pruning_options(config)[0])


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=SabPrunedLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class SabPrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image encoder keeps the top ``k`` projected tokens per image.

    Options (``hf_config``): ``sab_visual_keep_ratio`` in (0, 1] (default 1)
    and ``sab_visual_token_score`` (``"deviation"`` or ``"norm"``).

    Raises:
        ValueError: at construction, if the options are out of range.
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visual_keep_ratio, self.visual_token_score = pruning_options(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input):
        embeds = super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs) or self.visual_keep_ratio == 1.0:
            return embeds
        if isinstance(embeds, (list, tuple)):
            return tuple(select_visual_tokens(e, self.visual_keep_ratio, self.visual_token_score)[0] for e in embeds)
        return select_visual_tokens(embeds, self.visual_keep_ratio, self.visual_token_score)[0]
