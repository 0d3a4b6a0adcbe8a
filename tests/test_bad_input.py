"""Bad input gets a clear error naming the problem, and no half-written output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_sab import format as fmt
from vllm_sab.calibrate import OutputExistsError, UnsupportedArchitectureError, calibrate
from vllm_sab.calibrate.cli import main as cli_main
from vllm_sab.calibrate.methods import METHODS, SignMethod

Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sign_ckpt(tmp_path_factory):
    """A valid sign checkpoint of the tiny LLaVA (module-scoped; tests copy it)."""
    from tiny_models import build_tiny_vlm

    root = tmp_path_factory.mktemp("bad-input")
    src = build_tiny_vlm("llava", root / "tiny")
    return calibrate(src, root / "sab", progress=False)


def _broken_copy(src, dst, edit_tensors=None, edit_qc=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        (f,) = list(dst.glob("*.safetensors"))
        tensors = load_file(f)
        edit_tensors(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    if edit_qc:
        cfg = json.loads((dst / "config.json").read_text())
        edit_qc(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _drop(t):
    del t[f"{Q_PROJ}.weight_scale"]


def _reshape(t):
    t[f"{Q_PROJ}.weight_scale"] = torch.zeros(256, 2, 2, dtype=torch.float16)


def _retype(t):
    t[f"{Q_PROJ}.weight_packed"] = t[f"{Q_PROJ}.weight_packed"].to(torch.int64)


def _version(qc):
    qc["format_version"] = 99


def _block(qc):
    # K = 256 is not a multiple of a 96-column block.
    qc["profiles"][next(iter(qc["profiles"]))]["block_size"] = 96


CASES = {
    "missing tensor": (dict(edit_tensors=_drop), r"q_proj.*missing tensor 'weight_scale'"),
    "wrong shape": (dict(edit_tensors=_reshape), r"q_proj\.weight_scale: shape \[256, 2, 2\], expected \[256, 2, 1\]"),
    "wrong dtype": (dict(edit_tensors=_retype), r"q_proj\.weight_packed: dtype I64, expected I32"),
    "unknown format_version": (dict(edit_qc=_version), r"unknown format_version 99"),
    "K not a multiple of the block size": (dict(edit_qc=_block), r"modules\.model\.language_model\.layers\.\d+\.\S+: weight shape \[\d+, \d+\]: K=\d+ must be a positive multiple of block_size=96"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_checkpoint_names_the_problem(sign_ckpt, tmp_path, case):
    """validate_checkpoint rejects each broken checkpoint with a message naming the tensor/option."""
    kwargs, pattern = CASES[case]
    bad = _broken_copy(sign_ckpt, tmp_path / "bad", **kwargs)
    with pytest.raises(fmt.FormatError, match=pattern):
        fmt.validate_checkpoint(bad)


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_refuses_broken_checkpoint(sign_ckpt, tmp_path, make_llm, case):
    """vLLM with the sab plugin refuses each broken checkpoint with the same clear message."""
    kwargs, pattern = CASES[case]
    bad = _broken_copy(sign_ckpt, tmp_path / "bad", **kwargs)
    with pytest.raises(Exception, match=pattern):
        make_llm(bad, quantization="sab")


@pytest.mark.vllm
def test_vllm_loader_refuses_fused_shards_that_disagree(tiny_vlm, tmp_path, make_llm, monkeypatch):
    """Fused q/k/v shards must share their K-indexed tensors; the loader names the tensor otherwise."""
    from test_e2e import AllPartsMethod

    monkeypatch.setitem(METHODS, AllPartsMethod.name, AllPartsMethod)
    good = calibrate(tiny_vlm("llava"), tmp_path / "good", method=AllPartsMethod.name, progress=False)
    k_proj = Q_PROJ.replace("q_proj", "k_proj")

    def flip(t):
        t[f"{k_proj}.weight_col_scale"] = t[f"{k_proj}.weight_col_scale"] * 2

    bad = _broken_copy(good, tmp_path / "bad", edit_tensors=flip)
    fmt.validate_checkpoint(bad)  # headers are fine: only the loader can see this
    with pytest.raises(Exception, match=r"qkv_proj\.weight_col_scale: fused shards store different values"):
        make_llm(bad, quantization="sab")


def test_unsupported_architecture(tmp_path):
    """A model type without an adapter fails before loading weights, naming the type and the supported ones."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'llama'.*supports \['llava', 'qwen2_5_vl', 'qwen2_vl'\]"):
        calibrate(tmp_path / "llama", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_user_errors_with_exit_code_2(tmp_path, capsys, tiny_vlm):
    """sab-calibrate prints one clear line and exits 2 on a user error (existing output)."""
    (tmp_path / "out").mkdir()
    code = cli_main(["--model", str(tiny_vlm("llava")), "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err


def test_block_size_that_does_not_divide_k(tmp_path, tiny_vlm):
    """A block size that does not divide a decoder linear's K is refused, naming the module."""
    with pytest.raises(fmt.FormatError, match=r"layers\.0\.self_attn\.q_proj: K=256 is not a multiple of block_size=96"):
        calibrate(tiny_vlm("llava"), tmp_path / "out", block_size=96, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_calibration_leaves_nothing(tmp_path, tiny_vlm, monkeypatch):
    """A calibration that dies half-way leaves neither the output nor a temporary folder."""
    calls = {"n": 0}
    original = SignMethod.quantize

    def dies_on_third_group(self, weight, stats=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return original(self, weight)

    monkeypatch.setattr(SignMethod, "quantize", dies_on_third_group)
    with pytest.raises(RuntimeError, match="simulated failure"):
        calibrate(tiny_vlm("qwen2_vl"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_previous_output(tmp_path, tiny_vlm, monkeypatch):
    """With --overwrite, a failure during writing keeps the old checkpoint and removes the temporary one."""
    out = calibrate(tiny_vlm("llava"), tmp_path / "out", progress=False)
    before = sorted(p.name for p in out.iterdir())
    import vllm_sab.calibrate.pipeline as pipeline

    def broken_write(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline, "write_checkpoint", broken_write)
    with pytest.raises(OSError, match="disk full"):
        calibrate(tiny_vlm("llava"), out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    # The finished layers stay in out.partial (the --resume state); no temporary folder is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]
    with pytest.raises(OutputExistsError):
        calibrate(tiny_vlm("llava"), out, progress=False)
    monkeypatch.undo()
    calibrate(tiny_vlm("llava"), out, overwrite=True, resume=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_calibration_data_errors_name_file_and_line(tmp_path, capsys, tiny_vlm):
    """A JSONL with a missing image fails with file:line (exit 2); --skip-bad-samples skips it and counts."""
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "red.png", "text": "What color is it?", "answer": "red"}\n'
        '{"image": "missing.png", "text": "What is it?"}\n'
        '{"text": "What is 2 plus 2?", "answer": "4"}\n'
    )
    args = ["--model", str(tiny_vlm("llava")), "--method", "billm", "--data", str(tmp_path / "data.jsonl"),
            "--num-samples", "3", "--no-progress"]
    assert cli_main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:2" in err and "missing.png" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    assert cli_main([*args, "--output", str(tmp_path / "b"), "--skip-bad-samples"]) == 0
    report = json.loads((tmp_path / "b" / "sab_report.json").read_text())
    assert report["calibration"]["samples"] == 2


def test_cli_refuses_bad_method_options(tmp_path, capsys, tiny_vlm):
    base = ["--model", str(tiny_vlm("llava")), "--output", str(tmp_path / "o"), "--no-progress"]
    assert cli_main([*base, "--method", "sab", "--option", "significance=nope"]) == 2
    assert "significance must be one of" in capsys.readouterr().err
    assert cli_main([*base, "--method", "sab", "--option", "nokey"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli_main([*base, "--method", "sign", "--option", "percdamp=0.1"]) == 2
    assert "has no option percdamp" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,message", [
    (["--visual-keep-ratio", "0"], "keep_ratio must be a number in (0, 1]"),
    (["--visual-keep-ratio", "1.5"], "keep_ratio must be a number in (0, 1]"),
    (["--visual-keep-ratio", "0.5", "--reference", "REF"], "cannot be combined with visual-token pruning"),
])
def test_sab_eval_refuses_bad_pruning_options(tiny_vlm, capsys, extra, message):
    from vllm_sab.demo.evaluate import main as eval_main

    model = str(tiny_vlm("llava"))
    extra = [model if a == "REF" else a for a in extra]
    assert eval_main(["--model", model, "--num-samples", "9", *extra]) == 2
    assert message in capsys.readouterr().err


def test_sab_eval_refuses_pruning_a_qwen_model(tiny_vlm, capsys):
    from vllm_sab.demo.evaluate import main as eval_main

    assert eval_main(["--model", str(tiny_vlm("qwen2_vl")), "--num-samples", "9", "--visual-keep-ratio", "0.5"]) == 2
    assert "LLaVA only" in capsys.readouterr().err


O_PROJ = "model.language_model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def all_parts_ckpt(tmp_path_factory):
    """A checkpoint with every optional tensor (permutation, column scales, offsets) of the tiny LLaVA."""
    from test_e2e import AllPartsMethod
    from tiny_models import build_tiny_vlm

    root = tmp_path_factory.mktemp("all-parts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, AllPartsMethod.name, AllPartsMethod)
        return calibrate(build_tiny_vlm("llava", root / "tiny"), root / "sab", method=AllPartsMethod.name,
                         progress=False)


def _perm_out_of_range(t):
    t[f"{O_PROJ}.weight_perm"][3] = 200  # block size 128


def _perm_repeats(t):
    p = t[f"{O_PROJ}.weight_perm"]
    p[128 + 5] = p[128 + 6]  # in range, but block 1 is no longer a permutation


def _nan_scale(t):
    t[f"{O_PROJ}.weight_scale"][7, 1, 0] = float("nan")


def _inf_col_scale(t):
    t[f"{O_PROJ}.weight_col_scale"][0, 9] = float("inf")


def _inf_offset(t):
    t[f"{O_PROJ}.weight_offset"][0, 0, 0] = float("-inf")


VALUE_CASES = {
    "perm value >= block size": (_perm_out_of_range, r"self_attn\.o_proj: weight_perm block 0 is not a permutation of 0\.\.127"),
    "perm repeats a column": (_perm_repeats, r"self_attn\.o_proj: weight_perm block 1 is not a permutation of 0\.\.127"),
    "NaN scale": (_nan_scale, r"self_attn\.o_proj\.weight_scale: contains NaN or Inf"),
    "Inf column scale": (_inf_col_scale, r"self_attn\.o_proj\.weight_col_scale: contains NaN or Inf"),
    "Inf offset": (_inf_offset, r"self_attn\.o_proj\.weight_offset: contains NaN or Inf"),
}


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_vllm_refuses_bad_tensor_values_at_load(all_parts_ckpt, tmp_path, make_llm, case):
    """Values the headers cannot show (a bad in-block permutation, non-finite scales or offsets) are
    refused when vLLM loads the layer, naming the vLLM module and the tensor, before any forward."""
    edit, pattern = VALUE_CASES[case]
    bad = _broken_copy(all_parts_ckpt, tmp_path / "bad", edit_tensors=edit)
    fmt.validate_checkpoint(bad)  # headers are fine: only a value check can see this
    with pytest.raises(Exception, match=r"language_model\.model\.layers\.0\." + pattern):
        make_llm(bad, quantization="sab")


def test_hessian_method_without_data_is_refused_before_any_work(tmp_path, capsys, tiny_vlm):
    """No --data: a method that calibrates on data refuses, naming --data and the builtin choice
    (the synthetic ShapesQA samples are never a silent default); sign needs no data."""
    from vllm_sab.calibrate.data import CalibrationDataError

    model = tiny_vlm("llava")
    with pytest.raises(CalibrationDataError, match=r"method 'billm' calibrates on data; no calibration data given: pass --data"):
        calibrate(model, tmp_path / "o", method="billm", progress=False)
    base = ["--model", str(model), "--no-progress", "--num-samples", "2", "--max-seq-len", "128"]
    assert cli_main([*base, "--output", str(tmp_path / "cli"), "--method", "sab"]) == 2
    assert "or --data builtin for the built-in synthetic ShapesQA samples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli_main([*base, "--output", str(tmp_path / "b"), "--method", "billm", "--data", "builtin"]) == 0
    assert json.loads((tmp_path / "b" / "sab_report.json").read_text())["calibration"]["data"] == "builtin"
    assert cli_main([*base, "--output", str(tmp_path / "s"), "--method", "sign"]) == 0


def test_cli_hugging_face_dataset_split_and_columns(tmp_path, capsys, tiny_vlm):
    """--split / --image-column / --text-column pick a saved dataset's split and columns (names
    the auto-detection would not find); a missing column is one error line naming it, exit 2."""
    import datasets
    from PIL import Image

    rows = {"picture": [Image.new("RGB", (40, 40), (40 * i, 200, 30)) for i in range(3)],
            "query": [f"What color is shape {i}?" for i in range(3)],
            "answer": ["green"] * 3}
    folder = tmp_path / "ds"
    datasets.DatasetDict({"calib": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    base = ["--model", str(tiny_vlm("llava")), "--method", "billm", "--data", str(folder), "--num-samples", "3",
            "--max-seq-len", "192", "--no-progress"]
    ok = [*base, "--split", "calib", "--image-column", "picture", "--text-column", "query"]
    assert cli_main([*ok, "--output", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "sab_report.json").read_text())
    assert report["calibration"]["samples"] == 3
    capsys.readouterr()
    assert cli_main([*base, "--split", "calib", "--image-column", "picture", "--output", str(tmp_path / "x")]) == 2
    assert "query" in capsys.readouterr().err  # no known text column: the message lists the columns
    assert cli_main([*ok[:-2], "--text-column", "nope", "--output", str(tmp_path / "y")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
