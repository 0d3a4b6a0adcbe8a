"""Shared helpers of the end-to-end tests: vLLM CPU engines, prompts, reference tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import tiny_image

MAX_TOKENS = 8
QUESTION = "What is in the image?"


def chat_prompt(model_dir: str | Path) -> str:
    """The chat-templated image+text prompt of a model folder."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def vllm_greedy(llm, model_dir: str | Path) -> list[int]:
    """Greedy token ids from a ``vllm.LLM`` for the image+text prompt of ``model_dir``."""
    from vllm import SamplingParams

    out = llm.generate(
        {"prompt": chat_prompt(model_dir), "multi_modal_data": {"image": tiny_image(0)}},
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )
    return list(out[0].outputs[0].token_ids)


def hf_greedy(model: torch.nn.Module, model_dir: str | Path) -> list[int]:
    """Greedy token ids from a transformers model for the same prompt and image."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(model_dir))
    inputs = proc(text=[chat_prompt(model_dir)], images=[tiny_image(0)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()
