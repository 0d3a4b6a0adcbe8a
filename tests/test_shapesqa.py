"""ShapesQA generator and scoring, and sab-eval's answer/distribution machinery."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_sab.demo import shapesqa


def test_splits_are_deterministic_and_distinct():
    a = shapesqa.samples(shapesqa.TRAIN_SEED, 50)
    b = shapesqa.samples(shapesqa.TRAIN_SEED, 50)
    c = shapesqa.samples(shapesqa.HELDOUT_SEED, 50)
    assert [(s.question, s.answer, s.scene) for s in a] == [(s.question, s.answer, s.scene) for s in b]
    assert [(s.question, s.scene) for s in a] != [(s.question, s.scene) for s in c]
    pairs = [(x.image, y.image) for x, y in zip(a, b) if x.scene is not None]
    assert len(pairs) > 10
    assert all(x.tobytes() == y.tobytes() for x, y in pairs)


def test_answers_follow_from_the_scene():
    """Every visual answer is recomputed from the scene; every text answer from the question."""
    for s in shapesqa.samples(shapesqa.HELDOUT_SEED, 450, balanced=True):
        sc = s.scene
        words = s.question.rstrip("?").replace(",", "").split()
        if s.qtype == "count":
            assert s.answer == str(len(sc.objects))
        elif s.qtype == "color":
            assert s.answer == next(c for sh, c, _ in sc.objects if sh == words[-1])
        elif s.qtype == "shape":
            assert s.answer == next(sh for sh, c, _ in sc.objects if c == words[-2])
        elif s.qtype == "position":
            assert s.answer == shapesqa.QUADRANTS[next(q for sh, c, q in sc.objects if (c, sh) == (words[-2], words[-1]))]
        elif s.qtype == "exists":
            present = {(c, sh) for sh, c, _ in sc.objects}
            assert s.answer == ("yes" if (words[-2], words[-1]) in present else "no")
        elif s.qtype == "read":
            assert sc.text is not None and s.answer == sc.text
        elif s.qtype == "arithmetic":
            a, op, b = int(words[2]), words[3], int(words[4])
            assert int(s.answer) == (a + b if op == "plus" else a - b)
        elif s.qtype == "compare":
            a, b = int(words[-3]), int(words[-1])  # "Which is larger 5 or 8"
            assert int(s.answer) == (max(a, b) if words[2] == "larger" else min(a, b))
        elif s.qtype == "sequence":
            seq = [int(w) for w in words[3:]]
            assert int(s.answer) == seq[-1] + (seq[1] - seq[0])
        if s.qtype in shapesqa.VISUAL_TYPES:
            assert len({q for *_, q in sc.objects} | ({sc.text_quadrant} if sc.text else set())) == len(sc.objects) + bool(sc.text)


def test_rendered_shapes_have_their_color_at_the_center():
    for s in shapesqa.samples(3, 40, types=("count",)):
        img = s.image
        assert img.size == (shapesqa.IMAGE_SIZE, shapesqa.IMAGE_SIZE)
        half = shapesqa.IMAGE_SIZE // 2
        for (shape, color, q), (dx, dy, _) in zip(s.scene.objects, s.scene.jitter):
            cx, cy = (q % 2) * half + half // 2 + dx, (q // 2) * half + half // 2 + dy
            if shape == "triangle":
                cy += 3  # the centroid sits below the box center
            assert img.getpixel((cx, cy)) == shapesqa.COLORS[color], (shape, color)


def test_score_and_chance_against_brute_force():
    refs = shapesqa.samples(shapesqa.HELDOUT_SEED, 90, balanced=True)
    preds = [s.answer.upper() + "." if i % 3 else "wrong" for i, s in enumerate(refs)]
    scores = shapesqa.score(preds, refs)
    for t in shapesqa.QUESTION_TYPES:
        idx = [i for i, s in enumerate(refs) if s.qtype == t]
        assert scores[t]["n"] == len(idx) == 10
        assert scores[t]["accuracy"] == sum(1 for i in idx if i % 3) / len(idx)
    assert scores["overall"]["accuracy"] == sum(1 for i in range(90) if i % 3) / 90
    chance = shapesqa.chance_accuracy(refs)
    for t in shapesqa.QUESTION_TYPES:
        answers = [s.answer for s in refs if s.qtype == t]
        assert chance[t] == max(answers.count(a) for a in set(answers)) / len(answers)
    with pytest.raises(ValueError, match="predictions"):
        shapesqa.score(preds[:-1], refs)


def test_bad_question_type_is_refused():
    with pytest.raises(ValueError, match="unknown question type"):
        shapesqa.make_sample(0, 0, qtype="colour")
    with pytest.raises(ValueError, match="max_shapes"):
        shapesqa.make_scene(__import__("random").Random(0), max_shapes=5)


def test_teacher_forced_positions_are_the_answer_tokens(tiny_vlm):
    """compare_distributions scores exactly the answer tokens and EOS; a model against itself: KL 0, agreement 1."""
    from transformers import AutoProcessor

    from vllm_sab.demo.evaluate import _answer_batch, compare_distributions, load_transformers

    model_dir = tiny_vlm("llava")
    proc = AutoProcessor.from_pretrained(str(model_dir))
    refs = shapesqa.samples(shapesqa.HELDOUT_SEED, 9, balanced=True)
    inputs, scored = _answer_batch(proc, refs)
    tok = proc.tokenizer
    for i, s in enumerate(refs):
        nxt = inputs["input_ids"][i][scored[i].nonzero().flatten() + 1]
        assert nxt.tolist() == tok(" " + s.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    model = load_transformers(model_dir)
    d = compare_distributions(model, model, proc, refs)
    assert d["kl"] == pytest.approx(0.0, abs=1e-6) and d["top1_agreement"] == 1.0
    assert d["positions"] == int(scored.sum())


def test_compare_distributions_against_a_per_sample_loop(tiny_vlm):
    """KL and top-1 agreement of two different models (batched, right-padded, several batches)
    equal a brute-force loop: one unpadded forward per question, the answer positions found by
    tokenizing the prompt alone, KL summed over the vocabulary by hand."""
    import torch
    from transformers import AutoProcessor

    from vllm_sab.demo.evaluate import chat_prompt, compare_distributions, load_transformers

    model_dir = tiny_vlm("llava")
    proc = AutoProcessor.from_pretrained(str(model_dir))
    refs = shapesqa.samples(shapesqa.HELDOUT_SEED, 7, balanced=True)
    reference = load_transformers(model_dir)
    other = load_transformers(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (other.lm_head.weight, other.model.language_model.layers[1].mlp.down_proj.weight):
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    got = compare_distributions(reference, other, proc, refs, batch_size=3)

    kl, agree, count = 0.0, 0, 0
    eos = proc.tokenizer.eos_token
    with torch.no_grad():
        for s in refs:
            prompt = chat_prompt(proc, s)
            images = [s.image] if s.scene is not None else None
            n = proc(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
            full = proc(text=[prompt + " " + s.answer + eos], images=images, return_tensors="pt")
            ids = full["input_ids"][0]
            assert ids[:n].tolist() == proc(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
            lp_all = torch.log_softmax(reference(**full).logits[0].double(), -1)
            lq_all = torch.log_softmax(other(**full).logits[0].double(), -1)
            for t in range(n - 1, len(ids) - 1):  # position t predicts answer/EOS token t + 1
                lp, lq = lp_all[t], lq_all[t]
                kl += sum(float(lp[v].exp() * (lp[v] - lq[v])) for v in range(lp.shape[0]))
                agree += int(int(lp.argmax()) == int(lq.argmax()))
                count += 1
    assert got["positions"] == count
    assert got["kl"] == pytest.approx(kl / count, rel=1e-4) and got["kl"] > 1e-3
    assert got["top1_agreement"] == pytest.approx(agree / count)


@pytest.mark.vllm
def test_sab_eval_engines_agree_on_a_sab_checkpoint(tmp_path, capsys):
    """sab-eval --engine both on a sab checkpoint of the shipped model: transformers (dequantized) and
    vLLM give the same answers. (The trained model, not a random one: random logits have near-ties
    that float rounding may flip.)"""
    from pathlib import Path

    from vllm_sab.calibrate import calibrate
    from vllm_sab.demo.evaluate import main

    model = Path(__file__).resolve().parents[1] / "models" / "shapes-llava"
    ckpt = calibrate(model, tmp_path / "sab", method="sign", progress=False)
    out = tmp_path / "eval.json"
    rc = main(["--model", str(ckpt), "--engine", "both", "--num-samples", "36", "--json", str(out),
               "--reference", str(model)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["disagreements"] == 0
    assert res["answers"]["transformers"] == res["answers"]["vllm"]
    assert res["distribution"]["kl"] > 0
    text = capsys.readouterr().out
    assert "| overall |" in text and "KL" in text


def test_sab_eval_refuses_a_folder_without_config(tmp_path, capsys):
    from vllm_sab.demo.evaluate import main

    assert main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_pixels_from_the_processor_match_training(tmp_path):
    """The training script feeds the processor's pixels; a 64x64 image passes the CLIP resize unchanged."""
    from tiny_models import build_tiny_tokenizer, llava_parts

    tok = build_tiny_tokenizer("llava", vocab_size=300, texts=shapesqa.corpus(200))
    _, _, proc = llava_parts(tok, image_size=64, patch_size=16)
    img = shapesqa.samples(0, 1, types=("count",))[0].image
    px = proc.image_processor([img], return_tensors="pt").pixel_values[0]
    mean = torch.tensor(proc.image_processor.image_mean)[:, None, None]
    std = torch.tensor(proc.image_processor.image_std)[:, None, None]
    raw = torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, 64, 64) / 255
    torch.testing.assert_close(px, (raw - mean) / std, rtol=1e-4, atol=1e-4)
