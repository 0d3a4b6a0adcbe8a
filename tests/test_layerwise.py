"""The layer-wise machinery against a full-model forward and brute-force statistics."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_sab.calibrate.layerwise import (
    atv_visual_selection,
    capture_layer_inputs,
    collect_stats,
    run_layer,
)
from vllm_sab.calibrate.models import adapter_for
from tiny_models import tiny_image


def _inputs(model_dir):
    """Two samples (image + text, text only) as (processor inputs, visual mask), batch size 1."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(model_dir))
    image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    out = []
    for with_image in (True, False):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": "What is there?"}]
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "A red circle."}]
        text = proc.apply_chat_template(msgs, tokenize=False)
        enc = proc(text=[text], images=[tiny_image(3)] if with_image else None, return_tensors="pt")
        out.append((dict(enc), enc["input_ids"][0] == image_id))
    return out


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def loaded(request, tiny_vlm):
    from vllm_sab.demo.evaluate import load_transformers

    model_dir = tiny_vlm(request.param)
    model = load_transformers(model_dir)
    return request.param, model_dir, model


def test_layer_inputs_equal_full_forward_hidden_states(loaded):
    """With no quantization, capture + run_layer reproduce the model's hidden states layer by layer."""
    arch, model_dir, model = loaded
    adapter = adapter_for(model_dir)
    layers = [layer for _, layer in adapter.layers(model)]
    samples = _inputs(model_dir)
    inputs = capture_layer_inputs(model, layers[0], samples, torch.device("cpu"))
    assert len(inputs) == 2
    assert int(inputs[0].visual_mask.sum()) > 0 and int(inputs[1].visual_mask.sum()) == 0
    with torch.no_grad():
        refs = [model(**s, output_hidden_states=True).hidden_states for s, _ in samples]
    for i, layer in enumerate(layers):
        for inp, ref in zip(inputs, refs):
            torch.testing.assert_close(inp.hidden, ref[i], rtol=1e-5, atol=1e-5)
        inputs = run_layer(layer, inputs, torch.device("cpu"))
    # The last layer's output, through the final norm, is the model's last hidden state.
    norm = model.get_submodule(adapter.decoder_layers.rsplit(".", 1)[0]).norm
    for inp, ref in zip(inputs, refs):
        torch.testing.assert_close(norm(inp.hidden), ref[-1], rtol=1e-5, atol=1e-5)


def test_collect_stats_hessians_equal_brute_force(loaded):
    """H, H_text, H_visual and the per-sample energy moments of q_proj's input, recomputed by hand."""
    arch, model_dir, model = loaded
    adapter = adapter_for(model_dir)
    name, layer = adapter.layers(model)[0]
    samples = _inputs(model_dir)
    inputs = capture_layer_inputs(model, layer, samples, torch.device("cpu"))
    q = layer.self_attn.q_proj
    stats = collect_stats(layer, {"q": q}, inputs, torch.device("cpu"))["q"]
    with torch.no_grad():
        xs = [layer.input_layernorm(inp.hidden)[0].double() for inp in inputs]
    masks = [inp.visual_mask for inp in inputs]
    all_x = torch.cat(xs)
    text_x = torch.cat([x[~m] for x, m in zip(xs, masks)])
    vis_x = torch.cat([x[m] for x, m in zip(xs, masks)])
    torch.testing.assert_close(stats.hessian.double(), 2 * all_x.T @ all_x / len(all_x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.hessian_text.double(), 2 * text_x.T @ text_x / len(text_x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.hessian_visual.double(), 2 * vis_x.T @ vis_x / len(vis_x), rtol=1e-4, atol=1e-5)
    assert (stats.n_tokens, stats.n_text, stats.n_visual, stats.n_samples) == (
        len(all_x), len(text_x), len(vis_x), 2,
    )
    energies = torch.stack([(x * x).mean(0) for x in xs])
    torch.testing.assert_close(stats.sample_energy_sum.double(), energies.sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.sample_energy_sq.double(), (energies**2).sum(0), rtol=1e-4, atol=1e-8)

    text_only = collect_stats(layer, {"q": q}, inputs, torch.device("cpu"), token_pool="text")["q"]
    torch.testing.assert_close(text_only.hessian.double(), 2 * text_x.T @ text_x / len(text_x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool_kind", ["all", "text", "some-visual", "drops-text", "no-visual-tokens"])
def test_stats_accumulator_pool_hessian_equals_its_own_gram(pool_kind):
    """The compensation Hessian, built from the modality Grams, equals the pool's Gram by hand."""
    from vllm_sab.calibrate.layerwise import StatsAccumulator

    gen = torch.Generator().manual_seed(7)
    acc = StatsAccumulator(12, torch.device("cpu"))
    want = torch.zeros(12, 12, dtype=torch.float64)
    n_pool = 0
    for i in range(3):
        x = torch.randn(20 + i, 12, generator=gen)
        vm = torch.zeros(len(x), dtype=torch.bool)
        if pool_kind != "no-visual-tokens":
            vm[3:11] = True
        pool = {
            "all": torch.ones_like(vm),
            "text": ~vm,
            "some-visual": ~vm | (vm & (torch.arange(len(x)) % 3 == 0)),
            "drops-text": vm | (torch.arange(len(x)) > 15),
            "no-visual-tokens": torch.ones_like(vm),
        }[pool_kind]
        acc.add(x, vm, pool)
        xp = x[pool].double()
        want += xp.T @ xp
        n_pool += len(xp)
    stats = acc.finish()
    assert stats.n_tokens == n_pool
    torch.testing.assert_close(stats.hessian.double(), 2 * want / n_pool, rtol=1e-5, atol=1e-6)


def test_atv_selection_matches_brute_force():
    """All text tokens plus the round(min(1, alpha * mean drift) * n_text) visual tokens of largest drift."""
    gen = torch.Generator().manual_seed(0)
    L, D = 40, 16
    x_in = torch.randn(L, D, generator=gen)
    x_out = x_in + torch.randn(L, D, generator=gen) * torch.linspace(0.1, 3, L)[:, None]
    visual = torch.zeros(L, dtype=torch.bool)
    visual[5:35] = True  # 30 visual, 10 text tokens
    for alpha in (0.3, 1.0, 5.0):
        keep = atv_visual_selection(x_in, x_out, visual, alpha)
        drift = [1 - float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(x_in, x_out)]
        vis = [i for i in range(L) if visual[i]]
        mean_d = sum(drift[i] for i in vis) / len(vis)
        k = min(len(vis), round(min(1.0, alpha * mean_d) * 10))
        want = set(i for i in range(L) if not visual[i]) | set(sorted(vis, key=lambda i: -drift[i])[:k])
        assert set(keep.nonzero().flatten().tolist()) == want
        assert 0 < k <= 10 or math.isclose(alpha * mean_d, 0)


def test_atv_selection_without_visual_tokens_keeps_text():
    x = torch.randn(6, 4)
    keep = atv_visual_selection(x, x * 2, torch.zeros(6, dtype=torch.bool))
    assert keep.all()
