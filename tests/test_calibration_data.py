"""Calibration data: JSONL / Hugging Face dataset / builtin loaders, and encoding for tiny models."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vllm_sab.calibrate.data import (
    CalibrationDataError,
    CalibrationSample,
    builtin_samples,
    encode,
    load_calibration_data,
    load_hf_dataset,
    load_jsonl,
)
from tiny_models import build_tiny_vlm, tiny_image


def _write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_dir(tmp_path):
    """A folder with ``imgs/a.png``, ``imgs/b.png`` and a corrupt ``imgs/bad.png``."""
    (tmp_path / "imgs").mkdir()
    tiny_image(0).save(tmp_path / "imgs" / "a.png")
    tiny_image(1).save(tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG not really a png" * 8)
    return tmp_path


def _is_image(img, seed):
    return img.mode == "RGB" and img.tobytes() == tiny_image(seed).tobytes()


# --------------------------------------------------------------------------- JSONL


def test_jsonl_text_and_both_conversation_styles(data_dir):
    path = _write_jsonl(
        data_dir / "data.jsonl",
        [
            {"image": "imgs/a.png", "text": "What is shown?", "answer": "Shapes."},
            {"text": "What is 2 plus 2?"},
            "",  # blank lines are ignored
            {"image": "imgs/b.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": "Two circles."},
                {"from": "human", "value": "And the colors?"},
                {"from": "gpt", "value": "Red."},
            ]},
            {"image": "imgs/a.png", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image_url", "image_url": {"url": "x"}}]},
                {"role": "assistant", "content": "A box."},
            ]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    data = load_jsonl(path)
    assert len(data) == 5 and data.skipped == []
    assert [s.source for s in data] == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:4", "data.jsonl:5", "data.jsonl:6"]

    s = data[0]
    assert _is_image(s.image, 0)
    assert s.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "Shapes."},
    ]
    assert data[1].image is None
    assert data[1].messages == [{"role": "user", "content": "What is 2 plus 2?"}]

    s = data[2]  # LLaVA style: placeholder removed, image part first
    assert _is_image(s.image, 1)
    assert s.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
        {"role": "assistant", "content": "Two circles."},
        {"role": "user", "content": "And the colors?"},
        {"role": "assistant", "content": "Red."},
    ]
    s = data[3]  # OpenAI style: image_url part normalized, image first
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
    assert s.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert data[4].image is None and data[4].messages[1] == {"role": "assistant", "content": "Hello"}


def test_jsonl_image_paths_relative_to_jsonl_and_image_root(data_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    rel = _write_jsonl(data_dir / "rel.jsonl", [{"image": "imgs/b.png", "text": "q"}])
    assert _is_image(load_jsonl(rel)[0].image, 1)

    # The JSONL lives elsewhere; its paths are relative to image_root.
    rooted = _write_jsonl(elsewhere / "rooted.jsonl", [{"image": "b.png", "text": "q"}])
    assert _is_image(load_jsonl(rooted, image_root=data_dir / "imgs")[0].image, 1)
    with pytest.raises(CalibrationDataError, match=r"rooted\.jsonl:1: image not found"):
        load_jsonl(rooted)  # relative to the JSONL's folder: not there
    # Absolute paths are used as they are.
    absolute = _write_jsonl(elsewhere / "abs.jsonl", [{"image": str(data_dir / "imgs" / "a.png"), "text": "q"}])
    assert _is_image(load_jsonl(absolute, image_root="/nonexistent")[0].image, 0)


def test_jsonl_missing_image_names_file_and_line(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"image": "imgs/a.png", "text": "q"}, {"image": "imgs/nope.png", "text": "q"}])
    with pytest.raises(CalibrationDataError, match=r"d\.jsonl:2: image not found: .*nope\.png"):
        load_jsonl(path)


def test_jsonl_corrupt_image_names_file_and_line(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"text": "q"}, {"text": "q"}, {"image": "imgs/bad.png", "text": "q"}])
    with pytest.raises(CalibrationDataError, match=r"d\.jsonl:3: cannot read image .*bad\.png"):
        load_jsonl(path)


def test_jsonl_malformed_line_names_line(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"text": "q"}, '{"text": "unterminated', {"text": "q"}])
    with pytest.raises(CalibrationDataError, match=r"d\.jsonl:2: not valid JSON"):
        load_jsonl(path)
    other = _write_jsonl(data_dir / "e.jsonl", [{"text": "q"}, {"caption": "no text key"}])
    with pytest.raises(CalibrationDataError, match=r"e\.jsonl:2: needs 'text', 'conversations' or 'messages'"):
        load_jsonl(other)
    # An <image> marker without an image.
    third = _write_jsonl(data_dir / "f.jsonl", [{"conversations": [{"from": "human", "value": "<image>\nhi"}]}])
    with pytest.raises(CalibrationDataError, match=r"f\.jsonl:1: .*refers to an image"):
        load_jsonl(third)
    assert issubclass(CalibrationDataError, ValueError)


def test_skip_bad_samples_skips_and_counts(data_dir, caplog):
    path = _write_jsonl(
        data_dir / "d.jsonl",
        [
            {"image": "imgs/a.png", "text": "good 1"},
            {"image": "imgs/missing.png", "text": "bad"},
            {"image": "imgs/bad.png", "text": "bad"},
            "{not json",
            {"text": "good 2"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="vllm_sab.calibrate.data"):
        data = load_jsonl(path, skip_bad_samples=True)
    assert [s.source for s in data] == ["d.jsonl:1", "d.jsonl:5"]
    assert len(data.skipped) == 3
    assert [m.split(":")[1] for m in data.skipped] == ["2", "3", "4"]
    assert any("skipped 3 bad sample" in r.getMessage() for r in caplog.records)

    # Drawing num_samples replaces skipped samples with good ones.
    drawn = load_calibration_data(path, num_samples=2, seed=0, skip_bad_samples=True)
    assert sorted(s.source for s in drawn) == ["d.jsonl:1", "d.jsonl:5"]
    # Nothing usable at all is an error even when skipping.
    only_bad = _write_jsonl(data_dir / "bad.jsonl", ["{", {"image": "imgs/bad.png", "text": "q"}])
    with pytest.raises(CalibrationDataError, match="no usable calibration samples"):
        load_jsonl(only_bad, skip_bad_samples=True)


def test_num_samples_subsampling_is_deterministic(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"text": f"question {i}"} for i in range(30)])

    def pick(seed, n=6):
        return [s.source for s in load_calibration_data(str(path), num_samples=n, seed=seed)]

    a = pick(7)
    assert a == pick(7)
    assert len(a) == 6 and len(set(a)) == 6
    assert a != pick(8)
    assert a != [f"d.jsonl:{i}" for i in range(1, 7)]  # shuffled, not the first lines
    # Asking for more than there is gives everything once.
    assert sorted(pick(7, n=100), key=lambda s: int(s.split(":")[1])) == [f"d.jsonl:{i}" for i in range(1, 31)]
    with pytest.raises(ValueError):
        pick(7, n=0)


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_from_disk(tmp_path):
    import datasets  # a test dependency (pyproject [test])
    images = [tiny_image(i) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {
            "image": images[:3] + [None],
            "question": [f"What is in picture {i}?" for i in range(4)],
            "answer": [f"shapes {i}" for i in range(4)],
            "id": list(range(4)),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "id": datasets.Value("int64"),
            }
        ),
    )
    folder = tmp_path / "saved"
    ds.save_to_disk(str(folder))

    data = load_hf_dataset(folder)  # text column auto-detected ("question"), answer column too
    assert len(data) == 4
    assert data[0].source.endswith("[train]:0")
    assert _is_image(data[2].image, 2)
    assert data[0].messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in picture 0?"}]},
        {"role": "assistant", "content": "shapes 0"},
    ]
    assert data[3].image is None and data[3].messages[0] == {"role": "user", "content": "What is in picture 3?"}

    # Through the dispatcher, subsampled deterministically.
    a = load_calibration_data(str(folder), num_samples=2, seed=1)
    b = load_calibration_data(str(folder), num_samples=2, seed=1)
    assert len(a) == 2 and [s.source for s in a] == [s.source for s in b]

    # A DatasetDict on disk: the split is chosen.
    dd_folder = tmp_path / "saved_dict"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(dd_folder))
    assert len(load_hf_dataset(dd_folder, split="validation")) == 4
    with pytest.raises(CalibrationDataError, match="no split 'train'; splits: validation"):
        load_hf_dataset(dd_folder)

    # No recognizable text column: the error lists the columns.
    no_text = datasets.Dataset.from_dict({"image": images[:1], "label": [3]})
    no_text.save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(CalibrationDataError, match=r"no text column found .*available columns: image, label"):
        load_hf_dataset(tmp_path / "no_text")
    with pytest.raises(CalibrationDataError, match=r"no image column 'picture'.*available columns: image, question"):
        load_hf_dataset(folder, image_column="picture")
    assert load_hf_dataset(folder, image_column=None)[0].image is None


# --------------------------------------------------------------------------- builtin


def _fingerprint(data):
    return [(s.source, json.dumps(s.messages), s.image.tobytes() if s.image is not None else None) for s in data]


def test_builtin_is_deterministic_and_mixes_image_and_text():
    a = builtin_samples(24, seed=0)
    assert _fingerprint(a) == _fingerprint(builtin_samples(24, seed=0))
    assert [s.source for s in a] != [s.source for s in builtin_samples(24, seed=1)]
    with_image = [s for s in a if s.image is not None]
    text_only = [s for s in a if s.image is None]
    assert with_image and text_only
    for s in with_image:
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert s.messages[0]["content"][1] == {"type": "image"}  # after the question, as at inference
    for s in a:
        assert [m["role"] for m in s.messages] == ["user", "assistant"]
        assert isinstance(s.messages[1]["content"], str) and s.messages[1]["content"]
    # The built-in data is a choice, never a default: the dispatcher refuses no spec.
    with pytest.raises(CalibrationDataError, match="no calibration data given.*--data builtin"):
        load_calibration_data(None, num_samples=5, seed=3)


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(arch) -> (processor, model, config)`` for llava and qwen2_vl, built once per module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache = {}

    def _get(arch):
        if arch not in cache:
            folder = build_tiny_vlm(arch, tmp_path_factory.mktemp(arch))
            model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32).eval()
            cache[arch] = (AutoProcessor.from_pretrained(str(folder)), model, model.config)
        return cache[arch]

    return _get


def _expected_visual_tokens(arch, config, enc):
    if arch == "llava":  # CLIP patches, CLS dropped ("default" feature selection)
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2
    merge = config.vision_config.spatial_merge_size
    return int(enc.inputs["image_grid_thw"].prod()) // merge**2


def _forward(model, enc):
    with torch.no_grad():
        logits = model(**enc.inputs).logits
    assert logits.shape[:2] == enc.input_ids.shape


IMAGE_SAMPLE = CalibrationSample(
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": "The circle is red and the square is blue. " * 8},
    ],
    tiny_image(3),
    "test:image",
)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_encode_image_sample(tiny, arch):
    processor, model, config = tiny(arch)
    enc = encode(processor, IMAGE_SAMPLE, max_seq_len=1024)
    ids = enc.input_ids
    assert ids.shape[0] == 1 and enc.visual_mask.shape == (ids.shape[1],) and enc.visual_mask.dtype == torch.bool
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>" if arch == "llava" else "<|image_pad|>")
    assert enc.num_visual_tokens == int((ids == image_token).sum())
    assert enc.num_visual_tokens == _expected_visual_tokens(arch, config, enc) > 0
    assert torch.equal(enc.visual_mask, ids[0] == config.image_token_id)
    assert "pixel_values" in enc.inputs and enc.truncated == 0
    assert enc.inputs["attention_mask"].shape == ids.shape and bool(enc.inputs["attention_mask"].all())
    if arch == "llava":  # the tokenizer's BOS, once
        assert ids[0, 0] == processor.tokenizer.bos_token_id and ids[0, 1] != processor.tokenizer.bos_token_id
    _forward(model, enc)  # the model accepts it: as many image features as image tokens


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_encode_text_only_sample(tiny, arch):
    processor, model, _ = tiny(arch)
    sample = next(s for s in builtin_samples(30, seed=0) if s.image is None)
    enc = encode(processor, sample, max_seq_len=512)
    assert enc.num_visual_tokens == 0 and not enc.visual_mask.any()
    assert "pixel_values" not in enc.inputs and "image_grid_thw" not in enc.inputs
    # The answer is in the encoded text (assistant turn, no generation prompt after it).
    text = processor.tokenizer.decode(enc.input_ids[0])
    assert sample.messages[1]["content"] in text
    _forward(model, enc)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_encode_truncation_keeps_image_tokens(tiny, arch):
    processor, model, _ = tiny(arch)
    full = encode(processor, IMAGE_SAMPLE, max_seq_len=4096)
    last_image = int(full.visual_mask.nonzero()[-1]) + 1
    max_len = last_image + 3
    assert full.input_ids.shape[1] > max_len  # the long answer must be cut
    enc = encode(processor, IMAGE_SAMPLE, max_seq_len=max_len)
    assert enc.input_ids.shape[1] == max_len
    assert enc.truncated == full.input_ids.shape[1] - max_len
    assert enc.num_visual_tokens == full.num_visual_tokens
    assert torch.equal(enc.input_ids[0], full.input_ids[0, :max_len])
    for key, value in enc.inputs.items():
        if key not in ("pixel_values", "image_grid_thw"):
            assert value.shape == enc.input_ids.shape, key
    assert torch.equal(enc.inputs["pixel_values"], full.inputs["pixel_values"])
    _forward(model, enc)

    # Exactly up to the last image token still fits; one less would cut the image.
    assert encode(processor, IMAGE_SAMPLE, max_seq_len=last_image).num_visual_tokens == full.num_visual_tokens
    with pytest.raises(CalibrationDataError, match=rf"test:image: the image takes {full.num_visual_tokens} tokens"):
        encode(processor, IMAGE_SAMPLE, max_seq_len=last_image - 1)


def test_builtin_prompts_are_the_evaluation_prompts(tiny):
    """Calibration sees ShapesQA questions exactly as the model is asked them (question, then image)."""
    from vllm_sab.demo import shapesqa
    from vllm_sab.demo.evaluate import chat_prompt

    processor, _, _ = tiny("llava")
    data = builtin_samples(12, seed=3)
    assert any(s.image is not None for s in data) and any(s.image is None for s in data)
    for s in data:
        index = int(s.source.rsplit(":", 1)[1])
        original = shapesqa.make_sample(shapesqa.TRAIN_SEED, index)
        rendered = processor.apply_chat_template(s.messages[:1], add_generation_prompt=True, tokenize=False)
        assert rendered == chat_prompt(processor, original)
        if s.image is not None:
            assert rendered.index(original.question) < rendered.index("<image>")
        assert s.messages[1] == {"role": "assistant", "content": original.answer}
