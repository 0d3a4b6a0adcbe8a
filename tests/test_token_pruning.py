"""Visual-token pruning: selection against brute force, transformers against a hand-built forward, vLLM against transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vllm_sab.demo import shapesqa
from vllm_sab.demo.evaluate import chat_prompt, load_transformers, transformers_answers, vllm_answers
from vllm_sab.token_pruning import (
    CONFIG_KEEP_RATIO,
    num_kept,
    prune_transformers_llava,
    pruning_options,
    select_visual_tokens,
    vllm_hf_overrides,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-llava"


@pytest.mark.parametrize("n,ratio,k", [(16, 1.0, 16), (16, 0.5, 8), (16, 0.25, 4), (16, 0.1, 2), (576, 0.1, 58),
                                       (10, 0.3, 3), (7, 0.01, 1)])
def test_num_kept_is_ceil_of_ratio_times_tokens(n, ratio, k):
    assert num_kept(n, ratio) == k


def _brute_force(features: torch.Tensor, k: int, score: str) -> list[int]:
    n = features.shape[0]
    mean = [sum(float(features[j, d]) for j in range(n)) / n for d in range(features.shape[1])]
    scores = []
    for i in range(n):
        center = mean if score == "deviation" else [0.0] * features.shape[1]
        scores.append(math.sqrt(sum((float(features[i, d]) - center[d]) ** 2 for d in range(features.shape[1]))))
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


@pytest.mark.parametrize("score", ["deviation", "norm"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
def test_selection_matches_brute_force_top_k_in_raster_order(score, ratio):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 20, 6, generator=g)
    feats[1, 5] = feats[1, 9]  # an exact tie: the earlier token must win
    kept, index = select_visual_tokens(feats, ratio, score)
    k = num_kept(20, ratio)
    assert kept.shape == (3, k, 6) and index.shape == (3, k)
    for b in range(3):
        expect = _brute_force(feats[b], k, score)
        assert index[b].tolist() == expect
        assert torch.equal(kept[b], feats[b, expect])
        single, single_index = select_visual_tokens(feats[b], ratio, score)
        assert single_index.tolist() == expect and torch.equal(single, kept[b])


def test_keep_ratio_one_is_the_identity():
    feats = torch.randn(2, 9, 4)
    kept, index = select_visual_tokens(feats, 1.0)
    assert torch.equal(kept, feats) and index[1].tolist() == list(range(9))


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_keep_ratio_is_rejected(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        select_visual_tokens(torch.randn(4, 2), bad)
    with pytest.raises(ValueError, match="keep_ratio"):
        vllm_hf_overrides(bad)


def test_bad_score_and_shape_are_rejected():
    with pytest.raises(ValueError, match="score 'cls'"):
        select_visual_tokens(torch.randn(4, 2), 0.5, "cls")
    with pytest.raises(ValueError, match="shape"):
        select_visual_tokens(torch.randn(4), 0.5)


def test_config_options_are_read_and_checked():
    class Cfg:
        pass

    cfg = Cfg()
    assert pruning_options(cfg) == (1.0, "deviation")
    setattr(cfg, CONFIG_KEEP_RATIO, 0.25)
    assert pruning_options(cfg) == (0.25, "deviation")
    setattr(cfg, CONFIG_KEEP_RATIO, 2)
    with pytest.raises(ValueError, match=CONFIG_KEEP_RATIO):
        pruning_options(cfg)


def _hand_built_logits(model, processor, sample, ratio: float) -> torch.Tensor:
    """Reference: project the image by hand, select by brute force, splice into the embeddings of k placeholders."""
    cfg = model.config
    proc_inputs = processor(text=[chat_prompt(processor, sample)], images=[sample.image], return_tensors="pt")
    hidden = model.model.vision_tower(proc_inputs["pixel_values"], output_hidden_states=True).hidden_states
    feats = model.model.multi_modal_projector(hidden[cfg.vision_feature_layer][:, 1:])[0]
    k = num_kept(feats.shape[0], ratio)
    chosen = feats[_brute_force(feats.detach(), k, "deviation")]
    # The prompt with k placeholders, built without the pruned processor.
    prompt_ids = processor.tokenizer(chat_prompt(processor, sample)).input_ids
    ids = []
    for t in prompt_ids:
        ids.extend([t] * k if t == cfg.image_token_index else [t])
    ids = torch.tensor([ids])
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == cfg.image_token_index] = chosen
    return model(inputs_embeds=embeds).logits


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_transformers_pruning_equals_hand_built_forward(ratio):
    model = load_transformers(SHIPPED)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(SHIPPED))
    sample = shapesqa.make_sample(shapesqa.HELDOUT_SEED, 4, qtype="color")
    expect = _hand_built_logits(model, processor, sample, ratio)
    pruned_proc = prune_transformers_llava(model, processor, ratio)
    inputs = pruned_proc(text=[chat_prompt(processor, sample)], images=[sample.image], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == num_kept(16, ratio)
    got = model(**inputs).logits
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    # The caller's processor is untouched.
    full = processor(text=[chat_prompt(processor, sample)], images=[sample.image], return_tensors="pt")
    assert int((full["input_ids"] == model.config.image_token_index).sum()) == 16


def test_pruning_rejects_qwen(tiny_vlm):
    from transformers import AutoProcessor

    path = tiny_vlm("qwen2_vl")
    with pytest.raises(ValueError, match="LLaVA only"):
        prune_transformers_llava(load_transformers(path), AutoProcessor.from_pretrained(str(path)), 0.5)


@pytest.mark.vllm
@pytest.mark.parametrize("ratio,score", [(0.25, "deviation"), (0.5, "norm")])
def test_vllm_pruned_llava_answers_equal_transformers(make_llm, ratio, score):
    """The registered vLLM variant sees k placeholders and answers exactly as the transformers wrapper."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    processor = AutoProcessor.from_pretrained(str(SHIPPED))
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, 54, balanced=True)
    model = load_transformers(SHIPPED)
    pruned_proc = prune_transformers_llava(model, processor, ratio, score)
    expect = transformers_answers(model, pruned_proc, samples)

    llm = make_llm(SHIPPED, hf_overrides=vllm_hf_overrides(ratio, score))
    image_sample = samples[0]
    out = llm.generate({"prompt": chat_prompt(processor, image_sample), "multi_modal_data": {"image": image_sample.image}},
                       SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    ref_ids = pruned_proc(text=[chat_prompt(processor, image_sample)], images=[image_sample.image], return_tensors="pt")["input_ids"][0]
    assert list(out.prompt_token_ids) == ref_ids.tolist()
    assert ref_ids.tolist().count(model.config.image_token_index) == num_kept(16, ratio)
    assert vllm_answers(llm, processor, samples) == expect
