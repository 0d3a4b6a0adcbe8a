"""The calibration pipeline: determinism, resume, ATV pool, reports, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_sab.calibrate import calibrate
from vllm_sab.calibrate.methods import ARBRCMethod
from vllm_sab.calibrate.resume import ResumeError

_FAST = dict(num_samples=4, max_seq_len=192, progress=False)


def _tensors(ckpt):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_same_seed_same_checkpoint_and_resume_skips_finished_layers(tiny_vlm, tmp_path, monkeypatch):
    """Two runs with one seed write identical tensors; a run killed in layer 1 resumes without redoing layer 0."""
    model = tiny_vlm("llava")
    first = calibrate(model, tmp_path / "a", method="arb-rc", **_FAST)
    second = calibrate(model, tmp_path / "b", method="arb-rc", **_FAST)
    ta, tb = _tensors(first), _tensors(second)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    calls = []
    original = ARBRCMethod.quantize

    def dies_in_layer_1(self, weight, stats=None):
        calls.append(weight.shape)
        if len(calls) == 5:  # layer 0 has 4 groups (qkv, o, gate_up, down)
            raise KeyboardInterrupt("killed")
        return original(self, weight, stats)

    monkeypatch.setattr(ARBRCMethod, "quantize", dies_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, tmp_path / "c", method="arb-rc", **_FAST)
    assert (tmp_path / "c.partial").is_dir() and not (tmp_path / "c").exists()
    with pytest.raises(ResumeError, match="seed"):
        calibrate(model, tmp_path / "c", method="arb-rc", resume=True, **{**_FAST, "progress": False}, seed=1)
    # The settings check ran before any layer work; the partial folder is intact.
    calls.clear()
    monkeypatch.setattr(ARBRCMethod, "quantize", lambda self, w, s=None: (calls.append(w.shape), original(self, w, s))[1])
    resumed = calibrate(model, tmp_path / "c", method="arb-rc", resume=True, **_FAST)
    assert len(calls) == 4  # only layer 1's groups
    assert not (tmp_path / "c.partial").exists()
    tc = _tensors(resumed)
    assert all(torch.equal(ta[k], tc[k]) for k in ta)


def test_atv_token_pool_and_report(tiny_vlm, tmp_path):
    ckpt = calibrate(tiny_vlm("qwen2_vl"), tmp_path / "o", method="billm", token_pool="atv", **_FAST)
    report = json.loads((ckpt / "sab_report.json").read_text())
    assert report["calibration"] == {"data": "builtin", "samples": 4, "token_pool": "atv"}
    for layer in report["layers"]:
        assert layer["true_bits_per_weight"] > layer["paper_weight_bits"] >= 1.0
        assert 0 <= layer["output_rel_error"] < 1


@pytest.mark.parametrize("method,pool", [("atv-prune", "atv"), ("billm", "all")])
def test_token_pool_defaults_to_the_methods_own(tiny_vlm, tmp_path, method, pool):
    """atv-prune without --token-pool is ATV-Pruning (the ATV pool), not Wanda; the binarizers use every token."""
    ckpt = calibrate(tiny_vlm("llava"), tmp_path / "o", method=method, **_FAST)
    assert json.loads((ckpt / "sab_report.json").read_text())["calibration"]["token_pool"] == pool


def test_unknown_method_option_is_refused_before_any_work(tiny_vlm, tmp_path):
    with pytest.raises(ValueError, match="has no option"):
        calibrate(tiny_vlm("llava"), tmp_path / "o", method="billm", method_options={"nope": 1}, **_FAST)
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_names_the_layer(tiny_vlm, tmp_path):
    from transformers import AutoModelForImageTextToText

    src = tiny_vlm("llava")
    model = AutoModelForImageTextToText.from_pretrained(str(src))
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    from vllm_sab.testing import save_vlm
    from transformers import AutoProcessor

    bad = save_vlm(model, tmp_path / "bad", arch="llava", processor=AutoProcessor.from_pretrained(str(src)))
    with pytest.raises(FloatingPointError, match=r"layers\.1"):
        calibrate(bad, tmp_path / "o", method="billm", **_FAST)
    assert not (tmp_path / "o").exists()


def test_dequantized_reference_keeps_the_checkpoints_stop_tokens(tiny_vlm, tmp_path):
    """The transformers reference of a sab checkpoint stops where vLLM does: it carries the
    folder's generation_config (the tiny Qwen2.5-VL stops on two ids, [2, 0])."""
    from vllm_sab.calibrate.reference_model import load_dequantized

    ckpt = calibrate(tiny_vlm("qwen2_5_vl"), tmp_path / "o", method="sign", progress=False)
    want = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(want, list) and len(want) == 2
    assert load_dequantized(ckpt, torch.float32).generation_config.eos_token_id == want


def _copying_layer_moves(monkeypatch):
    """Make every ``LlamaDecoderLayer.to(...)`` give its parameters new storage, as a CPU -> CUDA
    move does (``param.data`` is replaced), so a tensor taken before the move goes stale."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def copying_to(self, *args, **kwargs):
        return self._apply(lambda t: t.clone())

    monkeypatch.setattr(LlamaDecoderLayer, "to", copying_to)


def test_pruned_weights_reach_the_checkpoint_when_layer_moves_copy(tiny_vlm, tmp_path, monkeypatch):
    """atv-prune's dense results are saved (and resumed) even when moving a layer to the compute
    device copies its tensors; the checkpoint equals the one of a run whose moves do not copy."""
    from vllm_sab.calibrate.methods import ATVPruneMethod

    model = tiny_vlm("llava")
    plain = _tensors(calibrate(model, tmp_path / "plain", method="atv-prune", **_FAST))

    _copying_layer_moves(monkeypatch)
    ckpt = calibrate(model, tmp_path / "moved", method="atv-prune", **_FAST)
    moved = _tensors(ckpt)
    original = load_file(str(next(model.glob("*.safetensors"))))
    report = json.loads((ckpt / "sab_report.json").read_text())
    assert len(report["layers"]) == 14  # 2 decoder layers x 7 linears
    for layer in report["layers"]:
        key = f"{layer['name']}.weight"
        w = moved[key]
        assert layer["sparsity"] > 0.3
        # what the report claims is what was saved: the pruned weight, not the original
        assert float((w == 0).float().mean()) == pytest.approx(layer["sparsity"])
        assert not torch.equal(w, original[key])
    assert moved.keys() == plain.keys()
    assert all(torch.equal(moved[k], plain[k]) for k in plain)

    # Resume with copying moves: layer 0 comes from the partial folder, layer 1 is recomputed.
    calls = []
    orig_quantize = ATVPruneMethod.quantize

    def dies_in_layer_1(self, weight, stats=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return orig_quantize(self, weight, stats)

    monkeypatch.setattr(ATVPruneMethod, "quantize", dies_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, tmp_path / "resumed", method="atv-prune", **_FAST)
    monkeypatch.setattr(ATVPruneMethod, "quantize", orig_quantize)
    resumed = _tensors(calibrate(model, tmp_path / "resumed", method="atv-prune", resume=True, **_FAST))
    assert all(torch.equal(resumed[k], plain[k]) for k in plain)
