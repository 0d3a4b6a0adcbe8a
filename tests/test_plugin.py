"""vLLM plugin details: weight reload, the name mapper, the bf16 capability check, tensor-parallel shard math."""

from __future__ import annotations

import pytest
import torch

from e2e_helpers import hf_greedy, vllm_greedy
from vllm_sab import format as fmt
from vllm_sab.calibrate import calibrate
from vllm_sab.calibrate.reference_model import load_dequantized


@pytest.mark.vllm
def test_weight_reload_runs_process_weights_again_and_serves_the_new_weights(tiny_vlm, make_llm, tmp_path):
    """vLLM's in-place weight reload (RL weight sync) runs the weight loaders and
    process_weights_after_loading a second time: reloading another checkpoint of the same shapes
    (every optional tensor, fused q/k/v and gate/up) serves exactly that checkpoint's tokens."""
    from test_e2e import AllPartsMethod
    from vllm_sab.calibrate.methods import METHODS
    from tiny_models import build_tiny_vlm

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, AllPartsMethod.name, AllPartsMethod)
        first = calibrate(tiny_vlm("llava"), tmp_path / "a", method=AllPartsMethod.name, progress=False)
        second = calibrate(build_tiny_vlm("llava", tmp_path / "tiny-1", seed=1), tmp_path / "b",
                           method=AllPartsMethod.name, progress=False)
    want = {ckpt: hf_greedy(load_dequantized(ckpt, torch.float32), ckpt) for ckpt in (first, second)}
    assert want[first] != want[second]
    llm = make_llm(first, quantization="sab")
    assert vllm_greedy(llm, first) == want[first]
    for ckpt in (second, first):
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpt)})
        # vLLM leaves the caches built from the old weights to the caller (reload_weights' docstring).
        llm.reset_prefix_cache()
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()
        assert vllm_greedy(llm, ckpt) == want[ckpt]


# ---------------------------------------------------------------------------------------
# Tensor-parallel shard math at TP=2, one rank at a time in this process
# ---------------------------------------------------------------------------------------
BLOCK = 64


def _all_parts(weight: torch.Tensor):
    """Packed format v1 tensors with every optional part (permutation, column scales, ...) of ``weight``."""
    from test_e2e import AllPartsMethod

    comp = AllPartsMethod(block_size=BLOCK).quantize(weight)
    return fmt.pack(comp), comp.profile


def _sab_config(profile, modules: dict[str, tuple[int, int]]):
    from vllm_sab.config import SabConfig

    return SabConfig(fmt.SabQuantizationConfig(
        {profile.key: profile}, {m: fmt.QuantizedModule(profile.key, shape) for m, shape in modules.items()}
    ))


@pytest.fixture
def fake_tp(monkeypatch):
    """``fake_tp(rank, world=2)``: vLLM's linear layers and parameters see tensor-parallel size ``world`` and ``rank``."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    def set_rank(rank: int, world: int = 2) -> None:
        for mod in (linear, parameter):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: world)

    return set_rank


def test_tp2_row_parallel_narrows_k_and_the_k_shared_tensors(fake_tp):
    """RowParallelLinear at TP=2: each rank loads K columns [r K/2, (r+1) K/2) of every tensor,
    the K-only ones (weight_perm, weight_col_scale) through SharedKParameter's k_split narrowing,
    and the two partial products sum to x W_hat^T of the whole layer."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    n, k = 48, 4 * BLOCK
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    tensors, profile = _all_parts(w)
    prefix = "model.layers.0.self_attn.o_proj"
    cfg = _sab_config(profile, {prefix: (n, k)})
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    w_hat = fmt.dequantize(tensors, profile)
    total = torch.zeros(5, n)
    for rank in (0, 1):
        fake_tp(rank)
        layer = RowParallelLinear(k, n, bias=False, quant_config=cfg, prefix=prefix)
        assert layer.tp_rank == rank and layer.input_size_per_partition == k // 2
        for name, t in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, t)
        layer.quant_method.process_weights_after_loading(layer)
        half = slice(rank * k // 2, (rank + 1) * k // 2)
        assert torch.equal(layer.weight_perm.data, tensors[fmt.PERM][half])
        assert torch.equal(layer.weight_col_scale.data, tensors[fmt.COL_SCALE][:, half])
        words = slice(rank * k // 64, (rank + 1) * k // 64)
        assert torch.equal(layer.weight_packed.data, tensors[fmt.PACKED][:, words])
        blocks = slice(rank * k // (2 * BLOCK), (rank + 1) * k // (2 * BLOCK))
        assert torch.equal(layer.weight_scale.data, tensors[fmt.SCALE][:, blocks])
        y = layer.quant_method.apply(layer, x[:, half])
        torch.testing.assert_close(y, x[:, half] @ w_hat[:, half].T, rtol=1e-5, atol=1e-5)
        total += y
    torch.testing.assert_close(total, x @ w_hat.T, rtol=1e-5, atol=1e-5)


def test_tp2_qkv_column_parallel_loads_each_ranks_heads(fake_tp):
    """QKVParallelLinear at TP=2 (4 query heads, 2 KV heads of 32): rank r holds query heads
    2r, 2r+1 and KV head r of each of q/k/v's checkpoint tensors, the fused shards share the
    K-indexed tensors, and its output is those rows of x W_hat^T."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    hidden, head, heads, kv_heads = 2 * BLOCK, 32, 4, 2
    g = torch.Generator().manual_seed(2)
    sizes = {"q": heads * head, "k": kv_heads * head, "v": kv_heads * head}
    # One fused group, quantized stacked (as sab-calibrate does), then split back per projection.
    from test_e2e import AllPartsMethod

    comp = AllPartsMethod(block_size=BLOCK).quantize(torch.randn(sum(sizes.values()), hidden, generator=g))
    parts = dict(zip(sizes, comp.split_rows(list(sizes.values()))))
    packed = {s: fmt.pack(c) for s, c in parts.items()}
    profile = comp.profile
    names = {s: f"model.layers.0.self_attn.{s}_proj" for s in sizes}
    cfg = _sab_config(profile, {names[s]: (sizes[s], hidden) for s in sizes})
    cfg.packed_modules_mapping["qkv_proj"] = ["q_proj", "k_proj", "v_proj"]
    x = torch.randn(3, hidden, generator=g)
    for rank in (0, 1):
        fake_tp(rank)
        layer = QKVParallelLinear(hidden, head, heads, kv_heads, bias=False, quant_config=cfg,
                                  prefix="model.layers.0.self_attn.qkv_proj")
        for shard, tensors in packed.items():
            for name, t in tensors.items():
                param = getattr(layer, name)
                param.weight_loader(param, t, shard)
        layer.quant_method.process_weights_after_loading(layer)
        want = []
        for shard, tensors in packed.items():
            local = sizes[shard] // 2
            rows = fmt.dequantize(tensors, profile)[rank * local:(rank + 1) * local]
            want.append(x @ rows.T)
        torch.testing.assert_close(layer.quant_method.apply(layer, x), torch.cat(want, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Name mapping and the bf16 capability check
# ---------------------------------------------------------------------------------------
class _PublicMapper:
    """A ``WeightsMapper`` seen through its public API only (private helpers such as
    ``_map_name`` may change between vLLM releases)."""

    def __init__(self, mapper):
        self._mapper = mapper

    def apply_list(self, values):
        return self._mapper.apply_list(values)

    def apply_dict(self, values):
        return self._mapper.apply_dict(values)


def test_apply_vllm_mapper_uses_the_public_mapper_api():
    """LLaVA's hf_to_vllm_mapper renames checkpoint module names to vLLM's; the config learns the
    vLLM names through the public API, keeps the checkpoint names, and is idempotent."""
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    profile = fmt.LayerProfile(block_size=BLOCK)
    ckpt_names = ["model.language_model.layers.0.self_attn.q_proj",
                  "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"]
    cfg = _sab_config(profile, {m: (64, 64) for m in ckpt_names})
    mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper
    cfg.apply_vllm_mapper(_PublicMapper(mapper))
    want = {m: profile.key for m in ckpt_names} | {mapper.apply_list([m])[0]: profile.key for m in ckpt_names}
    assert "language_model.model.layers.0.self_attn.q_proj" in want  # the mapper really renames
    assert cfg.module_profiles == want
    cfg.apply_vllm_mapper(_PublicMapper(mapper))
    assert cfg.module_profiles == want


@pytest.mark.parametrize("dtype,capability,ok", [
    (torch.bfloat16, 75, False), (torch.bfloat16, 80, True), (torch.bfloat16, None, True),
    (torch.float16, 75, True), (torch.float32, 75, True),
])
def test_bf16_needs_compute_capability_8(dtype, capability, ok):
    from vllm_sab.config import SabConfig
    from vllm_sab.linear_method import check_activation_dtype

    assert SabConfig.get_min_capability() == 75  # what fp16 / fp32 need
    if ok:
        check_activation_dtype(dtype, capability, "m.o_proj")
    else:
        with pytest.raises(ValueError, match=r"m\.o_proj: .*compute capability 8\.0 for bfloat16 .*this GPU has 7\.5.*--dtype float16"):
            check_activation_dtype(dtype, capability, "m.o_proj")


def test_bf16_layer_is_refused_on_a_turing_gpu(fake_tp, monkeypatch):
    """Creating a bf16 sab layer on a (simulated) sm75 GPU fails naming the module; fp16 is created."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    import vllm_sab.linear_method as lm

    fake_tp(0)
    monkeypatch.setattr(lm, "_device_capability", lambda: 75)
    prefix = "model.layers.0.mlp.down_proj"
    cfg = _sab_config(fmt.LayerProfile(block_size=BLOCK), {prefix: (64, 2 * BLOCK)})
    with pytest.raises(ValueError, match=r"down_proj: sab's Triton kernel needs compute capability 8\.0"):
        RowParallelLinear(2 * BLOCK, 64, bias=False, quant_config=cfg, prefix=prefix, params_dtype=torch.bfloat16)
    RowParallelLinear(2 * BLOCK, 64, bias=False, quant_config=cfg, prefix=prefix, params_dtype=torch.float16)


def test_float8_row_scales_are_widened_once_at_load_and_survive_a_reload(fake_tp):
    """An e4m3 row-scale layer allocates a float8 weight_scale, loads it, and after
    process_weights_after_loading holds the same values in float16 (what the kernels read);
    a reload copies the checkpoint's float8 scales into that float16 parameter and is
    accepted; y equals x W_hat^T throughout."""
    import dataclasses

    from vllm.model_executor.layers.linear import RowParallelLinear

    from test_kernels import random_layer

    n, k = 32, 2 * BLOCK
    profile = fmt.LayerProfile(block_size=BLOCK, zone_bits=1, salient=8, salient_zoned=True, col_scale=True,
                               scale_dtype="float8_e4m3fn")
    tensors = random_layer(profile, n, k, seed=2)
    prefix = "model.layers.0.self_attn.o_proj"
    fake_tp(0, world=1)
    layer = RowParallelLinear(k, n, bias=False, quant_config=_sab_config(profile, {prefix: (n, k)}), prefix=prefix)
    assert layer.weight_scale.dtype == torch.float8_e4m3fn
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    w_hat = fmt.dequantize(tensors, profile)
    for _ in range(2):  # load, then reload
        for name, t in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, t)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.weight_scale.dtype == torch.float16
        assert torch.equal(layer.weight_scale.data, tensors[fmt.SCALE].to(torch.float16))
        assert layer.sab_kernel.startswith("cpu-")
        torch.testing.assert_close(layer.quant_method.apply(layer, x), x @ w_hat.T, rtol=1e-5, atol=1e-5)
    assert dataclasses.replace(profile, scale_dtype="float16") == layer.quant_method.serving_profile
