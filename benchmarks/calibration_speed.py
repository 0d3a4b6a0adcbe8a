"""Per-layer time of each method's math on SmolLM2-135M's layer shapes (no model, no data).

One decoder layer of SmolLM2-135M holds four quantization groups: the fused q/k/v
``[960, 576]``, o_proj ``[576, 576]``, the fused gate/up ``[3072, 576]`` and down_proj
``[576, 1536]``. This times ``method.quantize`` on random weights of those shapes with a
Hessian of correlated random inputs: the method's share of a calibration layer (the
forward passes and Hessian statistics come on top; ``benchmarks/real_lm.py`` reports
whole runs). Use it to compare revisions of the methods on an idle machine::

    python benchmarks/calibration_speed.py sab@64 billm@192 arb-x@192
    python benchmarks/calibration_speed.py --json out.json      # every method

Prints seconds per layer for each ``method@block_size``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
DEFAULT = ["sign@192", "billm@192", "arb-x@192", "arb-x@64", "arb-rc@64", "sab@64", "sab@192",
           "bivlm@192", "uniform2@64", "uniform3@192"]


def layer_seconds(method: str, block_size: int, repeats: int = 1) -> float:
    """Best-of-``repeats`` wall seconds of ``quantize`` over the four SmolLM2 layer groups."""
    from vllm_sab.calibrate.methods import get_method
    from vllm_sab.calibrate.methods.base import CalibrationStats

    g = torch.Generator().manual_seed(0)
    stats = {}
    for k in sorted({k for _, k in SHAPES}):
        x = torch.randn(4096, k, generator=g) * (torch.rand(k, generator=g) * 2 + 0.1)
        h = 2 * x.T @ x / len(x)
        stats[k] = CalibrationStats(hessian=h, n_tokens=len(x), hessian_text=h, n_text=len(x),
                                    sample_energy_sum=torch.ones(k), sample_energy_sq=torch.ones(k), n_samples=8)
    weights = [torch.randn(n, k, generator=g) * 0.05 for n, k in SHAPES]
    best = float("inf")
    for _ in range(repeats):
        m = get_method(method, block_size=block_size)
        t0 = time.perf_counter()
        for w in weights:
            m.quantize(w, stats[w.shape[1]])
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", default=DEFAULT, help="method@block_size (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="also write {run: seconds per layer} here")
    args = ap.parse_args(argv)
    out = {}
    for run in args.runs:
        name, _, b = run.partition("@")
        out[run] = layer_seconds(name, int(b or 128), args.repeats)
        print(f"{run}: {out[run]:.2f} s per layer ({torch.get_num_threads()} threads)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
