"""The shipped small VLM (models/shapes-llava): it loads, answers, and vLLM agrees with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_sab import shapesqa
from vllm_sab.calibrate.evaluate import evaluate

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
