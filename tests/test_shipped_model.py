"""The shipped small VLM (models/shapes-llava): it loads, answers, and vLLM agrees with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_sab.demo import shapesqa
from vllm_sab.demo.evaluate import evaluate

MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-llava"


def test_shipped_model_is_small_and_answers_heldout_questions():
    """Under 30 MB; on the 900 held-out questions of its model card: >= 85 % overall (the
    issue's bar) and every question type far above its chance level."""
    size = sum(f.stat().st_size for f in MODEL.iterdir())
    assert size < 30e6
    res = evaluate(MODEL, engines=("transformers",), num_samples=900)
    scores = res["engines"]["transformers"]["scores"]
    assert scores["overall"]["accuracy"] >= 0.85
    for t in shapesqa.QUESTION_TYPES:
        assert scores[t]["accuracy"] >= 0.9, (t, scores[t])
        assert scores[t]["accuracy"] > res["chance"][t] + 0.3, (t, scores[t], res["chance"][t])


@pytest.mark.vllm
def test_vllm_answers_equal_transformers_on_the_shipped_model():
    res = evaluate(MODEL, engines=("transformers", "vllm"), num_samples=72)
    assert res["disagreements"] == 0


@pytest.mark.vllm
def test_openai_style_chat_renders_the_trained_prompt_and_answers(make_llm):
    """An OpenAI-style chat turn (text part, then image_url part, as the model card says to
    send) reaches the model as the prompt it was trained on, and gets the right answers."""
    import base64
    import io

    from transformers import AutoProcessor
    from vllm import SamplingParams

    from vllm_sab.demo.evaluate import chat_prompt

    def data_url(img) -> str:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    samples = [s for s in shapesqa.samples(shapesqa.HELDOUT_SEED, 36, balanced=True) if s.image is not None]
    conversations = [[{"role": "user", "content": [
        {"type": "text", "text": s.question},
        {"type": "image_url", "image_url": {"url": data_url(s.image)}},
    ]}] for s in samples]
    outs = make_llm(MODEL).chat(conversations, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    processor = AutoProcessor.from_pretrained(MODEL)
    assert [o.prompt for o in outs] == [chat_prompt(processor, s) for s in samples]
    right = sum(shapesqa.normalize_answer(o.outputs[0].text) == shapesqa.normalize_answer(s.answer)
                for o, s in zip(outs, samples))
    assert right >= 0.9 * len(samples), (right, len(samples))
