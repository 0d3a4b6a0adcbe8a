"""Tiny random vision-language checkpoints, built locally (no model hub): development fixtures.

Not part of the installed package (``pip install vllm-sab`` ships the plugin, the
format, the kernels, the calibrator and the demo's ``sab-eval``): the tests import
this module directly (pytest puts ``tests/`` on ``sys.path``), and the scripts of
the checkout that build models (``examples/train_shapes_vlm.py``, ``benchmarks/``,
``scripts/check-wheel.sh``) put ``tests/`` on their path first.

The models are small enough to build in a few seconds and to run in vLLM on a
CPU, yet shaped like the real thing: a LLaVA-1.5 (CLIP + Llama), a Qwen2-VL and
a Qwen2.5-VL, with a locally trained byte-level BPE tokenizer, a chat template
that renders image parts, and the architecture's image processor at a small
image size. Every linear layer's input dimension in the language model, the
projector and the vision tower is a multiple of 128, so the checkpoints can be
quantized with 128-wide blocks along the input dimension.

Usage (``tests/`` on ``sys.path``)::

    from tiny_models import build_tiny_vlm, tiny_image
    model_dir = build_tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")

or from the shell, in the checkout::

    python tests/tiny_models.py llava OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

__all__ = [
    "KEY_STYLES",
    "SUPPORTED_TINY_ARCHS",
    "checkpoint_key",
    "build_tiny_vlm",
    "build_tiny_tokenizer",
    "llava_parts",
    "save_vlm",
    "tiny_image",
]

#: Architectures :func:`build_tiny_vlm` can build.
SUPPORTED_TINY_ARCHS: tuple[str, ...] = ("llava", "qwen2_vl", "qwen2_5_vl")
#: Checkpoint key layouts (see :func:`checkpoint_key`).
KEY_STYLES: tuple[str, ...] = ("transformers", "hub")

# Shapes shared by all three language models.
_LM = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
# Vision tower shapes.
_VIS_WIDTH = 128
_VIS_INTERMEDIATE = 256
_VIS_LAYERS = 2
_VIS_HEADS = 2
_PATCH = 14
# LLaVA's CLIP input size: 4x4 = 16 patches (+ CLS, dropped by "default").
_CLIP_IMAGE_SIZE = 56
# Qwen image processor pixel budget: an image becomes 4x4..8x8 patches,
# i.e. 4..16 visual tokens after the 2x2 merge.
_QWEN_MIN_PIXELS = 56 * 56
_QWEN_MAX_PIXELS = 112 * 112

# Standard deviation of the random weights. Larger than the usual 0.02 so
# that the tiny random models do not collapse onto one token under greedy
# decoding.
_INIT_STD = 0.08

_LLAVA_SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "image": "<image>"}
_QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# LLaVA-1.5 style ("USER: <image>\n... ASSISTANT:"). Content parts are rendered in
# the order given, so a question may come before its image (LLaVA-1.5's own
# instruction data has both orders).
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' or c['type'] == 'image_pil' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL's ChatML template.
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an one two three red green blue yellow black white small large round square "
    "cat dog bird fish car tree house sun moon star picture image photo shows there is are "
    "on in under over near left right top bottom middle of and with what where which color "
    "shape describe this that it looks like see can you please answer question yes no "
    "circle triangle box line sky water grass road person man woman child table chair book"
).split()


def _corpus(n_lines: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic pseudo-English lines for tokenizer training."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 999)}"
        lines.append(line)
    return lines


def build_tiny_tokenizer(arch: str, *, vocab_size: int = 1024, texts: list[str] | None = None):
    """Train a small byte-level BPE tokenizer for ``arch``, deterministically.

    Args:
        arch: one of :data:`SUPPORTED_TINY_ARCHS`; decides the special tokens
            (LLaVA: ``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<image>``, and a
            BOS added to every encoded sequence; Qwen: the ChatML and vision
            tokens ``<|im_start|>``, ``<|image_pad|>`` ... ) and chat template.
        vocab_size: target vocabulary size including the special tokens (the
            trainer may stop earlier on the small corpus).
        texts: training corpus (lines); default: built-in pseudo-English lines.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with a chat template. Nothing
        is written to disk.

    Raises:
        ValueError: unknown ``arch``.
    """
    _check_arch(arch)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "llava":
        specials = [_LLAVA_SPECIAL[k] for k in ("unk", "bos", "eos", "pad", "image")]
    else:
        specials = list(_QWEN_SPECIAL)

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else _corpus(), trainer=trainer)

    if arch == "llava":
        bos = _LLAVA_SPECIAL["bos"]
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=_LLAVA_SPECIAL["bos"],
            eos_token=_LLAVA_SPECIAL["eos"],
            pad_token=_LLAVA_SPECIAL["pad"],
            unk_token=_LLAVA_SPECIAL["unk"],
            extra_special_tokens={"image_token": _LLAVA_SPECIAL["image"]},
            model_max_length=_LM["max_position_embeddings"],
            padding_side="left",
            clean_up_tokenization_spaces=False,
        )
        fast.chat_template = _LLAVA_CHAT_TEMPLATE
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            model_max_length=_LM["max_position_embeddings"],
            padding_side="left",
            clean_up_tokenization_spaces=False,
        )
        fast.chat_template = _QWEN_CHAT_TEMPLATE
    return fast


def tiny_image(seed: int = 0, size: tuple[int, int] = (96, 96)):
    """A small deterministic RGB test image: a background and a few colored shapes.

    Args:
        seed: selects colors and positions (same seed, same pixels).
        size: ``(width, height)`` in pixels.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    for i in range(4):
        color = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.randint(0, w - 8), rng.randint(0, h - 8)
        x1, y1 = rng.randint(x0 + 4, w), rng.randint(y0 + 4, h)
        if i % 2:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=color)
    return img


def _check_arch(arch: str) -> None:
    if arch not in SUPPORTED_TINY_ARCHS:
        raise ValueError(
            f"unknown tiny VLM architecture {arch!r}; supported: {', '.join(SUPPORTED_TINY_ARCHS)}"
        )


def _text_config(tokenizer, **extra) -> dict:
    cfg = dict(_LM)
    cfg.update(
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=_INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(extra)
    return cfg


def llava_parts(
    tokenizer,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    image_size: int = _CLIP_IMAGE_SIZE,
    patch_size: int = _PATCH,
    init_std: float = _INIT_STD,
):
    """A LLaVA-1.5 configuration and processor around ``tokenizer`` (no weights).

    Args:
        tokenizer: a LLaVA tokenizer from :func:`build_tiny_tokenizer`.
        text: Llama config overrides (``hidden_size``, ``num_hidden_layers`` ...);
            default: the tiny test shapes (hidden 256, 2 layers).
        vision: CLIP vision config overrides (``hidden_size``,
            ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``).
        image_size: CLIP input side in pixels.
        patch_size: CLIP patch side in pixels; ``(image_size // patch_size) ** 2``
            visual tokens per image.
        init_std: ``initializer_range`` of both towers.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor)``.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    n_patches = (image_size // patch_size) ** 2
    image_token_id = tokenizer.convert_tokens_to_ids(_LLAVA_SPECIAL["image"])
    vision_config = dict(
        model_type="clip_vision_model",
        hidden_size=_VIS_WIDTH,
        intermediate_size=_VIS_INTERMEDIATE,
        num_hidden_layers=_VIS_LAYERS,
        num_attention_heads=_VIS_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        initializer_range=init_std,
    )
    vision_config.update(vision or {})
    vision_config["projection_dim"] = vision_config["hidden_size"]
    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            **_text_config(tokenizer, head_dim=64, rope_theta=10000.0, initializer_range=init_std, **(text or {})),
        ),
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        # Last encoder layer: vLLM then builds (and a quantizer sees) both layers.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration, config, processor


def _qwen_processor(arch, tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if arch == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Proc
    else:
        from transformers import Qwen2_5_VLProcessor as Proc
    size = {"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=_PATCH, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size, patch_size=_PATCH, temporal_patch_size=2, merge_size=2
    )
    return Proc(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _qwen_ids(tokenizer) -> dict:
    t = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=t("<|image_pad|>"),
        video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"),
        vision_end_token_id=t("<|vision_end|>"),
    )


def _qwen_text_config(tokenizer) -> dict:
    # head_dim 64 -> mrope_section sums to 32 (Qwen2-VL-7B: 128 -> [16, 24, 24]).
    return _text_config(
        tokenizer,
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        use_sliding_window=False,
        max_window_layers=_LM["num_hidden_layers"],
    )


def _qwen2_vl(tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config=dict(
            depth=_VIS_LAYERS,
            embed_dim=_VIS_WIDTH,
            hidden_size=_LM["hidden_size"],  # merger output = LM width
            mlp_ratio=_VIS_INTERMEDIATE // _VIS_WIDTH,
            num_heads=_VIS_HEADS,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=_INIT_STD,
        ),
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    return Qwen2VLForConditionalGeneration, config, _qwen_processor("qwen2_vl", tokenizer)


def _qwen2_5_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config=dict(
            depth=_VIS_LAYERS,
            hidden_size=_VIS_WIDTH,
            intermediate_size=_VIS_INTERMEDIATE,
            out_hidden_size=_LM["hidden_size"],
            num_heads=_VIS_HEADS,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # Windows of 56 px = 2x2 merged tokens = 4x4 patches; layer 0
            # attends within windows, layer 1 globally.
            window_size=56,
            fullatt_block_indexes=[_VIS_LAYERS - 1],
            tokens_per_second=2,
            initializer_range=_INIT_STD,
        ),
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration, config, _qwen_processor("qwen2_5_vl", tokenizer)


def _llava(tokenizer):
    return llava_parts(tokenizer)


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl}


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights: normal(0, _INIT_STD) for matrices, small
    random biases, norms at 1 (plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                w = torch.randn(p.shape, generator=gen, dtype=torch.float32) * _INIT_STD
                if "embed_tokens" in name or "position_embedding" in name:
                    w = w * (1.0 / _INIT_STD) * 0.5  # embeddings: std 0.5
            elif "norm" in name and name.endswith("weight"):
                w = 1.0 + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            else:  # biases, class embedding
                w = 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(w.to(p.dtype))


def checkpoint_key(arch: str, name: str, key_style: str = "transformers") -> str:
    """Map a transformers 5 in-memory parameter name to a checkpoint key.

    Args:
        arch: one of :data:`SUPPORTED_TINY_ARCHS`.
        name: parameter name in ``model.state_dict()`` of the transformers
            model (e.g. ``model.vision_tower.encoder.layers.0.mlp.fc1.weight``).
        key_style: ``"transformers"``: the in-memory name, except that
            LLaVA's CLIP tower keeps the ``vision_model.`` level that vLLM
            needs (``model.vision_tower.vision_model.encoder...``).
            ``"hub"``: the layout of the original hub checkpoints
            (llava-hf: ``language_model.model.*``, ``language_model.lm_head.*``,
            ``vision_tower.vision_model.*``, ``multi_modal_projector.*``;
            Qwen2-VL / Qwen2.5-VL: ``model.*`` for the language model,
            ``visual.*``, ``lm_head.*``).

    Returns:
        The checkpoint key. Both styles load in transformers 5.19 and vLLM 0.32.

    Raises:
        ValueError: unknown ``arch`` or ``key_style``.
    """
    _check_arch(arch)
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key_style {key_style!r}; supported: {', '.join(KEY_STYLES)}")
    # The in-memory -> checkpoint renames (LLaVA's `vision_model.` level) are the
    # calibrator's: one place knows them.
    from vllm_sab.calibrate.models import ADAPTERS

    name = ADAPTERS[arch].checkpoint_name(name)
    if arch == "llava":
        if key_style == "hub":
            for old, new in (
                ("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
            ):
                if name.startswith(old):
                    return new + name[len(old):]
        return name
    if key_style == "hub":
        for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if name.startswith(old):
                return new + name[len(old):]
    return name


def save_vlm(model, out_dir: str | Path, *, arch: str, processor, key_style: str = "transformers") -> Path:
    """Save a transformers VLM as a model folder that both transformers and vLLM load.

    Writes ``config.json`` (with ``architectures``), ``generation_config.json``
    (greedy, the tokenizer's EOS), ``model.safetensors`` in the model's dtype
    with keys from :func:`checkpoint_key`, the processor and tokenizer files
    and ``chat_template.jinja``.

    Args:
        model: a ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` /
            ``Qwen2_5_VLForConditionalGeneration``.
        out_dir: folder to write (created if missing; files in it are overwritten).
        arch: one of :data:`SUPPORTED_TINY_ARCHS`, matching ``model``.
        processor: the model's processor (its ``tokenizer`` is saved too).
        key_style: ``"transformers"`` or ``"hub"`` (see :func:`checkpoint_key`).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: unknown ``arch`` or ``key_style``.
    """
    _check_arch(arch)
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key_style {key_style!r}; supported: {', '.join(KEY_STYLES)}")
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    config = model.config
    model_cls = type(model)
    # Save config and weights ourselves: transformers 5.19 holds (and
    # save_pretrained writes) LLaVA's CLIP tower without the "vision_model."
    # level, which vLLM does not load; see checkpoint_key().
    config.dtype = next(model.parameters()).dtype
    config.architectures = [model_cls.__name__]
    config.save_pretrained(out)
    eos = tokenizer.eos_token_id
    if arch != "llava":
        eos = [eos, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)

    state: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        ident = (t.data_ptr(), tuple(t.shape), t.stride())
        if t.numel() and ident in seen:  # tied / shared tensor: keep the first name
            continue
        seen.add(ident)
        state[checkpoint_key(arch, name, key_style)] = t.detach().contiguous().clone()
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)

    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Keep the chat template next to the tokenizer too (vLLM's chat endpoint
    # and AutoTokenizer users read it from there).
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    return out


def build_tiny_vlm(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    key_style: str = "transformers",
) -> Path:
    """Build a tiny random vision-language model and save it as a HF model directory.

    The directory loads with ``transformers`` (``AutoModelForImageTextToText`` /
    ``AutoProcessor`` or the architecture's own classes) and with vLLM (CPU is
    fine). Language model: hidden 256, intermediate 512, 2 layers, 4 heads,
    2 KV heads, vocabulary of the tokenizer (about 600 tokens), untied
    ``lm_head``. Vision tower: width 128, MLP 256, 2 layers, 2 heads, patch 14.

    Args:
        arch: ``"llava"`` (LLaVA-1.5: CLIP 56 px + Llama), ``"qwen2_vl"`` or
            ``"qwen2_5_vl"``.
        out_dir: directory to write (created if missing; files in it are
            overwritten).
        seed: seed of the random weights (the tokenizer is always the same).
        dtype: dtype of the saved weights (``dtype`` in config.json).
        key_style: checkpoint key layout, ``"transformers"`` (default) or
            ``"hub"``; see :func:`checkpoint_key`.

    Writes:
        ``config.json``, ``generation_config.json``, ``model.safetensors``
        (keys from :func:`checkpoint_key`, e.g.
        ``model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight``;
        both transformers and vLLM load them), ``tokenizer.json``,
        ``tokenizer_config.json``, ``chat_template.jinja`` and the processor /
        image processor configuration.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``arch`` is not one of :data:`SUPPORTED_TINY_ARCHS`.
    """
    _check_arch(arch)
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key_style {key_style!r}; supported: {', '.join(KEY_STYLES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(arch)
    model_cls, config, processor = _BUILDERS[arch](tokenizer)
    config.dtype = dtype

    # Distinct weights per architecture for the same seed (the two Qwen language
    # models have identical shapes and would otherwise be the same model).
    weight_seed = seed * len(SUPPORTED_TINY_ARCHS) + SUPPORTED_TINY_ARCHS.index(arch)
    torch.manual_seed(weight_seed)
    model = model_cls(config)
    _init_weights(model, weight_seed)
    model = model.to(dtype).eval()

    save_vlm(model, out, arch=arch, processor=processor, key_style=key_style)
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/tiny_models.py",
        description="Build a tiny random vision-language checkpoint (no model hub needed).",
    )
    parser.add_argument("arch", choices=SUPPORTED_TINY_ARCHS)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--key-style", choices=KEY_STYLES, default="transformers")
    args = parser.parse_args(argv)
    path = build_tiny_vlm(
        args.arch, args.out_dir, seed=args.seed, dtype=getattr(torch, args.dtype), key_style=args.key_style
    )
    print(json.dumps({"arch": args.arch, "path": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
