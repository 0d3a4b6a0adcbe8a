"""Quickstart: calibrate a VLM offline into a sab checkpoint and ask vLLM about an image.

    python examples/quickstart.py                      # tiny offline LLaVA, CPU
    python examples/quickstart.py --model llava-hf/llava-1.5-7b-hf --workdir out/

Without ``--model`` it builds a tiny random LLaVA-1.5 locally (no hub access), so
the answer is noise: the point is the path (calibrate -> packed checkpoint ->
vLLM with --quantization sab). It prints the question, vLLM's answer, the model
sizes and the true bits per weight of the quantized linears.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# CPU-friendly vLLM defaults (in-process engine, no telemetry, offline); the shell can override.
for key, value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (default: a tiny LLaVA built offline)")
    p.add_argument("--workdir", default=".scratch/quickstart", help="where checkpoints go")
    p.add_argument("--method", default="sign")
    p.add_argument("--question", default="What shapes and colors are in this image?")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vllm_sab.calibrate import calibrate
    from vllm_sab.testing import build_tiny_vlm, tiny_image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = build_tiny_vlm("llava", work / "tiny-llava")
    else:
        model = args.model
    ckpt = calibrate(model, work / f"sab-{args.method}", method=args.method, overwrite=True)
    report = json.loads((ckpt / "sab_report.json").read_text())["summary"]

    processor = AutoProcessor.from_pretrained(str(ckpt))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    on_gpu = torch.cuda.is_available()
    llm = LLM(
        model=str(ckpt),
        quantization="sab",
        dtype="float16" if on_gpu else "float32",
        enforce_eager=not on_gpu,
        max_model_len=2048 if on_gpu else 512,
        limit_mm_per_prompt={"image": 1},
        **({} if on_gpu else {"kv_cache_memory_bytes": 64 << 20}),
    )
    out = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": tiny_image(0)}},
        SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
        use_tqdm=False,
    )
    answer = out[0].outputs[0].text
    src = Path(model) if Path(model).is_dir() else None
    print()
    print(f"question : {args.question}")
    print(f"answer   : {answer!r}  (vLLM, --quantization sab, {args.method} checkpoint)")
    if src is not None:
        print(f"model    : {_folder_bytes(src) / 1e6:.2f} MB full precision -> {_folder_bytes(ckpt) / 1e6:.2f} MB sab")
    else:
        print(f"model    : {_folder_bytes(ckpt) / 1e6:.2f} MB sab")
    print(
        f"linears  : {report['quantized_linears']} quantized, {report['true_bits_per_weight']:.3f} true bits/weight "
        f"(papers' convention {report['paper_weight_bits']:.3f}); "
        f"{report['fp16_bytes_of_quantized'] / 1e6:.2f} MB fp16 -> {report['quantized_bytes'] / 1e6:.3f} MB"
    )
    print(f"checkpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
