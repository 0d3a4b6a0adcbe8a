"""Quickstart: calibrate a VLM offline into a sab checkpoint and ask vLLM about images.

    python examples/quickstart.py                       # the shipped small LLaVA, CPU, offline
    python examples/quickstart.py --method arb-rc --questions 9
    python examples/quickstart.py --model llava-hf/llava-1.5-7b-hf --workdir out/   # a real model (GPU)

By default it binarizes ``models/shapes-llava`` (a small LLaVA-1.5 trained on
ShapesQA, shipped in this repository) with SAB-LVLM on the built-in
calibration data, serves the packed checkpoint with vLLM
(``--quantization sab``) and asks it held-out ShapesQA questions, printing
each question, the sab answer from vLLM, the full-precision answer and the
expected one, then the model sizes and the true bits per weight.
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
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "shapes-llava"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder or hub id (default: the shipped small LLaVA)")
    p.add_argument("--workdir", default=str(REPO / ".scratch" / "quickstart"), help="where the checkpoint goes")
    p.add_argument("--method", default="sab", help="calibration method (sab, arb-rc, arb-x, billm, uniform2, sign)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration samples (built-in data)")
    p.add_argument("--questions", type=int, default=6, help="held-out ShapesQA questions to ask")
    args = p.parse_args(argv)
    if args.model == str(DEFAULT_MODEL) and not (DEFAULT_MODEL / "config.json").is_file():
        print(f"quickstart: {DEFAULT_MODEL} is missing; retrain it with examples/train_shapes_vlm.py", file=sys.stderr)
        return 2

    from transformers import AutoProcessor
    from vllm import SamplingParams

    from vllm_sab.demo import shapesqa
    from vllm_sab.calibrate import calibrate
    from vllm_sab.demo.evaluate import chat_prompt, load_transformers, make_llm, transformers_answers

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # The shipped model was trained on ShapesQA, so the built-in ShapesQA samples are its calibration data.
    ckpt = calibrate(
        args.model, work / f"sab-{args.method}", method=args.method, data="builtin", num_samples=args.num_samples,
        overwrite=True,
    )
    report = json.loads((ckpt / "sab_report.json").read_text())["summary"]

    # Held-out questions, cycling through the question types (first the visual ones).
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, args.questions, balanced=True)
    processor = AutoProcessor.from_pretrained(str(ckpt))
    llm = make_llm(ckpt)
    requests = [
        {"prompt": chat_prompt(processor, s), **({"multi_modal_data": {"image": s.image}} if s.image else {})}
        for s in samples
    ]
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    sab_answers = [o.outputs[0].text.strip() for o in outs]
    fp_answers = [a.strip() for a in transformers_answers(load_transformers(args.model), processor, samples)]

    print()
    for s, sab, fp in zip(samples, sab_answers, fp_answers):
        what = "question + image" if s.image else "text question"
        print(f"[{s.qtype}, {what}] {s.question}")
        print(f"    sab ({args.method}, vLLM): {sab!r}   full precision: {fp!r}   expected: {s.answer!r}")
    right = sum(shapesqa.normalize_answer(a) == shapesqa.normalize_answer(s.answer) for a, s in zip(sab_answers, samples))
    print(f"\nsab answers correct: {right}/{len(samples)}")
    src = Path(args.model) if Path(args.model).is_dir() else None
    if src is not None:
        print(f"model    : {_folder_bytes(src) / 1e6:.2f} MB full precision -> {_folder_bytes(ckpt) / 1e6:.2f} MB sab")
    print(
        f"linears  : {report['quantized_linears']} quantized, {report['true_bits_per_weight']:.3f} true bits/weight "
        f"(papers' convention {report['paper_weight_bits']:.3f}); "
        f"{report['fp16_bytes_of_quantized'] / 1e6:.2f} MB fp16 -> {report['quantized_bytes'] / 1e6:.3f} MB"
    )
    print(f"checkpoint: {ckpt}  (serve it: vllm serve {ckpt} --quantization sab)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
