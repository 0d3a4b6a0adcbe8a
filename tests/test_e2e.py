"""End to end on CPU: sab-calibrate -> packed checkpoint -> vLLM -> same tokens as transformers.

Every test compares vLLM serving the packed checkpoint with an independent
reference: transformers running the same model with the checkpoint's weights
dequantized by the format's reference (``format.dequantize``).
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
    from vllm_sab.calibrate.evaluate import load_transformers

    served = vllm_greedy(make_llm(ckpt), ckpt)
    assert served == hf_greedy(load_transformers(ckpt), ckpt)
