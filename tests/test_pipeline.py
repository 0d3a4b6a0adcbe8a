"""The calibration pipeline: determinism, resume, ATV pool, reports, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_sab.calibrate import calibrate
from vllm_sab.calibrate.methods import ARBRCMethod
from vllm_sab.calibrate.resume import ResumeError

_FAST = dict(data="builtin", num_samples=4, max_seq_len=192, progress=False)


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
    """The report's per-layer numbers agree with the written checkpoint and the source weights,
    recomputed here from the files: bytes on disk per weight, the salient share of the stored
    residual plane, the weight error of the dequantized tensors. The token pool reaches the
    Hessians: ATV with alpha 0 keeps no visual token, so it is the text-only pool exactly, and
    both differ from the all-token pool. (At alpha 1 this tiny model's few image tokens are all
    kept, which is the all-token pool.)"""
    from vllm_sab import format as fmt

    src = tiny_vlm("qwen2_vl")
    ckpt = calibrate(src, tmp_path / "o", method="billm", token_pool="atv", atv_alpha=0.0, **_FAST)
    report = json.loads((ckpt / "sab_report.json").read_text())
    assert report["calibration"]["token_pool"] == "atv"
    stored, original = _tensors(ckpt), load_file(str(next(src.glob("*.safetensors"))))
    qc = fmt.load_quantization_config(ckpt)
    assert sorted(r["name"] for r in report["layers"]) == sorted(qc.modules)
    for layer in report["layers"]:
        name, (n, k) = layer["name"], layer["shape"]
        mine = {key.rsplit(".", 1)[1]: t for key, t in stored.items() if key.rsplit(".", 1)[0] == name}
        assert "weight" not in mine and fmt.PACKED in mine
        mine.pop("bias", None)  # Qwen's q/k/v biases stay dense and are not the quantized weight's bits
        disk_bits = 8 * sum(t.numel() * t.element_size() for t in mine.values())
        assert layer["true_bits_per_weight"] == pytest.approx(disk_bits / (n * k))
        salient = qc.profile_of(name).salient
        assert layer["paper_weight_bits"] == pytest.approx(1 + salient / qc.profile_of(name).block_size)
        assert 0 < salient and mine[fmt.RESIDUAL].shape[:2] == (n, k // 128)  # billm stores a residual plane
        w = original[f"{name}.weight"].float()
        w_hat = fmt.dequantize(mine, qc.profile_of(name))
        assert layer["rel_error"] == pytest.approx(float((w - w_hat).norm() / w.norm()), rel=1e-5)
        assert 0 < layer["output_rel_error"] < 1

    def output_errors(pool):
        run = calibrate(src, tmp_path / pool, method="billm", token_pool=pool, **_FAST)
        return {r["name"]: r["output_rel_error"] for r in json.loads((run / "sab_report.json").read_text())["layers"]}

    atv0 = {r["name"]: r["output_rel_error"] for r in report["layers"]}
    assert output_errors("text") == atv0
    every = output_errors("all")
    assert all(every[name] != err for name, err in atv0.items())


@pytest.mark.parametrize("method,pool,same_as,not_as", [("atv-prune", "atv", "text", "all"), ("billm", "all", "all", "text")])
def test_token_pool_defaults_to_the_methods_own(tiny_vlm, tmp_path, method, pool, same_as, not_as):
    """atv-prune without --token-pool is ATV-Pruning (the ATV pool), not Wanda; the binarizers use every token.

    Told apart by the written tensors: with atv_alpha 0 the ATV pool keeps no visual token, so a
    run with the ATV pool equals a text-pool run, and the all-token pool differs from both."""
    model = tiny_vlm("llava")
    ckpt = calibrate(model, tmp_path / "default", method=method, atv_alpha=0.0, **_FAST)
    assert json.loads((ckpt / "sab_report.json").read_text())["calibration"]["token_pool"] == pool
    got = _tensors(ckpt)
    same = _tensors(calibrate(model, tmp_path / same_as, method=method, token_pool=same_as, **_FAST))
    other = _tensors(calibrate(model, tmp_path / not_as, method=method, token_pool=not_as, **_FAST))
    assert got.keys() == same.keys() == other.keys()
    assert all(torch.equal(got[k], same[k]) for k in got)
    assert not all(torch.equal(got[k], other[k]) for k in got)


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
    from tiny_models import save_vlm
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


def _shift_hessians(monkeypatch, fraction):
    """Make every layer's compensation Hessian indefinite: shift it by ``-t I`` so that its smallest
    eigenvalue is ``-fraction * mean(diag)`` of the shifted matrix. Cholesky of ``H + d mean(diag) I``
    then succeeds only for ``d > fraction``. Returns the list of shifted Hessians."""
    import vllm_sab.calibrate.pipeline as pipeline

    real = pipeline.collect_stats
    shifted = []

    def collect(*args, **kwargs):
        stats = real(*args, **kwargs)
        for st in stats.values():
            h = st.hessian.double()
            lam0, m = float(torch.linalg.eigvalsh(h)[0]), float(torch.diagonal(h).mean())
            t = (lam0 + fraction * m) / (1 + fraction)
            st.hessian = (h - t * torch.eye(h.shape[0], dtype=h.dtype)).float()
            shifted.append(st.hessian)
        return stats

    monkeypatch.setattr(pipeline, "collect_stats", collect)
    return shifted


def test_report_gives_the_damping_used_after_retries(tiny_vlm, tmp_path, monkeypatch):
    """Hessians that need 50x the nominal 1 % damping: the report gives 1.0 (two retries), per layer."""
    model = tiny_vlm("llava")
    plain = json.loads((calibrate(model, tmp_path / "a", method="billm", **_FAST) / "sab_report.json").read_text())
    assert {r["percdamp"] for r in plain["layers"]} == {0.01}

    shifted = _shift_hessians(monkeypatch, 0.5)
    report = json.loads((calibrate(model, tmp_path / "b", method="billm", **_FAST) / "sab_report.json").read_text())
    # Independent check of what the damping must be: 0.1 is not enough, 1.0 is.
    for h in shifted:
        h = h.double()
        eye, m = torch.eye(h.shape[0], dtype=h.dtype), torch.diagonal(h).mean()
        assert int(torch.linalg.cholesky_ex(h + 0.1 * m * eye).info) != 0
        assert int(torch.linalg.cholesky_ex(h + 1.0 * m * eye).info) == 0
    assert len(report["layers"]) == 14
    assert all(r["percdamp"] == pytest.approx(1.0) for r in report["layers"])


def test_method_hessian_error_names_the_layer_and_cli_exits_2(tiny_vlm, tmp_path, monkeypatch, capsys):
    """A Hessian no damping retry can fix: the error names the layer (fused group) and the real
    option that raises the damping; sab-calibrate prints that one line and exits 2."""
    from vllm_sab.calibrate.cli import build_parser, main as cli_main
    from vllm_sab.calibrate.methods.hessian import HessianError

    _shift_hessians(monkeypatch, 1e4)
    pattern = (r"^model\.language_model\.layers\.0\.self_attn\.q_proj \(fused with k_proj, v_proj\): "
               r"billm compensation: the Hessian is not positive definite.*--option percdamp=VALUE")
    with pytest.raises(HessianError, match=pattern):
        calibrate(tiny_vlm("llava"), tmp_path / "o", method="billm", **_FAST)
    args = ["--model", str(tiny_vlm("llava")), "--output", str(tmp_path / "cli"), "--method", "billm",
            "--data", "builtin", "--num-samples", "4", "--max-seq-len", "192", "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sab-calibrate:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("sab-calibrate: error: model.language_model.layers.0.self_attn.q_proj")
    assert "--percdamp" not in " ".join(build_parser().format_help().split()).replace("percdamp=", "")
    build_parser().parse_args(["--model", "m", "--output", "o", "--option", "percdamp=0.1"])  # the named option parses


def _jsonl(folder, colors):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    lines = []
    for i, color in enumerate(colors):
        Image.new("RGB", (40, 40), color).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": "What color is it?", "answer": "red"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_resume_refuses_other_data_and_other_data_settings(tiny_vlm, tmp_path, monkeypatch):
    """The partial run's settings cover what the calibration saw: the same file name with other
    images is refused (data fingerprint), so is another skip_bad_samples or image_root."""
    model = tiny_vlm("llava")
    data = _jsonl(tmp_path / "d", [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)])
    calls = []
    original = ARBRCMethod.quantize

    def dies_in_layer_1(self, weight, stats=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return original(self, weight, stats)

    monkeypatch.setattr(ARBRCMethod, "quantize", dies_in_layer_1)
    run = {**_FAST, "method": "arb-rc", "data": str(data)}
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, tmp_path / "o", **run)
    monkeypatch.setattr(ARBRCMethod, "quantize", original)
    settings = json.loads((tmp_path / "o.partial" / "settings.json").read_text())
    assert settings["vllm_sab_version"] == __import__("vllm_sab").__version__
    assert len(settings["data_fingerprint"]) == 64

    with pytest.raises(ResumeError, match="skip_bad_samples"):
        calibrate(model, tmp_path / "o", resume=True, skip_bad_samples=True, **run)
    with pytest.raises(ResumeError, match="image_root"):
        calibrate(model, tmp_path / "o", resume=True, image_root=str(tmp_path / "d"), **run)
    _jsonl(tmp_path / "d", [(200, 30, 30), (30, 200, 30), (30, 30, 200), (250, 250, 0)])  # one image changed
    with pytest.raises(ResumeError, match=r"data_fingerprint; the calibration samples .* are not the ones"):
        calibrate(model, tmp_path / "o", resume=True, **run)
    assert (tmp_path / "o.partial").is_dir() and not (tmp_path / "o").exists()


def test_tied_embeddings_are_saved_under_the_input_embedding_name(tmp_path):
    """A model with tied embeddings (SmolLM2, Qwen2-VL-2B): the checkpoint stores the one
    tensor as embed_tokens (what transformers and vLLM load), not as lm_head.weight, and
    the dequantized model's logits equal the full-precision model's for the sign method's
    unquantized parts (embedding and head are never quantized)."""
    from tiny_models import _init_weights, build_tiny_tokenizer, llava_parts, save_vlm

    from vllm_sab.calibrate.reference_model import load_dequantized
    from vllm_sab.format import read_safetensors_headers

    tok = build_tiny_tokenizer("llava")
    cls, config, processor = llava_parts(tok, text={"tie_word_embeddings": True})
    config.tie_word_embeddings = True
    model = cls(config)
    _init_weights(model, 3)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    src = save_vlm(model.eval(), tmp_path / "tied", arch="llava", processor=processor)
    ckpt = calibrate(src, tmp_path / "sab", method="sign", progress=False)
    names = read_safetensors_headers(ckpt)
    assert "model.language_model.embed_tokens.weight" in names and "lm_head.weight" not in names
    deq = load_dequantized(ckpt, torch.float32)
    assert torch.equal(deq.lm_head.weight, deq.get_input_embeddings().weight)
    assert torch.equal(deq.get_input_embeddings().weight, model.get_input_embeddings().weight.float())
