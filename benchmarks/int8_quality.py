"""What the int8-activation CPU decode costs in quality, on the shipped model.

Calibrates ``models/shapes-llava`` with each method whose profile the int8 decode takes
(no offsets: arb-rc, sab, bivlm), then runs the same checkpoint twice through the native
CPU kernels in transformers: every quantized linear on the exact path (float32 tiles,
``CpuKernelConfig(int8_activations=False)``) and on the int8 decode
(``int8_activations=True``, every activation row quantized, prefill rows included: a
worst case, since serving takes the int8 path only for decode steps). Reports, on the
held-out ShapesQA questions, KL(exact || int8) and top-1 agreement under teacher forcing,
KL of each against the full-precision model, and greedy accuracy of each.

Command: ``python benchmarks/int8_quality.py`` (about 3 minutes on 2 cores); writes
``benchmarks/results/int8_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DEFAULT_MODEL, REPO, _run_calibration  # noqa: E402

METHODS = ["sab", "arb-rc", "bivlm"]


def write_markdown(rows: list[dict], meta: dict, path: Path) -> str:
    """The results table as Markdown, written to ``path``; returns it."""
    lines = ["# Int8-activation decode: quality cost on the shipped model", "",
             f"Command: `{meta['command']}`  ",
             f"Model `{meta['model']}`, {meta['num_samples']} calibration samples, {meta['eval_samples']} held-out "
             f"questions, {meta['threads']} CPU threads. Both columns run the native CPU kernels on the packed "
             "checkpoint; int8 quantizes every activation row (prefill included, a worst case).", "",
             "| method | KL(exact ‖ int8) nats | top-1 agree exact/int8 | KL(fp ‖ exact) | KL(fp ‖ int8) | "
             "accuracy exact | accuracy int8 | same greedy answers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['exact_vs_int8']['kl']:.1e} | {r['exact_vs_int8']['top1_agreement'] * 100:.2f}% | "
                     f"{r['fp_vs_exact']['kl']:.4f} | {r['fp_vs_int8']['kl']:.4f} | {r['accuracy_exact'] * 100:.1f}% | "
                     f"{r['accuracy_int8'] * 100:.1f}% | {r['same_answers']}/{meta['eval_samples']} |")
    path.write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--num-samples", type=int, default=128, help="calibration samples (builtin data)")
    ap.add_argument("--eval-samples", type=int, default=900, help="held-out questions")
    ap.add_argument("--work", default=str(REPO / ".scratch" / "int8_quality"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    from transformers import AutoProcessor

    from vllm_sab.demo import shapesqa
    from vllm_sab.calibrate.reference_model import load_native
    from vllm_sab.demo.evaluate import compare_distributions, load_transformers, transformers_answers
    from vllm_sab.kernels import cpu

    if not cpu.has_int8_dot():
        print("this CPU has no AVX512-VNNI int8 decode (or the kernels did not build)", file=sys.stderr)
        return 1
    exact_cfg = cpu.CpuKernelConfig(int8_activations=False, decode_max_m=0, sign_bf16_decode_max_m=0)
    int8_cfg = cpu.CpuKernelConfig(int8_activations=True, int8_decode_max_m=16)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, args.eval_samples, balanced=True)
    processor = AutoProcessor.from_pretrained(args.model)
    reference = load_transformers(args.model)
    rows = []
    for method in args.methods:
        ckpt = work / method
        _run_calibration(["--model", args.model, "--output", str(ckpt), "--method", method, "--data", "builtin",
                          "--num-samples", str(args.num_samples), "--overwrite", "--no-progress"])
        exact = load_native(ckpt, exact_cfg, max_rows=16)
        int8 = load_native(ckpt, int8_cfg, max_rows=16)
        t0 = time.perf_counter()
        row = {"method": method,
               "profile": json.loads((ckpt / "config.json").read_text())["quantization_config"]["profiles"],
               "exact_vs_int8": compare_distributions(exact, int8, processor, samples),
               "fp_vs_exact": compare_distributions(reference, exact, processor, samples),
               "fp_vs_int8": compare_distributions(reference, int8, processor, samples)}
        for label, model in (("exact", exact), ("int8", int8)):
            answers = transformers_answers(model, processor, samples)
            row[f"accuracy_{label}"] = shapesqa.score(answers, samples)["overall"]["accuracy"]
            row[f"answers_{label}"] = answers
        row["same_answers"] = sum(a == b for a, b in zip(row["answers_exact"], row["answers_int8"]))
        del row["answers_exact"], row["answers_int8"]
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    command = "python benchmarks/int8_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "model": str(Path(args.model).relative_to(REPO))
            if Path(args.model).resolve().is_relative_to(REPO) else args.model,
            "num_samples": args.num_samples, "eval_samples": args.eval_samples, "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(write_markdown(rows, meta, out / "int8_quality.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
