"""Visual-token pruning: held-out accuracy and vLLM prefill time against the fraction of image tokens kept.

    python benchmarks/token_pruning.py                       # fp and sab, keep 100/50/25/10 %
    python benchmarks/token_pruning.py --ratios 1 0.5 --scores deviation norm --eval-samples 270

For the full-precision model and a sab checkpoint of it (calibrated here with
``sab-calibrate --method sab`` unless ``--sab`` names one), at each keep ratio:

- accuracy per question type on the held-out ShapesQA split, greedy, from
  vLLM (the registered ``SabPrunedLlavaForConditionalGeneration``) and from
  transformers with the same pruning, with the count of answers that differ;
- prefill time in vLLM: the visual questions (one image each) generated with
  ``max_tokens=1`` in one batch, after a warm-up pass; the median of
  ``--repeats`` runs, as prompts/s, and the speed-up against keeping every
  token. The vision tower and projector still run on every patch; only the
  language model's prompt gets shorter.

Results go to ``--out`` as ``token_pruning.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "shapes-llava"


def _prefill_seconds(llm, processor, samples, repeats: int) -> tuple[float, int]:
    """Median wall seconds to prefill every prompt of ``samples`` (one output token each), and prompt tokens."""
    from vllm import SamplingParams

    from vllm_sab.demo.evaluate import chat_prompt

    requests = [{"prompt": chat_prompt(processor, s), "multi_modal_data": {"image": s.image}} for s in samples]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    outs = llm.generate(requests, params, use_tqdm=False)  # warm-up (and the prompt lengths)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(len(o.prompt_token_ids) for o in outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="full-precision LLaVA model folder")
    p.add_argument("--sab", default=None, help="sab checkpoint of --model (default: calibrate one into --work)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--scores", nargs="+", default=["deviation"], choices=["deviation", "norm"])
    p.add_argument("--eval-samples", type=int, default=900, help="held-out questions (balanced over types)")
    p.add_argument("--prefill-prompts", type=int, default=384, help="visual questions timed per configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill runs per configuration (median reported)")
    p.add_argument("--work", default=str(REPO / ".scratch" / "token_pruning"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoConfig, AutoProcessor

    from vllm_sab.demo import shapesqa
    from vllm_sab.demo.evaluate import (
        _shutdown, load_transformers, make_llm, transformers_answers, vllm_answers,
    )
    from vllm_sab.token_pruning import n_visual_tokens, num_kept, prune_transformers_llava, vllm_hf_overrides

    sab = args.sab
    if sab is None:
        sab = str(Path(args.work) / "sab")
        subprocess.run([sys.executable, "-m", "vllm_sab.calibrate.cli", "--model", args.model, "--output", sab,
                        "--method", "sab", "--data", "builtin", "--overwrite", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    processor = AutoProcessor.from_pretrained(args.model)
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, args.eval_samples, balanced=True)
    timed = shapesqa.samples(shapesqa.HELDOUT_SEED + 100, args.prefill_prompts, types=shapesqa.VISUAL_TYPES)
    chance = shapesqa.chance_accuracy(samples)
    n_visual = n_visual_tokens(AutoConfig.from_pretrained(args.model))

    rows = []
    for label, folder in (("full precision", args.model), ("sab", sab)):
        for score in args.scores:
            for ratio in args.ratios:
                if ratio == 1.0 and score != args.scores[0]:
                    continue  # nothing is pruned: the same run for every score
                model = load_transformers(folder)
                proc = prune_transformers_llava(model, processor, ratio, score)
                hf = transformers_answers(model, proc, samples)
                del model
                overrides = vllm_hf_overrides(ratio, score) if ratio < 1.0 else {}
                llm = make_llm(folder, **({"hf_overrides": overrides} if overrides else {}))
                served = vllm_answers(llm, processor, samples)
                seconds, prompt_tokens = _prefill_seconds(llm, processor, timed, args.repeats)
                _shutdown(llm)
                del llm
                row = {
                    "model": label, "score": score if ratio < 1.0 else "-", "keep_ratio": ratio,
                    "image_tokens": num_kept(n_visual, ratio),
                    "accuracy": shapesqa.score(served, samples),
                    "disagreements": sum(shapesqa.normalize_answer(a) != shapesqa.normalize_answer(b)
                                         for a, b in zip(hf, served)),
                    "prefill_seconds": seconds, "prefill_prompts": len(timed),
                    "prompt_tokens_per_request": prompt_tokens / len(timed),
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "accuracy"}
                                 | {"acc": round(row["accuracy"]["overall"]["accuracy"], 4)}), flush=True)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["keep_ratio"] == 1.0)
        r["prefill_speedup"] = base["prefill_seconds"] / r["prefill_seconds"]

    command = "python benchmarks/token_pruning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "model": args.model, "sab": sab, "eval_samples": args.eval_samples,
            "n_visual": n_visual, "threads": torch.get_num_threads(), "chance": chance,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_pruning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = _table(rows, meta)
    (out / "token_pruning.md").write_text(table)
    _plot(rows, out / "token_pruning.png")
    print(table)
    return 0


def _table(rows: list[dict], meta: dict) -> str:
    from vllm_sab.demo import shapesqa

    types = list(shapesqa.VISUAL_TYPES)
    head = ("| model | score | keep | image tokens | accuracy | " + " | ".join(types)
            + " | vLLM≠HF | prompt tokens | prefill s | speed-up |")
    lines = [f"Command: `{meta['command']}`", "",
             f"Model `{meta['model']}` and its sab checkpoint; {meta['eval_samples']} held-out questions "
             f"(accuracy from vLLM, greedy; vLLM≠HF counts answers that differ from transformers with the same "
             f"pruning); {meta['n_visual']} image tokens unpruned. Prefill: median time of one batch of visual "
             f"questions with max_tokens=1 on {meta['device']} ({meta['threads']} threads).", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = r["accuracy"]
        cells = " | ".join(f"{acc[t]['accuracy'] * 100:.1f}" for t in types)
        lines.append(
            f"| {r['model']} | {r['score']} | {r['keep_ratio'] * 100:.0f}% | {r['image_tokens']} | "
            f"{acc['overall']['accuracy'] * 100:.1f}% | {cells} | {r['disagreements']} | "
            f"{r['prompt_tokens_per_request']:.1f} | {r['prefill_seconds']:.2f} | {r['prefill_speedup']:.2f}x |"
        )
    chance = " | ".join(f"{meta['chance'][t] * 100:.1f}" for t in types)
    lines.append(f"| chance (best constant answer) | | | | | {chance} | | | | |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vllm_sab.demo import shapesqa

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    curves = sorted({(r["model"], r["score"]) for r in rows if r["keep_ratio"] < 1.0})
    for model, score in curves:
        pts = sorted((r for r in rows if r["model"] == model and (r["score"] == score or r["keep_ratio"] == 1.0)),
                     key=lambda r: r["keep_ratio"])
        x = [r["keep_ratio"] * 100 for r in pts]
        visual = [sum(r["accuracy"][t]["accuracy"] for t in shapesqa.VISUAL_TYPES) / len(shapesqa.VISUAL_TYPES) * 100
                  for r in pts]
        a1.plot(x, visual, marker="o", label=f"{model} ({score})")
        a2.plot(x, [r["prefill_speedup"] for r in pts], marker="o", label=f"{model} ({score})")
    a1.set_xlabel("image tokens kept (%)")
    a1.set_ylabel("accuracy on visual questions (%)")
    a2.set_xlabel("image tokens kept (%)")
    a2.set_ylabel("vLLM prefill speed-up vs 100 %")
    for a in (a1, a2):
        a.set_xscale("log")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
