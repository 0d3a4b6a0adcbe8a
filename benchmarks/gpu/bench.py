"""GPU benchmark of vllm-sab, one part per subcommand; ``benchmarks/gpu/run.sh`` runs them all.

Parts (each writes ``<out>/<part>.json``, rewritten after every measurement, so a part
stopped by its time box keeps what it measured):

* ``warm``: compiles every kernel variant the other parts launch, in parallel worker
  processes, into Triton's on-disk cache (serial compiles would eat the time boxes).
* ``kernels``: the machine's ceilings measured in the same run (device-to-device copy
  bandwidth, empty-kernel launch time), then the sab Triton kernels (sign profile
  ``b128-z0`` and bitmap profile ``b128-z1-s8g-rc``, float16 activations) against
  ``torch.matmul`` float16 and bfloat16 (cuBLAS) on Llama-2-7B and 70B layer shapes for
  M in {1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096}; each weight is rotated among enough
  copies to exceed 3x the L2 cache, and timed as CUDA-graph replays of many calls
  (CUDA events; per-call time = replay time / calls; median of 7 replays). Then the
  launch configurations of ``ALTERNATIVES`` on two shapes, for retuning the table.
* ``decode``: greedy decode tokens/s of a Llama-2-7B-shaped ``LlamaForCausalLM``
  (hidden 4096, 32 layers, random weights, transformers, sdpa attention) with a static
  KV cache, one decode step captured as a CUDA graph (argmax and position update
  inside the graph), fp16 vs sab linears of both profiles, batch 1 and 8.
* ``calibrate``: wall time of ``sab-calibrate --method sab`` on a LLaVA-1.5 whose
  language model is one Llama-2-7B-shaped decoder layer (hidden 4096, MLP 11008).
* ``report``: merges the parts into ``results.json`` / ``results.md`` / ``kernels.png``
  and prints a short summary with the issue's targets.

``--dry-run`` runs the same code on CPU tensors under ``TRITON_INTERPRET=1`` with tiny
shapes (timings there are meaningless; the point is that every line runs).

Usage: ``python benchmarks/gpu/bench.py PART --out DIR [--dry-run] [--budget-s S]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096)
# (model, layer, N, K): Llama-2 layer shapes, q/k/v and gate/up fused as vLLM serves them.
SHAPES = (
    ("7b", "q/k/v/o", 4096, 4096),
    ("7b", "qkv", 12288, 4096),
    ("7b", "gate_up", 22016, 4096),
    ("7b", "down", 4096, 11008),
    ("70b", "q/o", 8192, 8192),
    ("70b", "qkv", 10240, 8192),
    ("70b", "gate_up", 57344, 8192),
    ("70b", "down", 8192, 28672),
)
DRY_M_VALUES = (1, 3, 32)
DRY_SHAPES = (("tiny", "a", 256, 256), ("tiny", "b", 96, 384))
# Shapes whose reference product is checked (dequantizing a 70B gate_up costs ~10 GB).
CHECK_MAX_WEIGHTS = 120_000_000


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
class Recorder:
    """A JSON document rewritten (atomically) after every change, so a killed part keeps its rows."""

    def __init__(self, path: Path, **header):
        self.path = path
        self.doc = {**header, "rows": [], "notes": [], "status": "running"}
        self.flush()

    def row(self, **row) -> None:
        self.doc["rows"].append(row)
        self.flush()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.doc["notes"].append(text)
        self.flush()

    def fail(self, text: str) -> None:
        """A measurement that broke: noted, and the part exits non-zero at its end."""
        self.doc["failures"] = self.doc.get("failures", 0) + 1
        self.note(f"FAILED: {text}")

    def set(self, **kv) -> None:
        self.doc.update(kv)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)


class Budget:
    """Soft deadline of a part: measurements check it and the part stops cleanly."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def over(self) -> bool:
        return time.time() > self.end


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def time_calls(fns, device, *, target_ms: float = 3.0, max_calls: int = 4000) -> tuple[float, str]:
    """Median time of one call, in ms, cycling through ``fns`` (zero-argument callables).

    CUDA: after a warm-up on a side stream, ``calls`` consecutive calls (a multiple of
    ``len(fns)``, about ``target_ms`` in all) are captured as one CUDA graph and the
    graph is replayed 7 times between CUDA events; the result is the median replay
    time / ``calls``. If capture fails (an op that synchronises), the same calls are
    timed eagerly with ``triton.testing.do_bench`` and the mode says so.
    CPU (dry run): wall clock of one pass over ``fns``.

    Returns:
        ``(ms per call, mode)`` with mode ``"cuda-graph"``, ``"eager: <error>"`` or ``"cpu"``.
    """
    import torch

    if device.type != "cuda":
        for f in fns:
            f()
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) * 1e3 / len(fns), "cpu"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for f in fns:
        f()
    stop.record()
    stop.synchronize()
    est = max(start.elapsed_time(stop) / len(fns), 1e-4)
    calls = len(fns) * max(1, min(max_calls // len(fns), math.ceil(target_ms / est / len(fns))))
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / calls)
        del graph
        return statistics.median(times), "cuda-graph"
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
        torch.cuda.synchronize()
        import triton.testing

        ms = triton.testing.do_bench(lambda: [f() for f in fns], warmup=10, rep=50, return_mode="median")
        return ms / len(fns), f"eager: {type(e).__name__}: {str(e)[:120]}"


# ---------------------------------------------------------------------------------------
# Part: kernels
# ---------------------------------------------------------------------------------------
def _env(device) -> dict:
    import torch
    import transformers
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None),
        )
    return env


def _ceilings(device, rec: Recorder, dry: bool) -> dict:
    """Device-to-device copy bandwidth and empty-kernel launch times, measured now."""
    import torch

    nbytes = (1 << 20) if dry else (2 << 30)
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    ms, mode = time_calls([lambda: b.copy_(a)], device, target_ms=20.0)
    out = {
        "copy_bytes": nbytes,
        "copy_ms": ms,
        # The usual copy bandwidth counts both directions (read + write).
        "copy_gbps_read_plus_write": 2 * nbytes / ms / 1e6,
        "copy_gbps_read": nbytes / ms / 1e6,
        "copy_mode": mode,
    }
    del a, b

    from launch_probe import empty_kernel as _empty_kernel

    buf = torch.zeros(1, device=device)
    _empty_kernel[(1,)](buf, 1)
    reps = 20 if dry else 2000
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        _empty_kernel[(1,)](buf, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["empty_kernel_host_us"] = (time.perf_counter() - t0) / reps * 1e6
    ms, mode = time_calls([lambda: _empty_kernel[(1,)](buf, 1)], device, target_ms=2.0)
    out["empty_kernel_graph_us"] = ms * 1e3
    out["empty_kernel_mode"] = mode
    rec.set(ceilings=out)
    print(
        f"  copy {out['copy_gbps_read_plus_write']:.0f} GB/s (read+write), empty kernel "
        f"{out['empty_kernel_host_us']:.1f} us host / {out['empty_kernel_graph_us']:.2f} us in a graph", flush=True,
    )
    return out


def _copies(nbytes: int, l2: int | None, dry: bool, cap: int = 64) -> int:
    """Weight copies to rotate so the bytes touched per cycle pass 3x the L2 cache."""
    if dry:
        return 2
    l2 = l2 or 50 << 20
    return max(1, min(cap, math.ceil(3 * l2 / nbytes)))


def _rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def kernels_part(args, rec: Recorder, budget: Budget) -> None:
    import torch

    from sab_random import BITMAP, SIGN, layer_bytes, random_packed
    from vllm_sab.kernels import reference_linear
    from vllm_sab.kernels.triton_kernel import ALTERNATIVES, PreparedLayer, choose_launch

    device = torch.device("cpu" if args.dry_run else "cuda")
    env = _env(device)
    rec.set(env=env)
    print(f"  {env}", flush=True)
    _ceilings(device, rec, args.dry_run)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    m_values = DRY_M_VALUES if args.dry_run else M_VALUES
    l2 = env.get("l2_bytes")
    gen = torch.Generator(device=device).manual_seed(0)
    sab_dtype = torch.float16

    for model, layer, n, k in shapes:
        if budget.over():
            rec.note(f"time box reached before {model} {layer} [{n}, {k}]; later shapes not measured")
            break
        variants = {}  # name -> (list of callables-by-x, bytes per weight copy, dtype)
        for dtype, name in ((torch.float16, "cublas-fp16"), (torch.bfloat16, "cublas-bf16")):
            w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
            copies = [w] + [w.clone() for _ in range(_copies(w.numel() * w.element_size(), l2, args.dry_run) - 1)]
            variants[name] = (copies, w.numel() * w.element_size(), dtype)
        layers = {}
        for profile in (SIGN, BITMAP):
            t = random_packed(profile, n, k, device, seed=n + k)
            nbytes = layer_bytes(t)
            copies = [PreparedLayer(t, profile)] + [
                PreparedLayer({s: v.clone() for s, v in t.items()}, profile)
                for _ in range(_copies(nbytes, l2, args.dry_run) - 1)
            ]
            variants[f"sab-{profile.key}"] = (copies, nbytes, sab_dtype)
            layers[profile.key] = (t, profile)
        # Correctness first (cheap shapes only): the timed kernels must compute the product.
        if n * k <= CHECK_MAX_WEIGHTS:
            for key, (t, profile) in layers.items():
                for m in (1, 16, 64):
                    x = torch.randn(m, k, generator=gen, device=device).to(sab_dtype)
                    err = _rel_err(variants[f"sab-{key}"][0][0](x), reference_linear(x, t, profile, check=False))
                    rec.row(kind="check", model=model, layer=layer, n=n, k=k, m=m, variant=f"sab-{key}", rel_err=err)
                    if not err < 1e-2:
                        rec.fail(f"check: sab-{key} {model} {layer} M={m}: relative error {err:.3g}")
        for m in m_values:
            if budget.over():
                rec.note(f"time box reached at {model} {layer} M={m}")
                break
            xs = {dt: torch.randn(m, k, generator=gen, device=device).to(dt) for dt in (torch.float16, torch.bfloat16)}
            for name, (copies, nbytes, dtype) in variants.items():
                x = xs[dtype]
                if name.startswith("cublas"):
                    fns = [lambda w=w: torch.matmul(x, w.t()) for w in copies]
                    config = "torch.matmul"
                else:
                    fns = [lambda lay=lay: lay(x) for lay in copies]
                    plan = choose_launch(m, n, k, copies[0].profile, device)
                    config = f"{plan.config.name} split_k={plan.split_k}"
                try:
                    ms, mode = time_calls(fns, device)
                except Exception as e:  # noqa: BLE001 - record and go on with the others
                    rec.fail(f"{name} {model} {layer} M={m}: {type(e).__name__}: {e}")
                    continue
                read = nbytes + x.numel() * x.element_size()
                rec.row(
                    kind="time", model=model, layer=layer, n=n, k=k, m=m, variant=name, config=config,
                    ms=ms, us=ms * 1e3, bytes_read=read, gbps_read=read / ms / 1e6,
                    tflops=2 * m * n * k / ms / 1e9, mode=mode, copies=len(copies),
                )
            print(f"  {model} {layer} [{n}x{k}] M={m}: " + ", ".join(
                f"{r['variant']} {r['us']:.1f}us" for r in rec.doc["rows"]
                if r.get("kind") == "time" and r["n"] == n and r["k"] == k and r["m"] == m
            ), flush=True)
        del variants, layers
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Alternative launch configurations, on one 7B and one 70B shape.
    alt_shapes = shapes[:1] + shapes[6:7] if not args.dry_run else shapes[:1]
    for model, layer, n, k in alt_shapes:
        for profile in (SIGN, BITMAP):
            if budget.over():
                rec.note("time box reached in the alternatives sweep")
                return
            t = random_packed(profile, n, k, device, seed=1)
            nbytes = layer_bytes(t)
            copies = [PreparedLayer(t, profile)] + [
                PreparedLayer({s: v.clone() for s, v in t.items()}, profile)
                for _ in range(_copies(nbytes, l2, args.dry_run) - 1)
            ]
            for config in ALTERNATIVES:
                if config.max_m <= 16:  # decode alternatives: at the largest M they serve
                    ms_values = [config.block_m if config.kernel == "gemv" else 16]
                else:
                    ms_values = [1024, 4096]
                if args.dry_run:
                    ms_values = [min(m, 32) if m > 16 else min(m, 3) for m in ms_values]
                for m in ms_values:
                    if budget.over():
                        break
                    x = torch.randn(m, k, generator=gen, device=device).to(sab_dtype)
                    try:
                        ms, mode = time_calls([lambda lay=lay: lay(x, config) for lay in copies], device)
                    except Exception as e:  # noqa: BLE001
                        rec.fail(f"alternative {config.name} {profile.key} M={m}: {type(e).__name__}: {e}")
                        continue
                    read = nbytes + x.numel() * x.element_size()
                    rec.row(
                        kind="alternative", model=model, layer=layer, n=n, k=k, m=m, variant=f"sab-{profile.key}",
                        config=config.name, ms=ms, us=ms * 1e3, gbps_read=read / ms / 1e6,
                        tflops=2 * m * n * k / ms / 1e9, mode=mode,
                    )
            del copies, t
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Part: warm (compile the kernels the other parts launch, in parallel, into Triton's cache)
# ---------------------------------------------------------------------------------------
def _warm_jobs() -> list[tuple[str, int, int]]:
    """(profile key, index into LAUNCH_TABLE + ALTERNATIVES, split) of every variant the parts launch."""
    from sab_random import PROFILES
    from vllm_sab.kernels.triton_kernel import ALTERNATIVES, LAUNCH_TABLE

    configs = LAUNCH_TABLE + ALTERNATIVES
    jobs = []
    for key in PROFILES:
        for i, c in enumerate(configs):
            for split in ((1, 2) if c.kernel == "gemv" else (1,)):
                jobs.append((key, i, split))
    return jobs


def warm_job(job: tuple[str, int, int], dry: bool) -> str:
    """Launch one variant once on a small layer with the specialisations of the real shapes.

    The gemv kernel does not specialise on sizes; the gemm kernel does (on divisibility
    by 16), so its ``M`` is a multiple of 16 like every benchmarked ``M > 16``; ``N`` and
    ``K`` are multiples of 16 like every Llama shape. Returns a one-line status.
    """
    import torch

    from sab_random import PROFILES, random_packed
    from vllm_sab.kernels.triton_kernel import ALTERNATIVES, LAUNCH_TABLE, Launch, _weight_args, launch, resolve

    key, index, split = job
    device = torch.device("cpu" if dry else "cuda")
    profile = PROFILES[key]
    n, k = (64, 256) if dry else (256, 1024)
    t = random_packed(profile, n, k, device, seed=index)
    config = (LAUNCH_TABLE + ALTERNATIVES)[index]
    plan = resolve(config, n, k, profile, 1)
    nb = k // profile.block_size
    if config.kernel == "gemv":
        plan = Launch(plan.config, split, math.ceil(nb / split))
        m = config.block_m
    else:
        m = 16 if config.max_m <= 16 else 32
    x = torch.randn(m, k, device=device).half()
    t0 = time.time()
    launch(x, _weight_args(t), profile, n, plan)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return f"{key} {config.name} split={split}: {time.time() - t0:.1f}s"


def warm_part(args, rec: Recorder, budget: Budget) -> None:
    jobs = _warm_jobs()
    if args.dry_run:
        for job in jobs:
            rec.row(job=list(job), result=warm_job(job, True))
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    workers = max(1, min(8, (os.cpu_count() or 2) // 2))  # pytest -n 6 runs beside it
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(warm_job, job, False): job for job in jobs}
        for f in cf.as_completed(futures, timeout=max(1.0, budget.left())):
            try:
                rec.row(job=list(futures[f]), result=f.result())
            except Exception as e:  # noqa: BLE001 - a failed compile shows up again in the timed parts
                rec.fail(f"warm {futures[f]}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------
# Part: decode
# ---------------------------------------------------------------------------------------
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _static_kv_class():
    """A static KV cache for transformers' Llama: fixed buffers, a device-side write position.

    Only ``update`` is used (positions, mask and rotary come from the caller), which
    keeps it independent of the ``Cache`` API changes between transformers 5.x releases.
    It subclasses ``transformers.Cache`` (for isinstance checks) without its constructor.
    """
    import torch

    try:
        from transformers.cache_utils import Cache as base
    except ImportError:  # pragma: no cover
        base = object

    class StaticKV(base):  # type: ignore[misc, valid-type]
        is_compileable = True

        def __init__(self, layers, batch, heads, max_len, head_dim, dtype, device, pos):
            self.k = [torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(layers)]
            self.v = [torch.zeros_like(t) for t in self.k]
            self.pos = pos  # int64 [1] on the device: where this step's key/value goes
            self.host_len = 0

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.k[layer_idx].index_copy_(2, self.pos, key_states)
            self.v[layer_idx].index_copy_(2, self.pos, value_states)
            return self.k[layer_idx], self.v[layer_idx]

        def get_seq_length(self, layer_idx=0):
            return self.host_len

        def __len__(self):
            return len(self.k)

    return StaticKV


def _llama(dry: bool, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry:
        # One block per K-split under the interpreter: a decode step costs ~0.3 s there.
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)
    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval(), shape


def _decode_rate(model, shape, batch, device, dtype, dry) -> tuple[float, str, int]:
    """Greedy decode tokens/s at ``batch`` (tokens of all sequences per second)."""
    import torch

    cfg = model.config
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    ctx, steps = (8, 1) if dry else (128, 64)
    max_len = ctx + steps + 8
    pos = torch.tensor([ctx], dtype=torch.long, device=device)
    kv = _static_kv_class()(cfg.num_hidden_layers, batch, heads, max_len, head_dim, dtype, device, pos)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    position_ids = torch.full((batch, 1), ctx, dtype=torch.long, device=device)
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=device)

    def reset():
        pos.fill_(ctx)
        position_ids.fill_(ctx)
        mask.zero_()
        mask[..., : ctx + 1] = True  # a context of `ctx` cached tokens (zeros) plus this one
        kv.host_len = ctx

    def step():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=kv, use_cache=True)
        ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)
        position_ids.add_(1)
        mask.index_fill_(3, pos, True)

    with torch.inference_mode():
        reset()
        if device.type != "cuda":
            step()
            reset()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            return batch * steps / (time.perf_counter() - t0), "cpu eager", steps
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        reset()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            mode = "cuda-graph"
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - fall back to eager steps, and say so
            torch.cuda.synchronize()
            mode, run, graph = f"eager: {type(e).__name__}: {str(e)[:160]}", step, None
        reset()
        run()
        reset()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        stop.record()
        stop.synchronize()
        rate = batch * steps / (start.elapsed_time(stop) / 1e3)
        del graph
        return rate, mode, steps


def decode_part(args, rec: Recorder, budget: Budget) -> None:
    import torch

    from sab_random import BITMAP, SIGN, replace_linears

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float16
    model, shape = _llama(args.dry_run, device, dtype)
    rec.set(model=shape, dtype=str(dtype), attention="sdpa", kv_cache="static (fixed buffers)",
            note="q/k/v and gate/up unfused (transformers' Llama); lm_head and embeddings stay fp16")
    for variant, profile in (("fp16", None), (f"sab-{SIGN.key}", SIGN), (f"sab-{BITMAP.key}", BITMAP)):
        if budget.over():
            rec.note(f"time box reached before {variant}")
            break
        if profile is not None:
            count = replace_linears(model.model.layers, profile, names=LINEAR_NAMES)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rec.note(f"{variant}: {count} linears replaced")
        for batch in (1, 8):
            if budget.over():
                rec.note(f"time box reached before {variant} batch {batch}")
                break
            try:
                rate, mode, steps = _decode_rate(model, shape, batch, device, dtype, args.dry_run)
            except Exception as e:  # noqa: BLE001
                rec.fail(f"{variant} batch {batch}: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            rec.row(variant=variant, batch=batch, tokens_per_s=rate, mode=mode, steps=steps, peak_gib=mem)
            print(f"  decode {variant} batch {batch}: {rate:.1f} tokens/s ({mode})", flush=True)


# ---------------------------------------------------------------------------------------
# Part: calibrate
# ---------------------------------------------------------------------------------------
def calibrate_part(args, rec: Recorder, budget: Budget) -> None:
    import torch

    # The model builders are development fixtures kept with the tests (tests/tiny_models.py), not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_models import build_tiny_tokenizer, llava_parts, save_vlm

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.float16
    text = dict(num_hidden_layers=1)
    if not args.dry_run:
        # llava_parts fixes head_dim at 64: 64 heads of 64 give Llama-2-7B's linear shapes
        # (q/k/v/o 4096x4096, MLP 11008); only the attention's head split differs.
        text.update(hidden_size=4096, intermediate_size=11008, num_attention_heads=64, num_key_value_heads=64)
    samples = 4 if args.dry_run else 64
    work = Path(tempfile.mkdtemp(prefix="sab-calib-"))
    t0 = time.time()
    tokenizer = build_tiny_tokenizer("llava")
    cls, config, processor = llava_parts(tokenizer, text=text)
    config.dtype = dtype
    torch.manual_seed(0)
    model = cls(config).to(dtype).eval()
    save_vlm(model, work / "model", arch="llava", processor=processor)
    del model
    build_s = time.time() - t0
    cmd = [sys.executable, "-m", "vllm_sab.calibrate.cli", "--model", str(work / "model"), "--output",
           str(work / "out"), "--method", "sab", "--data", "builtin", "--device", device, "--num-samples", str(samples), "--no-progress"]
    rec.set(model=dict(arch="llava", **text, vision="tiny CLIP (width 128, 2 layers)"), build_s=build_s,
            command=" ".join(cmd[1:]).replace(str(work), "$WORK"))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, budget.left()))
    wall = time.time() - t0
    tail = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode != 0:
        rec.note(f"sab-calibrate exited {proc.returncode}: {tail}")
        rec.set(status="failed")
        raise SystemExit(1)
    report = json.loads((work / "out" / "sab_report.json").read_text())
    rec.row(wall_s=wall, samples=samples, device=device, **report["summary"])
    print(f"  sab-calibrate --method sab, one {text.get('hidden_size', 256)}-wide layer: {wall:.1f} s wall "
          f"({report['summary'].get('calibration_seconds', float('nan')):.1f} s inside)", flush=True)


# ---------------------------------------------------------------------------------------
# Part: report
# ---------------------------------------------------------------------------------------
def _load(out: Path, name: str) -> dict:
    p = out / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        return {"status": f"missing ({type(e).__name__})", "rows": [], "notes": []}


def _targets(kern: dict, dec: dict) -> list[dict]:
    """The issue's targets against the measurement (met, missed by how much, or not measured)."""
    rows = [r for r in kern.get("rows", []) if r.get("kind") == "time"]
    copy = (kern.get("ceilings") or {}).get("copy_gbps_read_plus_write")
    by = {}
    for r in rows:
        by[(r["model"], r["layer"], r["m"], r["variant"])] = r
    out = []

    def speedups(model, m_ok, variant):
        vals = []
        for (mo, layer, m, v), r in by.items():
            base = by.get((mo, layer, m, "cublas-fp16"))
            if mo == model and m_ok(m) and v == variant and base:
                vals.append(base["ms"] / r["ms"])
        return vals

    def add(name, vals, goal, kind="min"):
        if not vals:
            out.append(dict(target=name, goal=goal, measured=None, met=None))
            return
        worst = min(vals)
        out.append(dict(target=name, goal=goal, measured=round(worst, 3), met=worst >= goal))

    for v in sorted({r["variant"] for r in rows if r["variant"].startswith("sab")}):
        fr = [r["gbps_read"] / copy for r in rows if r["m"] == 1 and r["variant"] == v] if copy else []
        add(f"{v} M=1: read GB/s / copy GB/s (worst shape)", fr, 0.85)
    add("bitmap M=1 speed-up vs cuBLAS fp16, 7B shapes (worst)", speedups("7b", lambda m: m == 1, "sab-b128-z1-s8g-rc"), 3.0)
    add("bitmap M=1 speed-up, 70B shapes (worst)", speedups("70b", lambda m: m == 1, "sab-b128-z1-s8g-rc"), 5.0)
    add("sign M=1 speed-up, 70B shapes (worst)", speedups("70b", lambda m: m == 1, "sab-b128-z0"), 8.0)
    add("bitmap M=16 speed-up, 70B shapes (worst)", speedups("70b", lambda m: m == 16, "sab-b128-z1-s8g-rc"), 2.5)
    for v in ("sab-b128-z0", "sab-b128-z1-s8g-rc"):
        add(f"{v} M>=512 speed-up (worst shape)", speedups("7b", lambda m: m >= 512, v) + speedups(
            "70b", lambda m: m >= 512, v), 0.9)
    drows = {(r["variant"], r["batch"]): r for r in dec.get("rows", [])}
    for v in ("sab-b128-z0", "sab-b128-z1-s8g-rc"):
        base, r = drows.get(("fp16", 1)), drows.get((v, 1))
        add(f"decode tokens/s {v} / fp16, batch 1", [r["tokens_per_s"] / base["tokens_per_s"]] if base and r else [], 3.0)
    return out


def report_part(args) -> int:
    out = Path(args.out)
    kern, dec, cal = _load(out, "kernels"), _load(out, "decode"), _load(out, "calibrate")
    tests = (out / "pytest.log").read_text().strip().splitlines()[-1:] if (out / "pytest.log").exists() else []
    targets = _targets(kern, dec)
    doc = {
        "command": "bash benchmarks/gpu/run.sh" + (" --dry-run" if args.dry_run else ""),
        "dry_run": args.dry_run,
        "env": kern.get("env"),
        "ceilings": kern.get("ceilings"),
        "tests": tests[0] if tests else None,
        "targets": targets,
        "parts": {"kernels": kern, "decode": dec, "calibrate": cal},
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    md = [f"# sab GPU benchmark{' (DRY RUN: CPU interpreter, tiny shapes, timings meaningless)' if args.dry_run else ''}",
          "", f"Command: `{doc['command']}`", "", f"Environment: `{json.dumps(doc['env'])}`", ""]
    c = doc["ceilings"] or {}
    if c:
        md += [f"Ceilings (same run): copy {c['copy_gbps_read_plus_write']:.0f} GB/s read+write "
               f"({c['copy_gbps_read']:.0f} GB/s of source read), empty Triton kernel "
               f"{c['empty_kernel_host_us']:.1f} us per launch from Python, "
               f"{c['empty_kernel_graph_us']:.2f} us per node in a CUDA graph.", ""]
    md += [f"Tests (`pytest -m cuda`): {doc['tests']}", "", "## Targets (issue 16)", "",
           "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in targets:
        md.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['met']} |")
    rows = [r for r in kern.get("rows", []) if r.get("kind") == "time"]
    if rows:
        md += ["", "## Kernels: us per call (GB/s read) and speed-up vs cuBLAS fp16", "",
               "| model | layer | N x K | M | cuBLAS fp16 | cuBLAS bf16 | sab sign | sab bitmap | sign config | bitmap config |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["model"], r["layer"], r["n"], r["k"], r["m"]) for r in rows},
                      key=lambda t: (t[0], t[2] * t[3], t[1], t[4]))
        by = {(r["model"], r["layer"], r["m"], r["variant"]): r for r in rows}
        for mo, layer, n, k, m in keys:
            base = by.get((mo, layer, m, "cublas-fp16"))
            cells = []
            for v in ("cublas-fp16", "cublas-bf16", "sab-b128-z0", "sab-b128-z1-s8g-rc"):
                r = by.get((mo, layer, m, v))
                if r is None:
                    cells.append("-")
                    continue
                sp = f", {base['ms'] / r['ms']:.2f}x" if base and v.startswith("sab") else ""
                cells.append(f"{r['us']:.1f} ({r['gbps_read']:.0f}{sp})")
            cfgs = [(by.get((mo, layer, m, v)) or {}).get("config", "-") for v in ("sab-b128-z0", "sab-b128-z1-s8g-rc")]
            md.append(f"| {mo} | {layer} | {n}x{k} | {m} | " + " | ".join(cells + cfgs) + " |")
    alts = [r for r in kern.get("rows", []) if r.get("kind") == "alternative"]
    if alts:
        md += ["", "## Alternative launch configurations", "", "| shape | M | profile | config | us | GB/s | TFLOP/s |",
               "|---|---|---|---|---|---|---|"]
        for r in alts:
            md.append(f"| {r['model']} {r['layer']} | {r['m']} | {r['variant']} | {r['config']} | {r['us']:.1f} | "
                      f"{r['gbps_read']:.0f} | {r['tflops']:.1f} |")
    checks = [r for r in kern.get("rows", []) if r.get("kind") == "check"]
    if checks:
        worst = max(r["rel_err"] for r in checks)
        md += ["", f"Kernel checks against the torch reference: {len(checks)}, worst relative error {worst:.2e}."]
    if dec.get("rows"):
        md += ["", f"## Decode (transformers, {json.dumps(dec.get('model'))}, {dec.get('note')})", "",
               "| variant | batch | tokens/s | vs fp16 | mode |", "|---|---|---|---|---|"]
        base = {r["batch"]: r["tokens_per_s"] for r in dec["rows"] if r["variant"] == "fp16"}
        for r in dec["rows"]:
            ratio = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
            md.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {ratio} | {r['mode']} |")
    if cal.get("rows"):
        r = cal["rows"][0]
        md += ["", "## Calibration", "", f"`{cal.get('command')}`: {r['wall_s']:.1f} s wall "
               f"({r.get('calibration_seconds', 0):.1f} s inside the calibrator), {r['quantized_linears']} linears, "
               f"{r['true_bits_per_weight']:.3f} true bits/weight, model {json.dumps(cal.get('model'))}."]
    notes = [f"{name}: {n}" for name, part in (("kernels", kern), ("decode", dec), ("calibrate", cal))
             for n in part.get("notes", [])]
    md += ["", "## Notes and part status", ""] + [f"- {name}: {part.get('status')}" for name, part in
                                                   (("kernels", kern), ("decode", dec), ("calibrate", cal))]
    md += [f"- {n}" for n in notes]
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(rows, out / "kernels.png")
    print("\n".join(md[:2]))
    print(f"targets: " + "; ".join(f"{t['target']}: {t['measured']} (goal {t['goal']})" for t in targets))
    return 0


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib missing: no plot)")
        return
    if not rows:
        return
    shapes = sorted({(r["model"], r["layer"], r["n"], r["k"]) for r in rows}, key=lambda t: (t[0], t[2] * t[3]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    by = {(r["model"], r["layer"], r["m"], r["variant"]): r for r in rows}
    for mo, layer, n, k in shapes:
        for v, style in (("sab-b128-z0", "-"), ("sab-b128-z1-s8g-rc", "--")):
            pts = sorted((m, by[(mo, layer, m, "cublas-fp16")]["ms"] / r["ms"], r["gbps_read"])
                         for (mo2, l2, m, v2), r in by.items()
                         if mo2 == mo and l2 == layer and v2 == v and (mo, layer, m, "cublas-fp16") in by)
            if pts:
                label = f"{mo} {layer} {v[4:]}"
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
    for ax, title in ((axes[0], "speed-up vs cuBLAS fp16"), (axes[1], "GB/s on bytes read")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run one part; returns its exit code (1 when it failed; what it measured stays in its JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("warm", "kernels", "decode", "calibrate", "report"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    p.add_argument("--budget-s", type=float, default=120.0, help="soft time box of the part")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    sys.path.insert(0, str(HERE))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return report_part(args)
    rec = Recorder(out / f"{args.part}.json", part=args.part, dry_run=args.dry_run)
    budget = Budget(args.budget_s)
    t0 = time.time()
    try:
        {"warm": warm_part, "kernels": kernels_part, "decode": decode_part, "calibrate": calibrate_part}[args.part](args, rec, budget)
    except SystemExit as e:
        return int(e.code or 1)
    except Exception as e:  # noqa: BLE001 - keep the rows measured so far, and say what broke
        traceback.print_exc()
        rec.set(status=f"failed: {type(e).__name__}: {e}", seconds=time.time() - t0)
        return 1
    failures = rec.doc.get("failures", 0)
    rec.set(status=f"failed: {failures} measurement(s), see notes" if failures else "ok", seconds=time.time() - t0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
