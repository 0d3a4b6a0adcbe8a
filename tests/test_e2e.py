"""End to end on CPU: sab-calibrate -> packed checkpoint -> vLLM -> same tokens as transformers.

Every test compares vLLM serving the packed checkpoint with an independent
reference: transformers running the same model with the checkpoint's weights
dequantized by the format's reference (``format.dequantize``). Those tests pin the
native CPU kernels to their exact paths (no int8 activations: ``exact_cpu_kernels``);
the int8 decode, on by default, is compared with transformers running the same native
kernels (``test_int8_decode_served_by_vllm_matches_native_transformers``).
"""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import hf_greedy, vllm_greedy
from vllm_sab import format as fmt
from vllm_sab.calibrate import calibrate
from vllm_sab.calibrate.methods import METHODS, Method
from vllm_sab.calibrate.reference_model import load_dequantized


class AllPartsMethod(Method):
    """Test method that fills every optional part of format v1 (zones, salient residual,
    permutation, column scales, offsets) with plausible values derived from W."""

    name = "test-all-parts"

    def quantize(self, weight: torch.Tensor, stats=None) -> fmt.BinaryComponents:
        g = torch.Generator().manual_seed(weight.shape[0] * 7919 + weight.shape[1])
        b, s = self.block_size, 5
        p = fmt.LayerProfile(b, zone_bits=1, salient=s, salient_zoned=True, col_scale=True, offset=True)
        n, k = weight.shape
        nb = k // b
        perm = torch.cat([torch.randperm(b, generator=g) for _ in range(nb)])
        w = weight[:, fmt.stored_column_index(perm, b)].float()  # stored order
        mag = w.abs().view(n, nb, b).mean(-1, keepdim=True)
        return fmt.BinaryComponents(
            profile=p,
            signs=torch.where(w >= 0, 1, -1).to(torch.int8),
            scale=(mag * (0.5 + torch.rand(n, nb, p.num_slots, generator=g))).half(),
            zone=(w.abs() > mag.repeat_interleave(b, 2).view(n, k)).to(torch.uint8),
            residual=torch.where(torch.rand(n, nb, s, generator=g) > 0.5, 1, -1).to(torch.int8),
            perm=perm,
            col_scale=(0.75 + 0.5 * torch.rand(p.num_slots, k, generator=g)).half(),
            offset=(0.1 * mag * torch.randn(n, nb, p.num_zones, generator=g)).half(),
        )


@pytest.fixture(autouse=True)
def exact_cpu_kernels(monkeypatch):
    """The native CPU kernels without int8 activations (the exact paths), in this process
    (vLLM's engine runs here: VLLM_ENABLE_V1_MULTIPROCESSING=0) and in any child."""
    import dataclasses

    from vllm_sab.kernels import cpu

    monkeypatch.setenv(cpu.INT8_ENV, "0")
    monkeypatch.setattr(cpu, "DEFAULT_CONFIG", dataclasses.replace(cpu.DEFAULT_CONFIG, int8_activations=False))


@pytest.fixture
def all_parts_method(monkeypatch):
    monkeypatch.setitem(METHODS, AllPartsMethod.name, AllPartsMethod)
    return AllPartsMethod.name


def _check_served_equals_reference(make_llm, ckpt, expect_quantized: int) -> None:
    from vllm_sab import ops

    before = ops.call_count
    served = vllm_greedy(make_llm(ckpt, quantization="sab"), ckpt)
    assert ops.call_count - before >= expect_quantized, "vLLM did not run the sab linear path"
    reference = hf_greedy(load_dequantized(ckpt, torch.float32), ckpt)
    assert len(served) > 0
    assert served == reference


@pytest.mark.vllm
@pytest.mark.parametrize(
    "arch,quantize_vision", [("llava", True), ("qwen2_vl", False), ("qwen2_5_vl", True)]
)
def test_sign_checkpoint_served_by_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path, arch, quantize_vision):
    """sign checkpoint of each architecture: vLLM greedy tokens == dequantized transformers tokens."""
    ckpt = calibrate(tiny_vlm(arch), tmp_path / "sab", method="sign", quantize_vision=quantize_vision,
                     progress=False)
    qc = fmt.validate_checkpoint(ckpt)
    lm = [m for m in qc.modules if ".language_model." in m]
    assert len(lm) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    vision = [m for m in qc.modules if ".language_model." not in m]
    assert bool(vision) == quantize_vision
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_every_format_part_served_by_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path, all_parts_method, arch):
    """A checkpoint using every optional format part (fused q/k/v and gate/up sharing perm and
    column scales; Qwen2.5-VL's fused-on-disk vision qkv) loads in vLLM and matches transformers."""
    ckpt = calibrate(tiny_vlm(arch), tmp_path / "sab", method=all_parts_method, quantize_vision=True,
                     progress=False)
    qc = fmt.validate_checkpoint(ckpt)
    (profile,) = qc.profiles.values()
    assert profile.zone_bits and profile.salient and profile.col_scale and profile.offset
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)


@pytest.mark.vllm
def test_triton_kernel_inside_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path, monkeypatch):
    """vLLM running the plugin's Triton kernel (interpreter on CPU) gives the reference tokens."""
    from vllm_sab import kernels

    if not kernels.triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.fail("Triton is installed with vLLM; TRITON_INTERPRET=1 is set by conftest without CUDA")
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method="sign", progress=False)
    monkeypatch.setenv("SAB_KERNEL", "triton")  # read when vLLM loads each layer
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)


_HESSIAN_METHODS = sorted(
    name for name, cls in METHODS.items() if cls.needs_stats and not getattr(cls, "dense_output", False)
)


@pytest.mark.vllm
@pytest.mark.parametrize("method", _HESSIAN_METHODS)
def test_hessian_method_checkpoint_served_by_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path, method):
    """Every calibration-data method (builtin data, layer-wise Hessians): vLLM tokens == dequantized transformers.

    Architectures alternate so both LLaVA and Qwen2.5-VL (mRoPE kwargs, vision quantized) run the pipeline.
    """
    arch = ("llava", "qwen2_5_vl")[_HESSIAN_METHODS.index(method) % 2]
    ckpt = calibrate(tiny_vlm(arch), tmp_path / "sab", method=method, quantize_vision=arch != "llava",
                     data="builtin", num_samples=6, max_seq_len=256, progress=False)
    report = __import__("json").loads((ckpt / "sab_report.json").read_text())
    assert report["calibration"]["samples"] == 6
    assert all(0 <= r["output_rel_error"] < 1 for r in report["layers"])
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)


@pytest.mark.vllm
def test_float8_row_scale_checkpoint_served_by_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path):
    """SAB with e4m3 row scales: stored as F8_E4M3 (fewer true bits than float16 scales),
    widened once at load for the kernels, and vLLM's tokens equal the dequantized transformers."""
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method="sab", data="builtin", num_samples=6,
                     max_seq_len=256, progress=False, method_options={"scale_dtype": "float8_e4m3fn"})
    qc = fmt.validate_checkpoint(ckpt)
    assert {p.scale_dtype for p in qc.profiles.values()} == {"float8_e4m3fn"}
    headers = fmt.read_safetensors_headers(ckpt)
    scales = [dt for name, (_, dt) in headers.items() if name.endswith(fmt.SCALE)]
    assert scales and set(scales) == {"F8_E4M3"}
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)


@pytest.mark.vllm
def test_atv_pruned_dense_checkpoint_served_by_stock_vllm(tiny_vlm, make_llm, tmp_path):
    """atv-prune writes an ordinary dense checkpoint: 50 % zeros per decoder linear row, no
    quantization_config, and stock vLLM's greedy tokens equal transformers'."""
    import json

    from safetensors.torch import load_file

    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "pruned", method="atv-prune", token_pool="atv",
                     data="builtin", num_samples=6, max_seq_len=256, progress=False)
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    w = state["model.language_model.layers.1.mlp.down_proj.weight"]
    assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
    from e2e_helpers import hf_greedy, vllm_greedy
    from vllm_sab.demo.evaluate import load_transformers

    served = vllm_greedy(make_llm(ckpt), ckpt)
    assert served == hf_greedy(load_transformers(ckpt), ckpt)


@pytest.mark.vllm
def test_native_cpu_kernel_serves_by_default(tiny_vlm, make_llm, tmp_path, monkeypatch, all_parts_method):
    """Without SAB_KERNEL, vLLM on CPU serves through the native kernel, decode and prefill paths
    both, and its greedy tokens equal the dequantized transformers reference (every format part)."""
    import dataclasses

    from vllm_sab.kernels import chooser, cpu

    monkeypatch.delenv(chooser.FORCE_ENV, raising=False)
    name = chooser.choose("cpu", torch.float32, fmt.LayerProfile()).name
    assert name.startswith("cpu-"), chooser.explain("cpu", torch.float32, fmt.LayerProfile())
    native = chooser.BY_NAME[name]
    rows: list[int] = []

    def counted(x, tensors, profile):
        rows.append(x.shape[0])
        return native.run(x, tensors, profile)

    monkeypatch.setitem(chooser.BY_NAME, name, dataclasses.replace(native, run=counted))
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method=all_parts_method, progress=False)
    _check_served_equals_reference(make_llm, ckpt, expect_quantized=2 * 4)
    limit = cpu.DEFAULT_CONFIG.decode_max_m
    assert rows and min(rows) <= limit < max(rows), f"token counts seen by the kernel: {sorted(set(rows))}"


@pytest.mark.vllm
def test_compiled_vllm_matches_transformers(tiny_vlm, make_llm, tmp_path, all_parts_method):
    """vLLM with torch.compile on (enforce_eager=False: Dynamo + Inductor over the decoder, the
    sab::linear custom op opaque inside the graph) serves the same greedy tokens as the
    dequantized transformers model, for a checkpoint with every optional format part."""
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method=all_parts_method, progress=False)
    from vllm_sab import ops

    before = ops.call_count
    llm = make_llm(ckpt, quantization="sab", enforce_eager=False)
    from vllm.config.compilation import CompilationMode

    # On CPU vLLM compiles with DYNAMO_TRACE_ONCE (Dynamo once, Inductor backend); NONE is eager.
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    served = vllm_greedy(llm, ckpt)
    assert ops.call_count - before >= 2 * 4, "vLLM did not run the sab linear path"
    assert served and served == hf_greedy(load_dequantized(ckpt, torch.float32), ckpt)


_TP_SCRIPT = r'''
import json, sys

def main():
    sys.path.insert(0, sys.argv[3])
    from e2e_helpers import vllm_greedy
    from vllm import LLM

    llm = LLM(sys.argv[1], quantization="sab", dtype="float32", enforce_eager=True, max_model_len=512,
              kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 1}, seed=0,
              tensor_parallel_size=int(sys.argv[2]))
    print("TOKENS " + json.dumps(vllm_greedy(llm, sys.argv[1])), flush=True)

if __name__ == "__main__":
    main()
'''


@pytest.mark.vllm
def test_tensor_parallel_2_on_cpu_matches_tp1(tiny_vlm, tmp_path, all_parts_method):
    """tensor_parallel_size=2 on vLLM's CPU backend (two worker processes, one core each) serves
    the tokens of tensor_parallel_size=1 and of transformers: row-parallel o_proj / down_proj load
    K halves (with their halves of weight_perm and weight_col_scale), column-parallel qkv /
    gate_up load their heads and rows."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method=all_parts_method, progress=False)
    script = tmp_path / "tp_generate.py"
    script.write_text(_TP_SCRIPT)
    # vLLM's CPU backend binds each rank's threads to a NUMA node by default and refuses TP=2 on
    # one node ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"); bind by hand.
    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1",
               VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}|{cores[-1] if len(cores) > 1 else cores[0]}")
    tokens = {}
    for tp in (1, 2):
        proc = subprocess.run([sys.executable, str(script), str(ckpt), str(tp), str(Path(__file__).parent)],
                              env=env, capture_output=True, text=True, timeout=500)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
        assert proc.returncode == 0 and lines, f"TP={tp} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        tokens[tp] = json.loads(lines[-1][len("TOKENS "):])
    assert tokens[1] and tokens[2] == tokens[1] == hf_greedy(load_dequantized(ckpt, torch.float32), ckpt)


@pytest.mark.vllm
@pytest.mark.parametrize("method", ["sab", "bivlm"])
def test_int8_decode_served_by_vllm_matches_native_transformers(tiny_vlm, make_llm, tmp_path, monkeypatch, method):
    """With the default int8 decode, vLLM's greedy tokens equal transformers running the same
    native kernels (reference_model.load_native: prefill tiles, int8 decode at M = 1), and
    the int8 path really served vLLM's decode steps. (Against the exact path the tiny random
    model, whose logits are nearly tied, may differ in a token: that cost is measured on the
    shipped model, benchmarks/results/int8_quality.md.)"""
    import dataclasses

    from vllm_sab.calibrate.reference_model import load_native
    from vllm_sab.kernels import cpu

    if not cpu.has_int8_dot():
        pytest.skip("this CPU has no AVX512-VNNI: the int8 decode does not run here")
    monkeypatch.setenv(cpu.INT8_ENV, "1")
    monkeypatch.setattr(cpu, "DEFAULT_CONFIG", dataclasses.replace(cpu.DEFAULT_CONFIG, int8_activations=True))
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "sab", method=method, data="builtin", num_samples=6,
                     max_seq_len=256, progress=False)
    paths: list[int] = []
    real = cpu.cpu_linear

    def recorded(x, tensors, profile, isa="", config=None):
        paths.append(cpu.kernel_path(x.shape[0], x.dtype, profile, isa, config))
        return real(x, tensors, profile, isa, config)

    monkeypatch.setattr(cpu, "cpu_linear", recorded)
    served = vllm_greedy(make_llm(ckpt, quantization="sab"), ckpt)
    assert cpu.PATH_DECODE_INT8 in paths, f"vLLM's sab calls took paths {sorted(set(paths))}"
    monkeypatch.setattr(cpu, "cpu_linear", real)
    reference = hf_greedy(load_native(ckpt), ckpt)
    assert len(served) > 0
    assert served == reference
