"""Calibration data: image + conversation samples, and their encoding for a model.

A calibration sample is one conversation in the OpenAI / Hugging Face chat
format with at most one image. Sources:

* :func:`builtin_samples`: ShapesQA training-split questions with their answers
  (offline, the default);
* :func:`load_jsonl`: a JSONL file, one sample per line;
* :func:`load_hf_dataset`: a Hugging Face dataset (hub name, data folder, or a
  folder written by ``Dataset.save_to_disk``).

:func:`load_calibration_data` picks the source from a spec string and draws a
deterministic subsample; :func:`encode` turns a sample into the tensors of one
forward pass (batch size 1, no padding) with a mask of the visual tokens.

JSONL format (one object per line; blank lines are ignored)::

    {"image": "imgs/1.png", "text": "What is shown?", "answer": "A cat."}
    {"image": "imgs/2.png", "conversations": [{"from": "human", "value": "<image>\\nDescribe."},
                                              {"from": "gpt", "value": "A dog."}]}
    {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}

``image`` is optional (text-only sample); relative paths are resolved against
``image_root`` or else the JSONL file's folder.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "CalibrationData",
    "CalibrationDataError",
    "CalibrationSample",
    "EncodedSample",
    "builtin_samples",
    "encode",
    "image_token_id",
    "load_calibration_data",
    "load_hf_dataset",
    "load_jsonl",
    "to_messages",
]

logger = logging.getLogger(__name__)

#: Column names tried, in order, when :func:`load_hf_dataset` gets no ``text_column``.
TEXT_COLUMNS: tuple[str, ...] = ("conversations", "messages", "text", "question", "caption", "prompt")
#: Column holding the assistant's reply, used when present (and the text column is not a conversation).
ANSWER_COLUMNS: tuple[str, ...] = ("answer", "response")

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE_PLACEHOLDER = "<image>"


#: Why ``data=None`` is refused (the synthetic samples must be asked for by name).
NO_DATA_MESSAGE = (
    "no calibration data given: pass --data FILE.jsonl or a Hugging Face dataset (data=... from Python), "
    "or --data builtin for the built-in synthetic ShapesQA samples (64-pixel shapes and short questions: "
    "meant for models/shapes-llava and tests, not for a real VLM)"
)


class CalibrationDataError(ValueError):
    """A calibration sample or source that cannot be used; the message names it (e.g. ``data.jsonl:12``)."""


@dataclass
class CalibrationSample:
    """One calibration sample.

    Attributes:
        messages: chat turns ``[{"role": "system"|"user"|"assistant", "content": str | list[part]}]``,
            a part being ``{"type": "image"}`` or ``{"type": "text", "text": str}``; exactly
            one image part when ``image`` is set, none otherwise.
        image: the image (``PIL.Image.Image``, mode RGB), or ``None`` for a text-only sample.
        source: where the sample comes from, for messages (``"data.jsonl:12"``, ``"shapesqa:train:42"``).
    """

    messages: list[dict[str, Any]]
    image: Any = None
    source: str = ""


class CalibrationData(list):
    """A ``list[CalibrationSample]`` that also records the samples skipped as bad.

    Attributes:
        skipped: one message per skipped sample (naming its source and what was wrong);
            ``len(data.skipped)`` is the count. Empty unless ``skip_bad_samples`` was set.
    """

    def __init__(self, samples=(), skipped: Sequence[str] = ()):
        super().__init__(samples)
        self.skipped: list[str] = list(skipped)


# --------------------------------------------------------------------------- conversations


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def to_messages(turns: list, *, has_image: bool, source: str = "") -> list[dict[str, Any]]:
    """Normalize a conversation to the chat format of :class:`CalibrationSample`.

    Args:
        turns: LLaVA style ``[{"from": "human"|"gpt"|"system", "value": str}]`` (an
            ``<image>`` placeholder marks the image) or OpenAI style
            ``[{"role": ..., "content": str | list[part]}]`` (``image`` / ``image_url``
            parts both become ``{"type": "image"}``); styles may not be mixed within a turn.
        has_image: whether the sample has an image. If no turn marks it, an image
            part is put first in the first user turn.
        source: named in error messages.

    Returns:
        The messages; the turn with the image has list content ``[image part, text part]``.

    Raises:
        CalibrationDataError: not a non-empty list of turns, unknown role, no user
            turn, more than one image marker, or an image marker without an image.
    """
    if not isinstance(turns, list) or not turns:
        raise CalibrationDataError(f"{source}: the conversation must be a non-empty list of turns")
    messages, n_images = [], 0
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise CalibrationDataError(f"{source}: turn {k} is not an object")
        if "from" in turn and "value" in turn:  # LLaVA style
            role, content = turn["from"], turn["value"]
        elif "role" in turn and "content" in turn:  # OpenAI style
            role, content = turn["role"], turn["content"]
        else:
            raise CalibrationDataError(
                f"{source}: turn {k} needs 'from'/'value' or 'role'/'content', got keys {sorted(turn)}"
            )
        if role not in _ROLES:
            raise CalibrationDataError(f"{source}: turn {k} has unknown role {role!r}")
        parts, image_here = _parts(content, f"{source}: turn {k}")
        n_images += image_here
        messages.append({"role": _ROLES[role], "content": parts})
    if not any(m["role"] == "user" for m in messages):
        raise CalibrationDataError(f"{source}: the conversation has no user turn")
    if n_images > 1:
        raise CalibrationDataError(f"{source}: {n_images} image markers; one image per sample is supported")
    if n_images and not has_image:
        raise CalibrationDataError(f"{source}: the conversation refers to an image but the sample has none")
    if has_image and not n_images:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"].insert(0, {"type": "image"})
    # Plain string content for text-only turns: what every chat template accepts.
    for m in messages:
        if all(p["type"] == "text" for p in m["content"]):
            m["content"] = " ".join(p["text"] for p in m["content"])
    return messages


def _parts(content, where: str) -> tuple[list[dict], int]:
    """Content -> (text/image parts with the image first, number of images)."""
    if isinstance(content, str):
        n = content.count(_IMAGE_PLACEHOLDER)
        text = content.replace(_IMAGE_PLACEHOLDER, "").strip()
        return ([{"type": "image"}] if n else []) + [_text_part(text)], n
    if not isinstance(content, list):
        raise CalibrationDataError(f"{where}: content must be a string or a list of parts")
    images, texts = 0, []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url", "image_pil"):
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise CalibrationDataError(f"{where}: unsupported content part {part!r}")
    return [{"type": "image"}] * images + [_text_part(" ".join(texts))], images


def _prompt_messages(text, answer, *, has_image: bool, source: str) -> list[dict[str, Any]]:
    """A user turn (image part first) and, with ``answer``, an assistant turn."""
    if not isinstance(text, str):
        raise CalibrationDataError(f"{source}: the prompt text must be a string, got {type(text).__name__}")
    messages = [{"role": "user", "content": text}]
    if answer is not None:
        if not isinstance(answer, str):
            raise CalibrationDataError(f"{source}: the answer must be a string, got {type(answer).__name__}")
        messages.append({"role": "assistant", "content": answer})
    return to_messages(messages, has_image=has_image, source=source)


def _open_image(path: Path, source: str):
    from PIL import Image

    if not path.is_file():
        raise CalibrationDataError(f"{source}: image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CalibrationDataError(f"{source}: cannot read image {path}: {e}") from e


# --------------------------------------------------------------------------- sampling


def _draw(
    count: int,
    build: Callable[[int], CalibrationSample],
    *,
    num_samples: int | None,
    seed: int,
    skip_bad_samples: bool,
    what: str,
) -> CalibrationData:
    """Build samples ``0..count-1`` in order (``num_samples=None``) or in a seeded
    random order until ``num_samples`` are built; bad ones raise or are skipped."""
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    order = list(range(count))
    if num_samples is not None:
        random.Random(seed).shuffle(order)
    wanted = count if num_samples is None else num_samples
    out = CalibrationData()
    for i in order:
        if len(out) == wanted:
            break
        try:
            out.append(build(i))
        except CalibrationDataError as e:
            if not skip_bad_samples:
                raise
            out.skipped.append(str(e))
    if out.skipped:
        logger.warning("%s: skipped %d bad sample(s), e.g. %s", what, len(out.skipped), out.skipped[0])
    if not out:
        raise CalibrationDataError(f"{what}: no usable calibration samples")
    if num_samples is not None and len(out) < num_samples:
        logger.warning("%s: only %d of the %d requested samples are available", what, len(out), num_samples)
    return out


# --------------------------------------------------------------------------- sources


def load_jsonl(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    skip_bad_samples: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Load calibration samples from a JSONL file (format in the module docstring).

    Each line is one JSON object with an optional ``"image"`` (a path) and either
    ``"text"`` (user prompt, with an optional ``"answer"`` as assistant turn) or
    ``"conversations"`` / ``"messages"`` (LLaVA or OpenAI style, see :func:`to_messages`).

    Args:
        path: the JSONL file.
        image_root: folder that relative image paths are relative to; default:
            the JSONL file's folder.
        skip_bad_samples: skip (and count in ``.skipped``) lines that are malformed or
            whose image is missing or unreadable, instead of raising.
        num_samples: draw this many samples in a random order fixed by ``seed``
            (replacing skipped ones); default: every line, in file order. Only the
            lines drawn are parsed and their images opened.
        seed: seed of the draw.

    Returns:
        :class:`CalibrationData` (a ``list[CalibrationSample]``, sources ``"file.jsonl:LINE"``).

    Raises:
        CalibrationDataError: the file does not exist, a drawn line is bad (message:
            ``file.jsonl:LINE: what is wrong``) and ``skip_bad_samples`` is false, or
            no sample is usable.
        ValueError: ``num_samples < 1``.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration data file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]

    def build(i: int) -> CalibrationSample:
        lineno, line = lines[i]
        source = f"{path.name}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{source}: not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise CalibrationDataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        image_ref = record.get("image")
        if isinstance(image_ref, list) and len(image_ref) == 1:
            image_ref = image_ref[0]
        if image_ref is not None and not isinstance(image_ref, str):
            raise CalibrationDataError(f"{source}: 'image' must be one path (a string)")
        image = _open_image(root / image_ref, source) if image_ref else None
        turns = record.get("conversations", record.get("messages"))
        if turns is not None:
            messages = to_messages(turns, has_image=image is not None, source=source)
        elif "text" in record:
            messages = _prompt_messages(record["text"], record.get("answer"), has_image=image is not None, source=source)
        else:
            raise CalibrationDataError(f"{source}: needs 'text', 'conversations' or 'messages'")
        return CalibrationSample(messages, image, source)

    return _draw(
        len(lines), build, num_samples=num_samples, seed=seed, skip_bad_samples=skip_bad_samples, what=str(path)
    )


def load_hf_dataset(
    name_or_path: str | Path,
    *,
    split: str = "train",
    image_column: str | None = "image",
    text_column: str | None = None,
    answer_column: str | None = None,
    image_root: str | Path | None = None,
    skip_bad_samples: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Load calibration samples from a Hugging Face dataset (needs the ``datasets`` package).

    A folder written by ``save_to_disk`` is opened with ``datasets.load_from_disk``;
    anything else (hub name, folder of data files) with ``datasets.load_dataset``.

    Args:
        name_or_path: dataset name or folder.
        split: split to use (also picks the split of a saved ``DatasetDict``).
        image_column: column with the image: a decoded ``PIL.Image``, a
            ``{"bytes", "path"}`` dict or a path string (relative to ``image_root``);
            ``None`` in a row means a text-only sample. ``image_column=None``: text-only data.
        text_column: column with the prompt (a string, or a list whose first string is
            used) or the conversation (list of turns, see :func:`to_messages`);
            default: the first of :data:`TEXT_COLUMNS` that exists.
        answer_column: column with the assistant's reply; default: the first of
            :data:`ANSWER_COLUMNS` that exists (ignored for conversation columns).
        image_root: folder for relative image paths (default: current folder).
        skip_bad_samples, num_samples, seed: as in :func:`load_jsonl`.

    Returns:
        :class:`CalibrationData`, sources ``"NAME[SPLIT]:ROW"``.

    Raises:
        ImportError: ``datasets`` is not installed.
        CalibrationDataError: unknown split, a named column missing or no text column
            found (the message lists the available columns), a bad row (unless
            ``skip_bad_samples``), or no usable sample.
        ValueError: ``num_samples < 1``.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a Hugging Face dataset needs `pip install datasets`") from e

    name = str(name_or_path)
    saved = Path(name).is_dir() and any(
        (Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )
    if saved:
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CalibrationDataError(f"{name}: no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)

    columns = list(ds.column_names)
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise CalibrationDataError(
                f"{name}: no text column found (tried {', '.join(TEXT_COLUMNS)}); "
                f"available columns: {', '.join(columns)}; pass text_column"
            )
    for role, col in (("text", text_column), ("image", image_column), ("answer", answer_column)):
        if col is not None and col not in columns:
            hint = " (image_column=None for text-only data)" if role == "image" else ""
            raise CalibrationDataError(
                f"{name}: no {role} column {col!r}{hint}; available columns: {', '.join(columns)}"
            )
    if answer_column is None:
        answer_column = next((c for c in ANSWER_COLUMNS if c in columns and c != text_column), None)
    root = Path(image_root) if image_root is not None else Path.cwd()

    def build(i: int) -> CalibrationSample:
        source = f"{name}[{split}]:{i}"
        try:
            row = ds[i]  # decodes the image
        except Exception as e:  # noqa: BLE001 - datasets/PIL raise many types for one bad row
            raise CalibrationDataError(f"{source}: cannot read the row: {e}") from e
        image = _hf_image(row.get(image_column) if image_column else None, root, source)
        value = row[text_column]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            messages = to_messages(value, has_image=image is not None, source=source)
        else:
            if isinstance(value, list):  # e.g. several captions: use the first
                value = next((v for v in value if isinstance(v, str)), None)
            answer = row.get(answer_column) if answer_column else None
            messages = _prompt_messages(value, answer, has_image=image is not None, source=source)
        return CalibrationSample(messages, image, source)

    return _draw(
        len(ds), build, num_samples=num_samples, seed=seed, skip_bad_samples=skip_bad_samples, what=f"{name}[{split}]"
    )


def _hf_image(value, root: Path, source: str):
    """A dataset cell -> RGB PIL image or None."""
    if value is None:
        return None
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        import io

        try:
            with Image.open(io.BytesIO(value["bytes"])) as img:
                img.load()
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise CalibrationDataError(f"{source}: cannot read image bytes: {e}") from e
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        return _open_image(root / value, source)
    raise CalibrationDataError(f"{source}: unsupported image value of type {type(value).__name__}")


def builtin_samples(n: int, seed: int = 0) -> CalibrationData:
    """``n`` ShapesQA training-split questions with their answers (offline default data).

    The questions are drawn without replacement, by ``seed``, from the first
    million of the training split (:data:`vllm_sab.demo.shapesqa.TRAIN_SEED`); question
    types are drawn uniformly, so about two thirds have a 64x64 image and one third
    are text-only (arithmetic, comparisons, sequences).

    Args:
        n: number of samples (>= 1).
        seed: selects the questions (same seed, same samples, across runs).

    Returns:
        :class:`CalibrationData`: user turn as the model is asked at inference
        (:func:`vllm_sab.demo.shapesqa.chat_content`: the question, then the image part
        when there is an image) and the answer as assistant turn; sources
        ``"shapesqa:train:INDEX"``.

    Raises:
        ValueError: ``n < 1``.
    """
    from vllm_sab.demo import shapesqa

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = CalibrationData()
    for i in random.Random(seed).sample(range(1_000_000), n):
        s = shapesqa.make_sample(shapesqa.TRAIN_SEED, i)
        image = s.image
        source = f"shapesqa:train:{i}"
        messages = [{"role": "user", "content": shapesqa.chat_content(s)}, {"role": "assistant", "content": s.answer}]
        out.append(CalibrationSample(messages, image, source))
    return out


def load_calibration_data(
    spec: str | Path | None,
    *,
    num_samples: int,
    seed: int = 0,
    skip_bad_samples: bool = False,
    image_root: str | Path | None = None,
    split: str = "train",
    image_column: str | None = "image",
    text_column: str | None = None,
) -> CalibrationData:
    """Load ``num_samples`` calibration samples from ``spec``, deterministically.

    Args:
        spec: ``"builtin"``: :func:`builtin_samples` (synthetic ShapesQA, an explicit choice:
            ``None`` is refused); a path ending in
            ``.jsonl``: :func:`load_jsonl`; anything else (a folder written by
            ``save_to_disk``, a hub name, a data folder): :func:`load_hf_dataset`.
        num_samples: number of samples (fewer, with a warning, if the source has fewer).
        seed: seed of the subsample (a seeded shuffle; stable across runs).
        skip_bad_samples: skip bad samples instead of raising (not for builtin).
        image_root: folder of relative image paths (JSONL and datasets).
        split, image_column, text_column: passed to :func:`load_hf_dataset`.

    Returns:
        :class:`CalibrationData` with at most ``num_samples`` samples.

    Raises:
        CalibrationDataError: ``spec`` is None (no data named), or see the loaders.
        ImportError: a dataset spec without the ``datasets`` package.
        ValueError: ``num_samples < 1``.
    """
    if spec is None:
        raise CalibrationDataError(NO_DATA_MESSAGE)
    if str(spec) == "builtin":
        return builtin_samples(num_samples, seed)
    common = dict(skip_bad_samples=skip_bad_samples, num_samples=num_samples, seed=seed)
    if str(spec).lower().endswith(".jsonl"):
        return load_jsonl(spec, image_root, **common)
    return load_hf_dataset(
        spec, split=split, image_column=image_column, text_column=text_column, image_root=image_root, **common
    )


# --------------------------------------------------------------------------- encoding


@dataclass
class EncodedSample:
    """One sample as model inputs (batch size 1, no padding).

    Attributes:
        inputs: the processor's tensors, ready for ``model(**inputs)``: ``input_ids``
            and ``attention_mask`` (int64 ``[1, seq]``), for an image ``pixel_values``
            (LLaVA ``[1, 3, H, W]``; Qwen ``[patches, dim]`` with ``image_grid_thw``
            int64 ``[1, 3]``), and whatever else the processor returns
            (e.g. Qwen's ``mm_token_type_ids`` ``[1, seq]``).
        visual_mask: bool ``[seq]``, True at the image tokens (the positions the vision
            tower's outputs replace).
        source: the sample's source.
        truncated: number of text tokens cut from the end to fit ``max_seq_len``.
    """

    inputs: dict[str, torch.Tensor]
    visual_mask: torch.Tensor
    source: str = ""
    truncated: int = 0

    @property
    def input_ids(self) -> torch.Tensor:
        """int64 ``[1, seq]``."""
        return self.inputs["input_ids"]

    @property
    def num_visual_tokens(self) -> int:
        """Number of image tokens (``visual_mask.sum()``)."""
        return int(self.visual_mask.sum())


def image_token_id(processor) -> int:
    """The id of the image placeholder token (LLaVA ``<image>``, Qwen ``<|image_pad|>``).

    Raises:
        ValueError: the processor names no image token, or its tokenizer does not know it.
    """
    tid = getattr(processor, "image_token_id", None)
    if isinstance(tid, int):
        return tid
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    tid = processor.tokenizer.convert_tokens_to_ids(token) if token else None
    if tid is None or tid == processor.tokenizer.unk_token_id:
        raise ValueError(f"{type(processor).__name__} has no image token the tokenizer knows (got {token!r})")
    return tid


def encode(processor, sample: CalibrationSample, *, max_seq_len: int) -> EncodedSample:
    """Encode ``sample`` with the model's processor and chat template.

    The messages are rendered with ``processor.apply_chat_template(messages,
    tokenize=False)`` (with a generation prompt when the last turn is not the
    assistant's) and tokenized with ``processor(text=..., images=..., return_tensors="pt")``
    (no second BOS if the template already starts with one). A sequence longer than
    ``max_seq_len`` loses text at its end only; image tokens are never cut.

    Args:
        processor: the model's ``AutoProcessor`` (LLaVA, Qwen2-VL, Qwen2.5-VL, ...).
        sample: the sample.
        max_seq_len: most tokens in the result (>= 1).

    Returns:
        :class:`EncodedSample`; ``seq <= max_seq_len``. A text-only sample has no
        ``pixel_values`` and an all-False ``visual_mask``.

    Raises:
        CalibrationDataError: the image tokens (with the text before them) alone exceed
            ``max_seq_len``, or the processor emitted no image tokens for an image.
        ValueError: ``max_seq_len < 1``, or the processor has no image token.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    add_generation_prompt = sample.messages[-1]["role"] != "assistant"
    text = processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    kwargs = {}
    bos = getattr(processor.tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        kwargs["add_special_tokens"] = False
    images = [sample.image] if sample.image is not None else None
    inputs = dict(processor(text=[text], images=images, return_tensors="pt", **kwargs))
    input_ids = inputs["input_ids"]
    visual_mask = input_ids[0] == image_token_id(processor)
    if sample.image is not None and not visual_mask.any():
        raise CalibrationDataError(f"{sample.source}: the chat template rendered no image token for the image")

    seq, truncated = input_ids.shape[1], 0
    if seq > max_seq_len:
        positions = visual_mask.nonzero()
        need = int(positions[-1]) + 1 if len(positions) else 0
        if need > max_seq_len:
            raise CalibrationDataError(
                f"{sample.source}: the image takes {int(visual_mask.sum())} tokens, which with the text "
                f"before them make {need} > max_seq_len={max_seq_len}; raise max_seq_len"
            )
        truncated = seq - max_seq_len
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.shape == input_ids.shape and not key.startswith(("pixel", "image")):
                inputs[key] = value[:, :max_seq_len]
        visual_mask = visual_mask[:max_seq_len]
    return EncodedSample(inputs, visual_mask, sample.source, truncated)
