"""CPU kernel benchmark: sab::linear's native kernels against dense bf16 / fp32 torch.matmul.

For Llama-2-7B / LLaVA-1.5-7B layer shapes (``N x K``: 4096x4096 q/o, 12288x4096 fused
qkv, 22016x4096 fused gate_up, 4096x11008 down), every profile the calibrator writes, and
M (tokens) in {1, 2, 4, 8, 16, 64, 256, 512}, it times ``y = x @ W^T`` with

* the native kernel the plugin chooses on this CPU (``vllm_sab.kernels.chooser``),
* dense bfloat16 and float32 ``torch.matmul`` in the same run,

with cold caches: every measurement cycles through enough copies of its weights that
they exceed 4x the L3 (the L3 here holds a whole 4096x4096 bf16 matrix). It reports time,
speed-up over bf16, effective GB/s on the bytes each kernel reads, and a copy bandwidth
measured in the same run. Random but valid packed tensors are used: speed does not depend
on the values. Activations are bfloat16 (vLLM CPU's serving dtype).

    python benchmarks/kernels_cpu.py                    # full table (about 10 minutes)
    python benchmarks/kernels_cpu.py --quick            # 4096x4096 only, fewer M

Writes ``benchmarks/results/kernels_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from vllm_sab import format as fmt
from vllm_sab.kernels import chooser, cpu

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096, "q/o_proj"), (12288, 4096, "qkv_proj"), (22016, 4096, "gate_up_proj"),
          (4096, 11008, "down_proj")]
MS = [1, 2, 4, 8, 16, 64, 256, 512]
P = fmt.LayerProfile
#: What each calibrator method writes at block size 128 (docs/format.md section 3.4).
PROFILES = {
    "sign": P(128),
    "billm": P(128, zone_bits=1, salient=8, offset=True),
    "arb-rc/sab": P(128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True),
    "uniform2": P(128, salient=128, offset=True),
    "bivlm": P(128, zone_bits=2, col_scale=True),
}
PATH_NAMES = {cpu.PATH_TILES: "tiles", cpu.PATH_DECODE_F32: "decode-f32", cpu.PATH_DECODE_BF16: "decode-bf16",
              cpu.PATH_DECODE_INT8: "decode-int8"}
COLD_BYTES = 4 * 32 * 2**20  # 4x this machine's 32 MiB L3


def random_packed(p: fmt.LayerProfile, n: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Valid random format-v1 tensors of an ``[n, k]`` layer (shapes/dtypes from tensor_specs)."""
    out = {}
    for name, spec in fmt.tensor_specs(p, n, k).items():
        if name == fmt.PERM:
            out[name] = torch.cat([torch.randperm(p.block_size, generator=gen) for _ in range(k // p.block_size)]).to(torch.int16)
        elif spec.dtype == torch.int32:
            out[name] = torch.randint(-(2**31), 2**31 - 1, spec.shape, generator=gen, dtype=torch.int32)
        elif spec.dtype == torch.uint8:
            out[name] = torch.randint(0, 256, spec.shape, generator=gen, dtype=torch.uint8)
        elif name == fmt.OFFSET:
            out[name] = (torch.randn(spec.shape, generator=gen) * 0.001).half()
        elif name == fmt.COL_SCALE:
            out[name] = (torch.rand(spec.shape, generator=gen) + 0.5).half()
        else:
            out[name] = (torch.rand(spec.shape, generator=gen) * 0.04 + 0.01).half()
    return out


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a layer's stored tensors (what one call reads)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copies_for(one: int) -> int:
    """Copies of a weight of ``one`` bytes that exceed COLD_BYTES together (at least 2)."""
    return max(2, math.ceil(COLD_BYTES / one))


def time_cycle(fn, items: list, min_seconds: float, max_passes: int = 50) -> float:
    """Median seconds per call over passes through ``items`` (one warm-up pass first)."""
    for it in items:
        fn(it)
    per_pass = []
    t_end = time.perf_counter() + min_seconds
    while len(per_pass) < 3 or (time.perf_counter() < t_end and len(per_pass) < max_passes):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        per_pass.append((time.perf_counter() - t0) / len(items))
    return statistics.median(per_pass)


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB tensor copy (bytes read + written), median of 5."""
    a = torch.ones(256 * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t0)
    return 2 * a.numel() / statistics.median(ts) / 1e9


def cpu_info() -> dict:
    """CPU model, the flags that matter here, threads, versions."""
    model, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                     "avx512_bf16", "avx512_vnni", "avx512_vpopcntdq", "amx_bf16") if f in have]
                break
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "native_isas": list(cpu.available_isas()), "python": sys.version.split()[0]}


def run(shapes, ms, profiles, min_seconds: float) -> dict:
    """Measure every (shape, M): dense bf16, dense fp32 and each profile's chosen kernel."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k, label in shapes:
        dense16 = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        dense32 = [d.float() for d in dense16[: copies_for(n * k * 4)]]
        layers = {}
        for name, p in profiles.items():
            one = random_packed(p, n, k, gen)
            layers[name] = (p, [one] + [{kk: v.clone() for kk, v in one.items()} for _ in range(copies_for(nbytes(one)) - 1)])
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            xf = x.float()
            t16 = time_cycle(lambda w: torch.matmul(x, w.t()), dense16, min_seconds)
            t32 = time_cycle(lambda w: torch.matmul(xf, w.t()), dense32, min_seconds)
            row = {"shape": [n, k], "layer": label, "m": m, "bf16_ms": t16 * 1e3, "fp32_ms": t32 * 1e3,
                   "bf16_gbps": n * k * 2 / t16 / 1e9, "profiles": {}}
            for name, (p, copies) in layers.items():
                kern = chooser.choose("cpu", torch.bfloat16, p)
                t = time_cycle(lambda tt: kern.run(x, tt, p), copies, min_seconds)
                row["profiles"][name] = {
                    "profile": p.key, "kernel": kern.name,
                    "path": PATH_NAMES[cpu.kernel_path(m, torch.bfloat16, p, kern.name.removeprefix("cpu-"))]
                    if kern.name.startswith("cpu-") else None,
                    "true_bits": fmt.true_bits_per_weight(p, n, k),
                    "ms": t * 1e3, "speedup_vs_bf16": t16 / t, "speedup_vs_fp32": t32 / t,
                    "gbps": nbytes(copies[0]) / t / 1e9,
                }
            rows.append(row)
            print(f"{label:13s} {n:5d}x{k:<5d} M={m:<3d} bf16 {t16 * 1e3:8.3f} ms  "
                  + "  ".join(f"{nm} {v['speedup_vs_bf16']:5.2f}x" for nm, v in row["profiles"].items()), flush=True)
        del dense16, dense32, layers
    return {"rows": rows}


def write_markdown(res: dict, path: Path) -> None:
    """The results as tables: speed-up over bf16 per (shape, M) and profile, then GB/s."""
    meta = res["meta"]
    names = list(res["rows"][0]["profiles"])
    lines = [
        "# CPU kernel benchmark: sab::linear vs dense torch.matmul",
        "",
        f"Command: `{meta['command']}`  ",
        f"CPU: {meta['cpu']}; flags: {', '.join(meta['flags'])}; threads: {meta['threads']}; "
        f"torch {meta['torch']}; native ISAs {', '.join(meta['native_isas'])}  ",
        f"Copy bandwidth (same run): {meta['copy_gbps']:.1f} GB/s (read + write). Cold caches: each "
        f"measurement cycles through copies totalling > {COLD_BYTES >> 20} MiB. Activations bfloat16; "
        f"prefill tiles {'bfloat16' if meta.get('native_bf16_gemm') else 'float32 (no native bf16 GEMM on this CPU)'}; "
        f"decode {'on AVX512-BF16 dot products (sign profile: every decode M; others: M >= ' + str(meta['kernel_config'].get('bf16_decode_min_m')) + ')' if meta.get('bf16_dot') else 'float32'}"
        + (f"; int8 activations on AVX512-VNNI for the profiles without offsets at M <= {meta['kernel_config'].get('int8_decode_max_m')}"
           if meta.get("int8_dot") and meta["kernel_config"].get("int8_activations") else "") + ".",
        "",
        "Profiles (true bits / weight at 4096x4096): "
        + "; ".join(f"{nm} `{res['rows'][0]['profiles'][nm]['profile']}` "
                    f"{res['rows'][0]['profiles'][nm]['true_bits']:.3f}" for nm in names),
        "",
        "## Speed-up over dense bf16 (time bf16 / time sab; > 1 is faster)",
        "",
        "| layer | N x K | M | bf16 ms | fp32 ms | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in res["rows"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['m']} | {r['bf16_ms']:.3f} | "
                     f"{r['fp32_ms']:.3f} | " + " | ".join(f"{r['profiles'][nm]['speedup_vs_bf16']:.2f}" for nm in names) + " |")
    lines += ["", "## Effective GB/s on the bytes read (bf16: the dense weight)", "",
              "| layer | M | bf16 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in res["rows"]:
        if r["m"] > 16:
            continue
        lines.append(f"| {r['layer']} | {r['m']} | {r['bf16_gbps']:.1f} | "
                     + " | ".join(f"{r['profiles'][nm]['gbps']:.1f}" for nm in names) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    """Speed-up over bf16 against M, one panel per shape, one line per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for r in res["rows"]}, key=lambda s: (s[1], s[0]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in res["rows"] if tuple(r["shape"]) == shape]
        for nm in rows[0]["profiles"]:
            ax.plot([r["m"] for r in rows], [r["profiles"][nm]["speedup_vs_bf16"] for r in rows], marker="o", label=nm)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{rows[0]['layer']} {shape[0]}x{shape[1]}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speed-up over bf16 matmul")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results files."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, M in 1, 16, 256")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--min-seconds", type=float, default=0.3, help="time per measurement (default 0.3)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--suffix", default="",
                    help="results file name suffix, e.g. 'avx2' writes kernels_cpu_avx2.* (keeps another "
                         "machine's kernels_cpu.* beside it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu.build_error():
        print(f"native CPU kernels unavailable: {cpu.build_error()}", file=sys.stderr)
        return 1
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [1, 16, 256] if args.quick else MS
    meta = dict(cpu_info(), command="python benchmarks/kernels_cpu.py" + (" --quick" if args.quick else "")
                + (f" --threads {args.threads}" if args.threads != 2 else "")
                + (f" --suffix {args.suffix}" if args.suffix else ""),
                copy_gbps=copy_bandwidth(), kernel_config=vars(cpu.DEFAULT_CONFIG),
                native_bf16_gemm=cpu.native_bf16_gemm(), bf16_dot=cpu.has_bf16_dot(), int8_dot=cpu.has_int8_dot())
    print(f"{meta['cpu']} | {', '.join(meta['flags'])} | threads {meta['threads']} | copy {meta['copy_gbps']:.1f} GB/s")
    res = run(shapes, ms, PROFILES, args.min_seconds)
    res["meta"] = meta
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("kernels_cpu_quick" if args.quick else "kernels_cpu") + (f"_{args.suffix}" if args.suffix else "")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, args.out / f"{stem}.md")
    plot(res, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
