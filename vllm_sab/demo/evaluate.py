"""``sab-eval``: task accuracy of a full-precision or sab checkpoint on held-out ShapesQA.

Two engines answer the same held-out questions with greedy decoding:

- ``transformers``: the model folder loaded with transformers; a sab checkpoint
  is loaded with dense ``W_hat`` (:func:`reference_model.load_dequantized`),
  so it computes exactly what the packed checkpoint encodes.
- ``vllm``: ``vllm.LLM`` (a sab checkpoint through the plugin, CPU or GPU).

Both print accuracy per question type next to its chance level (the best
constant answer). ``--compare`` runs both engines and counts the questions on
which their answers differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from vllm_sab.demo import shapesqa

__all__ = ["chat_prompt", "evaluate", "is_sab_checkpoint", "load_transformers", "main", "transformers_answers", "vllm_answers"]

#: New tokens generated per answer (the longest answer, "bottom right", is 2-3 tokens + EOS).
MAX_NEW_TOKENS = 6


def chat_prompt(processor, sample: shapesqa.Sample) -> str:
    """The chat-templated prompt of ``sample`` (:func:`vllm_sab.demo.shapesqa.chat_content`: question, then image)."""
    content = shapesqa.chat_content(sample)
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def is_sab_checkpoint(model_dir: str | Path) -> bool:
    """Whether ``model_dir/config.json`` has a ``quantization_config`` with ``quant_method == "sab"``."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "sab"


def load_transformers(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a model folder with transformers in eval mode on CPU; sab checkpoints dequantized.

    Raises:
        FormatError: a sab checkpoint that is not valid format v1.
        OSError: ``model_dir`` is not a model folder.
    """
    if is_sab_checkpoint(model_dir):
        from vllm_sab.calibrate.reference_model import load_dequantized

        return load_dequantized(model_dir, dtype)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).eval()


@torch.no_grad()
def transformers_answers(model, processor, samples: list[shapesqa.Sample], *, batch_size: int = 64) -> list[str]:
    """Greedy answers of a transformers VLM.

    Args:
        model: a transformers ``*ForConditionalGeneration`` (any device; inputs follow it).
        processor: its processor (left padding is forced for batched generation).
        samples: the questions.
        batch_size: questions per ``generate`` call.

    Returns:
        One decoded answer per sample (special tokens removed, not normalized).
    """
    tok = processor.tokenizer
    tok.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        prompts = [chat_prompt(processor, s) for s in chunk]
        images = [s.image for s in chunk if s.scene is not None]
        inputs = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        out = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers.extend(tok.batch_decode(new, skip_special_tokens=True))
    return answers


def vllm_answers(llm, processor, samples: list[shapesqa.Sample]) -> list[str]:
    """Greedy answers of a ``vllm.LLM`` for the same prompts as :func:`transformers_answers`."""
    from vllm import SamplingParams

    requests = []
    for s in samples:
        req = {"prompt": chat_prompt(processor, s)}
        if s.scene is not None:
            req["multi_modal_data"] = {"image": s.image}
        requests.append(req)
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def make_llm(model_dir: str | Path, **overrides):
    """A ``vllm.LLM`` for ``model_dir`` with CPU-friendly defaults (fp32, eager, 64 MiB KV cache on CPU)."""
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        model=str(model_dir),
        dtype="float16" if on_gpu else "float32",
        enforce_eager=not on_gpu,
        max_model_len=512,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )
    if not on_gpu:
        kwargs["kv_cache_memory_bytes"] = 64 << 20
    if is_sab_checkpoint(model_dir):
        kwargs["quantization"] = "sab"
    kwargs.update(overrides)
    return LLM(**kwargs)


def evaluate(
    model_dir: str | Path,
    *,
    engines: tuple[str, ...] = ("transformers",),
    num_samples: int = 900,
    seed: int = shapesqa.HELDOUT_SEED,
    batch_size: int = 64,
    reference: str | Path | None = None,
    visual_keep_ratio: float = 1.0,
    visual_token_score: str = "deviation",
) -> dict:
    """Held-out ShapesQA accuracy of a model folder with one or more engines.

    Args:
        model_dir: full-precision or sab model folder (a LLaVA-style VLM trained on ShapesQA).
        engines: any of ``"transformers"``, ``"vllm"``.
        num_samples: held-out questions, balanced over :data:`shapesqa.QUESTION_TYPES`.
        seed: split seed (default: the held-out split).
        batch_size: transformers batch size.
        reference: full-precision model folder: also report KL divergence and
            top-1 agreement of the next-token distributions against it
            (:func:`compare_distributions`, transformers).
        visual_keep_ratio: below 1, both engines keep only this fraction of
            each image's tokens (:mod:`vllm_sab.token_pruning`; LLaVA only).
        visual_token_score: the token importance score used for pruning.

    Returns:
        ``{"model", "num_samples", "chance": {qtype: acc}, "engines": {engine:
        {"scores": {qtype: {"accuracy", "n"}}, "seconds"}}, "answers": {engine: [...]},
        "questions": [...], "references": [...]}``; with two engines also
        ``"disagreements"`` (count of questions answered differently).

    Raises:
        ValueError: unknown engine, bad pruning options, or ``reference``
            combined with pruning (the two models would see different prompts).
    """
    from transformers import AutoProcessor

    from vllm_sab.token_pruning import prune_transformers_llava, vllm_hf_overrides

    for e in engines:
        if e not in ("transformers", "vllm"):
            raise ValueError(f"unknown engine {e!r}; expected transformers or vllm")
    pruning = visual_keep_ratio != 1.0
    overrides = vllm_hf_overrides(visual_keep_ratio, visual_token_score)  # validates the options
    if pruning and reference is not None:
        raise ValueError("reference (KL against full precision) cannot be combined with visual-token pruning")
    samples = shapesqa.samples(seed, num_samples, balanced=True)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    result: dict = {
        "model": str(model_dir),
        "num_samples": num_samples,
        "chance": shapesqa.chance_accuracy(samples),
        "visual_keep_ratio": visual_keep_ratio,
        "visual_token_score": visual_token_score,
        "engines": {},
        "answers": {},
        "questions": [s.question for s in samples],
        "references": [s.answer for s in samples],
    }
    for engine in engines:
        t0 = time.perf_counter()
        if engine == "transformers":
            model = load_transformers(model_dir)
            proc = prune_transformers_llava(model, processor, visual_keep_ratio, visual_token_score) if pruning else processor
            answers = transformers_answers(model, proc, samples, batch_size=batch_size)
            del model
        else:
            llm = make_llm(model_dir, **({"hf_overrides": overrides} if pruning else {}))
            answers = vllm_answers(llm, processor, samples)
            _shutdown(llm)
        result["engines"][engine] = {
            "scores": shapesqa.score(answers, samples),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        result["answers"][engine] = answers
    if reference is not None:
        result["distribution"] = compare_distributions(
            load_transformers(reference), load_transformers(model_dir), processor, samples
        )
    if len(engines) == 2:
        a, b = (result["answers"][e] for e in engines)
        result["disagreements"] = sum(shapesqa.normalize_answer(x) != shapesqa.normalize_answer(y) for x, y in zip(a, b))
    return result


def _answer_batch(processor, samples: list[shapesqa.Sample]) -> tuple[dict, torch.Tensor]:
    """Prompt + reference answer (teacher forcing), right-padded, and the mask of scored positions.

    Scored positions are those whose next token is part of the answer (or its
    EOS), i.e. the predictions the task depends on.
    """
    tok = processor.tokenizer
    tok.padding_side = "right"
    texts, n_prompt = [], []
    for s in samples:
        prompt = chat_prompt(processor, s)
        texts.append(prompt + " " + s.answer + (tok.eos_token or ""))
        n_prompt.append(prompt)
    images = [s.image for s in samples if s.scene is not None]
    full = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    prompts = processor(text=n_prompt, images=images or None, return_tensors="pt", padding=True)
    lengths = prompts["attention_mask"].sum(1)
    total = full["attention_mask"].sum(1)
    pos = torch.arange(full["input_ids"].shape[1])[None, :]
    # Position t predicts token t+1: score t in [prompt_len - 1, total - 2].
    scored = (pos >= (lengths - 1)[:, None]) & (pos <= (total - 2)[:, None])
    tok.padding_side = "left"
    return dict(full), scored


@torch.no_grad()
def compare_distributions(reference, model, processor, samples: list[shapesqa.Sample], *, batch_size: int = 32) -> dict:
    """Next-token agreement of ``model`` with ``reference`` on the held-out answers (teacher forcing).

    At every position that predicts an answer token (or the EOS after it):
    ``KL(p_ref || p_model)`` in nats, averaged over positions, and top-1
    agreement (the two models' argmax tokens are equal).

    Args:
        reference: the full-precision transformers model.
        model: the quantized model (e.g. :func:`load_transformers` of a sab checkpoint).
        processor: their (shared) processor.
        samples: held-out questions.
        batch_size: questions per forward.

    Returns:
        ``{"kl": float, "top1_agreement": float in [0, 1], "positions": int}``.
    """
    kl_sum, agree, count = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        inputs, scored = _answer_batch(processor, samples[i : i + batch_size])
        lp = torch.log_softmax(reference(**inputs).logits.float(), -1)[scored]
        lq = torch.log_softmax(model(**inputs).logits.float(), -1)[scored]
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        count += int(scored.sum())
    return {"kl": kl_sum / max(count, 1), "top1_agreement": agree / max(count, 1), "positions": count}


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def format_table(result: dict) -> str:
    """Markdown table: accuracy per question type and engine, with chance."""
    engines = list(result["engines"])
    head = "| question type | " + " | ".join(engines) + " | chance |"
    rows = [head, "|" + "---|" * (len(engines) + 2)]
    for t in (*shapesqa.QUESTION_TYPES, "overall"):
        accs = [result["engines"][e]["scores"].get(t, {}).get("accuracy", float("nan")) for e in engines]
        chance = result["chance"].get(t)
        if t == "overall":
            chance = sum(result["chance"].values()) / len(result["chance"])
        cells = " | ".join(f"{a * 100:.1f}%" for a in accs)
        rows.append(f"| {t} | {cells} | {chance * 100:.1f}% |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    """The ``sab-eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="sab-eval",
        description="Held-out ShapesQA accuracy per question type (greedy) of a full-precision or sab checkpoint.",
    )
    p.add_argument("--model", required=True, help="model folder (full precision or sab)")
    p.add_argument(
        "--engine", choices=["transformers", "vllm", "both"], default="transformers",
        help="who answers; 'both' also counts the questions where they differ",
    )
    p.add_argument("--num-samples", type=int, default=900, help="held-out questions (balanced over types)")
    p.add_argument("--seed", type=int, default=shapesqa.HELDOUT_SEED, help="split seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reference", help="full-precision model folder: also print KL and top-1 agreement against it")
    p.add_argument("--visual-keep-ratio", type=float, default=1.0,
                   help="keep this fraction of each image's tokens after the projector (LLaVA only; 1 = no pruning)")
    p.add_argument("--visual-token-score", choices=["deviation", "norm"], default="deviation",
                   help="importance score of image tokens for --visual-keep-ratio")
    p.add_argument("--json", help="also write the full result (answers included) to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``sab-eval``; returns the exit code (2 on a user error)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"sab-eval: error: {args.model}: no config.json (expected a model folder)", file=sys.stderr)
        return 2
    engines = ("transformers", "vllm") if args.engine == "both" else (args.engine,)
    try:
        result = evaluate(
            args.model, engines=engines, num_samples=args.num_samples, seed=args.seed,
            batch_size=args.batch_size, reference=args.reference,
            visual_keep_ratio=args.visual_keep_ratio, visual_token_score=args.visual_token_score,
        )
    except ValueError as e:  # bad options (checked before any model is loaded), or a non-LLaVA model with pruning
        print(f"sab-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if "distribution" in result:
        d = result["distribution"]
        print(f"vs {args.reference}: KL {d['kl']:.4f} nats/token, top-1 agreement {d['top1_agreement'] * 100:.1f}% "
              f"over {d['positions']} answer positions")
    for e, r in result["engines"].items():
        print(f"{e}: {r['seconds']:.1f} s for {args.num_samples} questions")
    if "disagreements" in result:
        print(f"answers that differ between transformers and vLLM: {result['disagreements']} of {args.num_samples}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
