"""Visual-token pruning for LLaVA: keep the ``k`` most important image tokens after the projector.

Bi-VLM (arXiv 2509.18763, Sec. "token pruning") reports 90-99 % image-token
redundancy in binarized VLMs: most image tokens can be dropped before the
language model with little loss. This module keeps, per image,
``k = ceil(keep_ratio * n_visual)`` of the projector's output tokens, ranked by
an importance score, in their original (raster) order, so the language model
sees a shorter prompt and prefill does proportionally less work.

Bi-VLM does not publish its score; two training-free scores on the projected
tokens ``x_i`` (shape ``[n_visual, hidden]``) are offered:

- ``"deviation"`` (default): ``||x_i - mean_j x_j||_2``, how far a token is from
  the image's average token. Background patches are alike and close to the
  mean; objects and text stand out.
- ``"norm"``: ``||x_i||_2``, the token's magnitude.

Two integrations share :func:`select_visual_tokens`:

- transformers (evaluation): :func:`prune_transformers_llava` wraps a
  ``LlavaForConditionalGeneration`` instance's ``get_image_features`` and returns
  a processor that emits ``k`` image placeholders per image.
- vLLM: the registered architecture :data:`VLLM_ARCHITECTURE`
  (``vllm_sab.llava_pruned``), selected with :func:`vllm_hf_overrides`::

      vllm serve MODEL --hf-overrides '{"architectures": ["SabPrunedLlavaForConditionalGeneration"],
                                        "sab_visual_keep_ratio": 0.25}'

Qwen2-VL / Qwen2.5-VL are not supported: their image tokens carry 3-D mRoPE
positions computed from the full ``(t, h, w)`` patch grid (and merged 2x2), so
dropping tokens would need the position computation changed in vLLM's model
runner, not only in the model; pruning them here would silently shift every
remaining token's position.
"""

from __future__ import annotations

import copy
import functools
import math

import torch

__all__ = [
    "CONFIG_KEEP_RATIO",
    "CONFIG_SCORE",
    "SCORES",
    "VLLM_ARCHITECTURE",
    "n_visual_tokens",
    "num_kept",
    "prune_transformers_llava",
    "pruning_options",
    "select_visual_tokens",
    "token_scores",
    "vllm_hf_overrides",
]

#: Importance scores accepted by :func:`token_scores`.
SCORES: tuple[str, ...] = ("deviation", "norm")
#: The vLLM architecture name of the pruned LLaVA variant (registered by :func:`vllm_sab.register`).
VLLM_ARCHITECTURE = "SabPrunedLlavaForConditionalGeneration"
#: ``config.json`` / ``hf_overrides`` keys read by the vLLM variant.
CONFIG_KEEP_RATIO = "sab_visual_keep_ratio"
CONFIG_SCORE = "sab_visual_token_score"


def _check_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"visual keep_ratio must be a number in (0, 1], got {keep_ratio!r}")


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown visual token score {score!r}; expected one of {', '.join(SCORES)}")


def num_kept(n_visual: int, keep_ratio: float) -> int:
    """Image tokens kept per image: ``ceil(keep_ratio * n_visual)`` (at least 1).

    Args:
        n_visual: image tokens per image before pruning (>= 1).
        keep_ratio: fraction to keep, in (0, 1].

    Raises:
        ValueError: ``keep_ratio`` outside (0, 1] or ``n_visual < 1``.
    """
    _check_ratio(keep_ratio)
    if n_visual < 1:
        raise ValueError(f"n_visual must be >= 1, got {n_visual}")
    # The small epsilon keeps e.g. 0.3 * 10 (= 3.0000000000000004) at 3.
    return max(1, min(n_visual, math.ceil(keep_ratio * n_visual - 1e-9)))


def token_scores(features: torch.Tensor, score: str = "deviation") -> torch.Tensor:
    """Importance of each image token.

    Args:
        features: projected image tokens, ``[..., n_visual, hidden]``, any float dtype.
        score: ``"deviation"`` (distance to the image's mean token) or ``"norm"``.

    Returns:
        ``[..., n_visual]`` float32 scores; higher means keep.

    Raises:
        ValueError: unknown ``score``.
    """
    _check_score(score)
    x = features.float()
    if score == "norm":
        return x.norm(dim=-1)
    return (x - x.mean(dim=-2, keepdim=True)).norm(dim=-1)


def select_visual_tokens(features: torch.Tensor, keep_ratio: float, score: str = "deviation") -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top ``num_kept`` image tokens of each image, in their original order.

    Ties are broken by position (the earlier token wins), so two engines that
    compute the same scores select the same tokens.

    Args:
        features: ``[n_visual, hidden]`` (one image) or ``[batch, n_visual, hidden]``.
        keep_ratio: fraction of tokens to keep, in (0, 1].
        score: see :func:`token_scores`.

    Returns:
        ``(kept, index)``: ``kept`` has ``features``' dtype and shape with
        ``n_visual`` replaced by ``k``; ``index`` (int64, ``[..., k]``,
        ascending) says which tokens were kept.

    Raises:
        ValueError: bad ``keep_ratio`` or ``score``, or ``features`` not 2-D/3-D.
    """
    _check_ratio(keep_ratio)
    _check_score(score)
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be [n_visual, hidden] or [batch, n_visual, hidden], got shape {tuple(features.shape)}")
    k = num_kept(features.shape[-2], keep_ratio)
    if k == features.shape[-2]:
        index = torch.arange(k, device=features.device).expand(*features.shape[:-2], k)
        return features, index
    s = token_scores(features, score)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    index = order[..., :k].sort(dim=-1).values
    kept = torch.gather(features, -2, index.unsqueeze(-1).expand(*index.shape, features.shape[-1]))
    return kept, index


def pruning_options(config) -> tuple[float, str]:
    """``(keep_ratio, score)`` from a (LLaVA) Hugging Face config's :data:`CONFIG_KEEP_RATIO` / :data:`CONFIG_SCORE`.

    Missing keys mean no pruning (``1.0``) and ``"deviation"``.

    Raises:
        ValueError: a present value out of range, naming the config key.
    """
    ratio = getattr(config, CONFIG_KEEP_RATIO, None)
    score = getattr(config, CONFIG_SCORE, None)
    ratio = 1.0 if ratio is None else ratio
    score = "deviation" if score is None else score
    try:
        _check_ratio(ratio)
        _check_score(score)
    except ValueError as e:
        raise ValueError(f"model config {CONFIG_KEEP_RATIO}={ratio!r} / {CONFIG_SCORE}={score!r}: {e}") from None
    return float(ratio), score


def vllm_hf_overrides(keep_ratio: float, score: str = "deviation") -> dict:
    """The ``hf_overrides`` that make vLLM load a LLaVA checkpoint with visual-token pruning.

    Pass them to ``vllm.LLM(..., hf_overrides=...)`` or, as JSON, to
    ``vllm serve --hf-overrides``. The plugin (:func:`vllm_sab.register`)
    registers :data:`VLLM_ARCHITECTURE`.

    Raises:
        ValueError: bad ``keep_ratio`` or ``score``.
    """
    _check_ratio(keep_ratio)
    _check_score(score)
    return {"architectures": [VLLM_ARCHITECTURE], CONFIG_KEEP_RATIO: float(keep_ratio), CONFIG_SCORE: score}


def n_visual_tokens(config) -> int:
    """Image tokens per image of a fixed-resolution LLaVA-1.5 config (patches, plus CLS for the "full" strategy)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n


def pruned_llava_processor(processor, n_visual: int, keep_ratio: float):
    """A shallow copy of a ``LlavaProcessor`` that writes ``num_kept(n_visual, keep_ratio)`` placeholders per image.

    ``LlavaProcessor`` expands each image token to ``patches +
    num_additional_image_tokens (- 1 for the "default" strategy)``; the copy
    lowers ``num_additional_image_tokens`` by the number of pruned tokens.
    Fixed-resolution LLaVA-1.5 only (every image has ``n_visual`` tokens).

    Raises:
        TypeError: ``processor`` has no ``num_additional_image_tokens`` (not a LLaVA-1.5 processor).
    """
    if not hasattr(processor, "num_additional_image_tokens"):
        raise TypeError(f"visual-token pruning needs a LlavaProcessor, got {type(processor).__name__}")
    out = copy.copy(processor)
    out.num_additional_image_tokens = processor.num_additional_image_tokens - (n_visual - num_kept(n_visual, keep_ratio))
    return out


def prune_transformers_llava(model, processor, keep_ratio: float, score: str = "deviation"):
    """Make a transformers LLaVA-1.5 model see only the top image tokens; returns the matching processor.

    The model instance's ``get_image_features`` is wrapped (in place) so its
    ``pooler_output`` holds :func:`select_visual_tokens` of each image's
    projected tokens; the returned processor (a copy) emits as many
    placeholders. Use the two together; ``keep_ratio=1`` changes nothing.

    Args:
        model: ``LlavaForConditionalGeneration`` (``config.model_type == "llava"``).
        processor: its ``LlavaProcessor``.
        keep_ratio: fraction of image tokens kept, in (0, 1].
        score: see :func:`token_scores`.

    Returns:
        The processor to use with the pruned model.

    Raises:
        ValueError: not a LLaVA model (Qwen2-VL's mRoPE: see the module
            docstring), or bad ``keep_ratio`` / ``score``.
    """
    _check_ratio(keep_ratio)
    _check_score(score)
    if getattr(model.config, "model_type", None) != "llava":
        raise ValueError(
            f"visual-token pruning supports LLaVA only, got model_type {getattr(model.config, 'model_type', None)!r} "
            "(Qwen2-VL's mRoPE positions come from the full patch grid)"
        )
    inner = model.model
    original = getattr(inner, "_sab_unpruned_get_image_features", None) or inner.get_image_features

    # wraps(): generate() reads the signature to find the pixel arguments.
    @functools.wraps(original)
    def get_image_features(*args, **kwargs):
        out = original(*args, **kwargs)
        out.pooler_output = [select_visual_tokens(f, keep_ratio, score)[0] for f in out.pooler_output]
        return out

    inner._sab_unpruned_get_image_features = original
    inner.get_image_features = get_image_features
    return pruned_llava_processor(processor, n_visual_tokens(model.config), keep_ratio)
