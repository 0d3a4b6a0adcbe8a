"""Tiny VLM checkpoints (tests/tiny_models.py): they load in transformers and in vLLM CPU,
and both produce the same greedy tokens for an image+text chat prompt."""

from __future__ import annotations

import pytest
import torch

from tiny_models import KEY_STYLES, SUPPORTED_TINY_ARCHS, build_tiny_vlm, checkpoint_key, tiny_image

MAX_TOKENS = 8
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}
]


def _load_hf(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), AutoProcessor.from_pretrained(str(model_dir)), info


def test_unknown_arch_names_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="llava, qwen2_vl, qwen2_5_vl"):
        build_tiny_vlm("gpt2", tmp_path)
    with pytest.raises(ValueError, match="transformers, hub"):
        build_tiny_vlm("llava", tmp_path, key_style="nope")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
@pytest.mark.parametrize("key_style", KEY_STYLES)
def test_loads_in_transformers(tiny_vlm, arch, key_style):
    """No missing / unexpected keys; every linear's input dim is a multiple of 128."""
    from safetensors import safe_open

    model_dir = tiny_vlm(arch, key_style)
    model, proc, info = _load_hf(model_dir)
    assert not any(info.values()), info
    assert type(model).__name__ == model.config.architectures[0]

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, t in model.state_dict().items():
            assert torch.equal(f.get_tensor(checkpoint_key(arch, name, key_style)), t), name
    assert len(keys) == len(model.state_dict())

    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (256, 512, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.vocab_size == len(proc.tokenizer)
    assert not model.config.tie_word_embeddings
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert any("visual" in n or "vision_tower" in n for n in linears)
    for name, lin in linears.items():
        assert lin.in_features % 128 == 0, (name, lin.in_features)


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_chat_template_and_image_tokens(tiny_vlm, arch):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_vlm(arch)))
    prompt = proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=[tiny_image()], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    config = __import__("json").loads((tiny_vlm(arch) / "config.json").read_text())
    if arch == "llava":
        assert prompt == "USER: <image>\nWhat is in this picture? ASSISTANT:"
        assert ids[0] == proc.tokenizer.bos_token_id
        assert ids.count(config["image_token_index"]) == 16  # 4x4 patches, CLS dropped
    else:
        assert "<|vision_start|><|image_pad|><|vision_end|>What is in this picture?<|im_end|>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        n_image = ids.count(config["image_token_id"])
        assert 4 <= n_image <= 16
        start = ids.index(config["vision_start_token_id"])
        assert ids[start + 1 + n_image] == config["vision_end_token_id"]


def test_build_is_deterministic(tmp_path):
    a = build_tiny_vlm("qwen2_vl", tmp_path / "a")
    b = build_tiny_vlm("qwen2_vl", tmp_path / "b")
    c = build_tiny_vlm("qwen2_vl", tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


@pytest.mark.vllm
@pytest.mark.parametrize(
    "arch,key_style",
    [(a, "transformers") for a in SUPPORTED_TINY_ARCHS] + [("llava", "hub"), ("qwen2_vl", "hub")],
)
def test_vllm_greedy_matches_transformers(tiny_vlm, make_llm, arch, key_style):
    """float32: vLLM CPU and transformers agree on prompt ids and 8 greedy tokens."""
    from vllm import SamplingParams

    model_dir = tiny_vlm(arch, key_style)
    image = tiny_image()
    model, proc, _ = _load_hf(model_dir)
    prompt = proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    hf_tokens = out[0, n_prompt:].tolist()
    del model

    llm = make_llm(model_dir)
    (result,) = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": image}},
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        use_tqdm=False,
    )
    assert list(result.prompt_token_ids) == inputs["input_ids"][0].tolist()
    vllm_tokens = list(result.outputs[0].token_ids)
    assert len(vllm_tokens) >= 4
    assert vllm_tokens == hf_tokens
