"""Quality vs true bits of every calibration method on the shipped small VLM (CPU is fine).

    python benchmarks/quality.py                         # all methods, writes benchmarks/results/quality.*
    python benchmarks/quality.py --methods sign arb-rc --num-samples 32
    python benchmarks/quality.py --study sab-variants    # the SAB-LVLM design choices (docs/methods.md)
    python benchmarks/quality.py --study pruning         # ATV-Pruning vs Wanda at 50 / 60 % (issue 6)
    python benchmarks/quality.py --study equal-bits      # bivlm vs sab vs arb-rc across block sizes

For each method: ``sab-calibrate`` in a subprocess (wall time and peak
resident memory of that process), then on the held-out ShapesQA split:
accuracy per question type (greedy, transformers on the dequantized
checkpoint, and vLLM on the packed one when ``--vllm``), KL divergence and
top-1 agreement of the next-token distributions at the answer positions
against the full-precision model, and the checkpoint's true bits per weight
next to the papers' convention. Results go to ``--out`` as JSON, a Markdown
table and a plot of accuracy / KL against true bits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "shapes-llava"
METHODS = ["sign", "billm", "arb-x", "arb-rc", "sab", "uniform2"]
# SAB-LVLM choices the authors' code leaves open (docs/methods.md).
SAB_VARIANTS = {
    "sab (energy, pool)": ["--option", "significance=energy", "--option", "compensation=pool"],
    "sab (energy, text)": ["--option", "significance=energy", "--option", "compensation=text"],
    "sab (energy, balanced)": ["--option", "significance=energy", "--option", "compensation=balanced"],
    "sab (modality, pool)": ["--option", "significance=modality", "--option", "compensation=pool"],
    "sab (modality, balanced)": ["--option", "significance=modality", "--option", "compensation=balanced"],
    "sab (energy, pool, Lambda^1)": ["--option", "weight_power=1"],
}
# ATV-Pruning's pool against plain Wanda (every token), dense and combined with SAB.
PRUNING = {
    f"{label} {int(sp * 100)}%": (method, [*pool, "--option", f"sparsity={sp}"])
    for sp in (0.5, 0.6)
    for label, method, pool in (
        ("wanda", "atv-prune", ["--token-pool", "all"]),
        ("atv-prune", "atv-prune", ["--token-pool", "atv"]),
        ("wanda+sab", "atv-prune+sab", ["--token-pool", "all"]),
        ("atv-prune+sab", "atv-prune+sab", ["--token-pool", "atv"]),
    )
}
# Block size trades scale storage for accuracy: a curve per method lets them be compared at equal true bits.
EQUAL_BITS = {
    f"{method} B={b}": (method, ["--block-size", str(b)])
    for method in ("arb-rc", "sab", "bivlm")
    for b in (128, 64, 32)
}
STUDIES = {"sab-variants": {k: ("sab", v) for k, v in SAB_VARIANTS.items()}, "pruning": PRUNING, "equal-bits": EQUAL_BITS}


def _run_calibration(args: list[str]) -> tuple[float, float]:
    """Run sab-calibrate; returns (wall seconds, peak RSS in MiB) of that process alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vllm_sab.calibrate.cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"sab-calibrate {' '.join(args)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--study", choices=sorted(STUDIES), default=None,
                   help="run a predefined set of calibrations instead of --methods (results file named after it)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (builtin data)")
    p.add_argument("--eval-samples", type=int, default=900, help="held-out questions")
    p.add_argument("--vllm", action="store_true", help="also answer with vLLM and count disagreements")
    p.add_argument("--work", default=str(REPO / ".scratch" / "quality"), help="where checkpoints go")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder")
    p.add_argument("--name", default=None, help="results file stem (default: quality or the study's name)")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from transformers import AutoProcessor

    from vllm_sab.demo import shapesqa
    from vllm_sab.demo.evaluate import compare_distributions, evaluate, load_transformers

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (args.study.replace("-", "_") if args.study else "quality")
    runs = STUDIES[args.study] if args.study else {m: (m, []) for m in args.methods}
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, args.eval_samples, balanced=True)
    processor = AutoProcessor.from_pretrained(args.model)
    reference = load_transformers(args.model)
    engines = ("transformers", "vllm") if args.vllm else ("transformers",)

    rows = []
    fp = evaluate(args.model, engines=engines, num_samples=args.eval_samples)
    rows.append({"method": "full precision (fp16 weights)", "true_bits_per_weight": 16.0, "paper_weight_bits": 16.0,
                 "accuracy": fp["engines"]["transformers"]["scores"], "kl": 0.0, "top1_agreement": 1.0,
                 "disagreements": fp.get("disagreements")})
    print(json.dumps({k: rows[-1][k] for k in ("method", "true_bits_per_weight")} | {"acc": rows[-1]["accuracy"]["overall"]}), flush=True)
    for label, (method, extra) in runs.items():
        ckpt = work / "".join(c if c.isalnum() or c in "+-" else "_" for c in label)
        seconds, peak_mib = _run_calibration(
            ["--model", args.model, "--output", str(ckpt), "--method", method, "--data", "builtin",
             "--num-samples", str(args.num_samples), "--overwrite", "--no-progress", *extra]
        )
        full_report = json.loads((ckpt / "sab_report.json").read_text())
        report = full_report["summary"]
        sparsity = [r["sparsity"] for r in full_report["layers"] if "sparsity" in r]
        res = evaluate(ckpt, engines=engines, num_samples=args.eval_samples)
        dist = compare_distributions(reference, load_transformers(ckpt), processor, samples)
        rows.append({
            "method": label,
            "true_bits_per_weight": report["true_bits_per_weight"],
            "paper_weight_bits": report["paper_weight_bits"],
            "accuracy": res["engines"]["transformers"]["scores"],
            "kl": dist["kl"],
            "top1_agreement": dist["top1_agreement"],
            "disagreements": res.get("disagreements"),
            "calibration_seconds": round(seconds, 1),
            "calibration_peak_rss_mib": round(peak_mib),
            "token_pool": full_report.get("calibration", {}).get("token_pool"),
        })
        if sparsity:
            rows[-1]["sparsity"] = sum(sparsity) / len(sparsity)
        print(json.dumps({k: rows[-1][k] for k in ("method", "true_bits_per_weight", "kl", "top1_agreement",
                                                   "calibration_seconds")} | {"acc": rows[-1]["accuracy"]["overall"]["accuracy"]}), flush=True)

    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "model": args.model, "num_samples": args.num_samples,
            "eval_samples": args.eval_samples, "threads": torch.get_num_threads(), "chance": fp["chance"]}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(_table(rows, meta))
    _plot(rows, out / f"{name}.png")
    print(_table(rows, meta))
    return 0


def _table(rows: list[dict], meta: dict) -> str:
    from vllm_sab.demo import shapesqa

    types = list(shapesqa.QUESTION_TYPES)
    head = ("| method | true bits/weight | papers' bits | KL (nats) | top-1 agree | accuracy | "
            + " | ".join(types) + " | calib. s | peak RSS MiB |")
    lines = [f"Command: `{meta['command']}`", "",
             f"Model `{meta['model']}`, {meta['num_samples']} calibration samples, {meta['eval_samples']} held-out "
             f"questions, {meta['threads']} CPU threads. Accuracy: greedy, transformers on the dequantized checkpoint.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = r["accuracy"]
        cells = " | ".join(f"{acc[t]['accuracy'] * 100:.1f}" for t in types)
        lines.append(
            f"| {r['method']} | {r['true_bits_per_weight']:.3f} | {r['paper_weight_bits']:.3f} | {r['kl']:.4f} | "
            f"{r['top1_agreement'] * 100:.1f}% | {acc['overall']['accuracy'] * 100:.1f}% | {cells} | "
            f"{r.get('calibration_seconds', '')} | {r.get('calibration_peak_rss_mib', '')} |"
        )
    chance = " | ".join(f"{meta['chance'][t] * 100:.1f}" for t in types)
    lines.append(f"| chance (best constant answer) | | | | | | {chance} | | |")
    if any(r.get("disagreements") is not None for r in rows):
        lines += ["", "Answers that differ between transformers and vLLM: "
                  + ", ".join(f"{r['method']}: {r['disagreements']}" for r in rows if r.get("disagreements") is not None)]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = [r for r in rows if r["true_bits_per_weight"] < 16]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in quant:
        x = r["true_bits_per_weight"]
        a1.scatter(x, r["accuracy"]["overall"]["accuracy"] * 100)
        a1.annotate(r["method"], (x, r["accuracy"]["overall"]["accuracy"] * 100), fontsize=7)
        a2.scatter(x, r["kl"])
        a2.annotate(r["method"], (x, r["kl"]), fontsize=7)
    fp = [r for r in rows if r["true_bits_per_weight"] >= 16]
    if fp:
        a1.axhline(fp[0]["accuracy"]["overall"]["accuracy"] * 100, ls="--", c="gray", label="full precision")
        a1.legend()
    a1.set_xlabel("true bits per weight (all scales, masks, indices)")
    a1.set_ylabel("held-out accuracy (%)")
    a2.set_xlabel("true bits per weight")
    a2.set_ylabel("KL to full precision (nats/token)")
    a2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
