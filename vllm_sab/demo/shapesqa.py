"""ShapesQA: the synthetic visual question answering task of the shipped small VLM.

Our machines reach no model hub, so quality measurements need a model that has
really learned something. ShapesQA is a task a small LLaVA learns on two CPU
cores: 64x64 images with one to four simple shapes in distinct colors, one per
quadrant, sometimes a rendered word or digit in a free quadrant, and short
answers about them; plus text-only questions (arithmetic, comparisons,
sequences) so the language model learns something of its own.

Everything is deterministic: sample ``i`` of the split with seed ``s`` is a
pure function of ``(s, i)`` (and of the Pillow version, which renders the
text). The training split uses seed :data:`TRAIN_SEED`, the held-out split
:data:`HELDOUT_SEED`.

Question types (:data:`QUESTION_TYPES`) and their answers:

==========  =====================================  ==========================
type        question                               answer
==========  =====================================  ==========================
color       What color is the circle?              red
shape       What shape is the blue object?         triangle
count       How many shapes are there?             3
position    Where is the green square?             top left
exists      Is there a purple cross?               yes / no
read        What is written in the image?          cat / 7
arithmetic  What is 3 plus 4?                      7
compare     Which is larger, 5 or 8?               8
sequence    What comes next: 2, 4, 6?              8
==========  =====================================  ==========================

The first six have an image; the last three do not.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "COLORS",
    "HELDOUT_SEED",
    "IMAGE_SIZE",
    "QUADRANTS",
    "QUESTION_TYPES",
    "SHAPES",
    "TEXT_TYPES",
    "TRAIN_SEED",
    "VISUAL_TYPES",
    "WORDS",
    "Sample",
    "Scene",
    "chance_accuracy",
    "chat_content",
    "corpus",
    "make_sample",
    "make_scene",
    "normalize_answer",
    "render",
    "samples",
    "score",
]

#: Image side in pixels (square RGB images).
IMAGE_SIZE = 64
#: Seed of the training split.
TRAIN_SEED = 0
#: Seed of the held-out split (never used for training).
HELDOUT_SEED = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
#: Quadrant names in (row, column) order: index 0 = top left, 3 = bottom right.
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
#: Strings that may be written in an image: ten digits and eight short words.
WORDS: tuple[str, ...] = tuple(str(d) for d in range(10)) + ("cat", "dog", "sun", "car", "box", "hat", "cup", "pen")

VISUAL_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "exists", "read")
TEXT_TYPES: tuple[str, ...] = ("arithmetic", "compare", "sequence")
QUESTION_TYPES: tuple[str, ...] = VISUAL_TYPES + TEXT_TYPES

_BACKGROUND = (245, 245, 240)
_TEXT_COLOR = (20, 20, 20)
_FONT_SIZE = 15


@dataclass(frozen=True)
class Scene:
    """What an image shows.

    Attributes:
        objects: ``(shape, color, quadrant index)`` per shape; shapes, colors
            and quadrants are all distinct within a scene.
        text: the word or digit written in the image, or ``None``.
        text_quadrant: quadrant index of ``text`` (``-1`` without text).
        jitter: ``(dx, dy, size)`` per object and one more for the text, in pixels.
    """

    objects: tuple[tuple[str, str, int], ...]
    text: str | None = None
    text_quadrant: int = -1
    jitter: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Sample:
    """One question with its answer.

    Attributes:
        qtype: one of :data:`QUESTION_TYPES`.
        question: the question text (no chat formatting).
        answer: the expected answer, lower case (e.g. ``"top left"``, ``"7"``).
        scene: the scene behind the image, ``None`` for text-only questions.
        index: index of the sample in its split.
    """

    qtype: str
    question: str
    answer: str
    scene: Scene | None = None
    index: int = -1
    _image: object = field(default=None, repr=False, compare=False)

    @property
    def image(self):
        """The rendered ``PIL.Image.Image`` (RGB, 64x64), or ``None`` for text-only questions."""
        if self.scene is None:
            return None
        if self._image is None:
            object.__setattr__(self, "_image", render(self.scene))
        return self._image


def chat_content(sample: Sample) -> list[dict]:
    """The user turn's content parts of ``sample``: the question, then its image (if any).

    Returns ``[{"type": "text", "text": question}, {"type": "image"}]`` (the image
    part only for questions with an image), for ``apply_chat_template``.

    The question comes first so that the visual tokens, which follow it in the
    causal language model, can attend to it: each image token can tell
    whether its object is the one the question names ("the circle", "a purple
    cross"), and the answer only has to find the token that says so. With the
    image first, the answer position itself has to match the question's words
    against every visual token, which the previous (image-first) checkpoint of
    the shipped model learned only partly (see ``models/shapes-llava/README.md``).
    A model trained on this order should be asked in it. LLaVA-1.5's instruction
    data uses both orders. Training, calibration and evaluation all build
    their prompts from this one function.
    """
    return [{"type": "text", "text": sample.question}] + ([{"type": "image"}] if sample.scene is not None else [])


def _rng(seed: int, index: int, salt: str = "") -> random.Random:
    # A stable hash (not Python's salted hash()) so splits are identical across runs.
    digest = hashlib.sha256(f"shapesqa:{seed}:{index}:{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_scene(rng: random.Random, max_shapes: int = 4, text_prob: float = 0.5) -> Scene:
    """Draw a random scene.

    Args:
        rng: source of randomness.
        max_shapes: at most this many shapes (1-4); the count is uniform in
            ``1..max_shapes``.
        text_prob: probability of a written word or digit when a quadrant is free.

    Raises:
        ValueError: ``max_shapes`` outside 1..4.
    """
    if not 1 <= max_shapes <= 4:
        raise ValueError(f"max_shapes must be in 1..4, got {max_shapes}")
    n = rng.randint(1, max_shapes)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    quadrants = rng.sample(range(4), 4)
    objects = tuple(zip(shapes, colors, quadrants[:n]))
    text, text_q = None, -1
    if n < 4 and rng.random() < text_prob:
        text, text_q = rng.choice(WORDS), quadrants[n]
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3), rng.randint(18, 24)) for _ in range(n + 1))
    return Scene(objects=objects, text=text, text_quadrant=text_q, jitter=jitter)


def render(scene: Scene):
    """Draw ``scene`` as a 64x64 RGB ``PIL.Image.Image`` (deterministic)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for (shape, color, q), (dx, dy, size) in zip(scene.objects, scene.jitter):
        cx = (q % 2) * half + half // 2 + dx
        cy = (q // 2) * half + half // 2 + dy
        r = size / 2
        fill = COLORS[color]
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:  # cross
            t = r * 0.35
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    if scene.text is not None:
        dx, dy, _ = scene.jitter[len(scene.objects)]
        font = ImageFont.load_default(size=_FONT_SIZE)
        q = scene.text_quadrant
        cx = (q % 2) * half + half // 2 + dx
        cy = (q // 2) * half + half // 2 + dy
        draw.text((cx, cy), scene.text, fill=_TEXT_COLOR, font=font, anchor="mm")
    return img


def _visual_question(qtype: str, scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    shape, color, q = obj
    if qtype == "color":
        return f"What color is the {shape}?", color
    if qtype == "shape":
        return f"What shape is the {color} object?", shape
    if qtype == "count":
        return "How many shapes are there?", str(len(scene.objects))
    if qtype == "position":
        return f"Where is the {color} {shape}?", QUADRANTS[q]
    if qtype == "exists":
        if rng.random() < 0.5:
            return f"Is there a {color} {shape}?", "yes"
        present = {(s, c) for s, c, _ in scene.objects}
        absent = [(s, c) for s in SHAPES for c in sorted(COLORS) if (s, c) not in present]
        # Half the negatives reuse a shape or color that is in the image, so
        # the answer needs the binding of shape and color, not either alone.
        near = [(s, c) for s, c in absent if s == shape or c == color]
        s, c = rng.choice(near if near and rng.random() < 0.5 else absent)
        return f"Is there a {c} {s}?", "no"
    if qtype == "read":
        return "What is written in the image?", scene.text
    raise ValueError(f"unknown visual question type {qtype!r}")


def _text_question(qtype: str, rng: random.Random) -> tuple[str, str]:
    if qtype == "arithmetic":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    if qtype == "compare":
        a, b = rng.sample(range(20), 2)
        if rng.random() < 0.5:
            return f"Which is larger, {a} or {b}?", str(max(a, b))
        return f"Which is smaller, {a} or {b}?", str(min(a, b))
    if qtype == "sequence":
        start, step = rng.randint(0, 9), rng.randint(1, 3)
        seq = [start + k * step for k in range(3)]
        return f"What comes next: {', '.join(map(str, seq))}?", str(start + 3 * step)
    raise ValueError(f"unknown text question type {qtype!r}")


def make_sample(
    seed: int,
    index: int,
    *,
    qtype: str | None = None,
    max_shapes: int = 4,
    types: tuple[str, ...] = QUESTION_TYPES,
) -> Sample:
    """Sample ``index`` of the split with ``seed``.

    Args:
        seed: split seed (:data:`TRAIN_SEED`, :data:`HELDOUT_SEED` or any other).
        index: sample index (>= 0).
        qtype: force a question type; by default the type is drawn uniformly from ``types``.
        max_shapes: at most this many shapes in the image (1-4); training
            uses it as a curriculum, evaluation keeps the default 4.
        types: the question types to draw from.

    Returns:
        A :class:`Sample`; the image is rendered on first access of ``.image``.

    Raises:
        ValueError: unknown question type or ``max_shapes`` outside 1..4.
    """
    rng = _rng(seed, index)
    qtype = qtype if qtype is not None else rng.choice(types)
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}")
    if qtype in TEXT_TYPES:
        question, answer = _text_question(qtype, rng)
        return Sample(qtype, question, answer, None, index)
    # Reading needs a written word, so draw scenes until one has text.
    scene = make_scene(rng, max_shapes)
    while qtype == "read" and scene.text is None:
        scene = make_scene(rng, min(max_shapes, 3))
    question, answer = _visual_question(qtype, scene, rng)
    return Sample(qtype, question, answer, scene, index)


def samples(seed: int, n: int, *, start: int = 0, balanced: bool = False, **kwargs) -> list[Sample]:
    """``n`` consecutive samples of a split.

    Args:
        seed: split seed.
        n: number of samples.
        start: index of the first sample.
        balanced: cycle through :data:`QUESTION_TYPES` (equal count per type)
            instead of drawing each type at random; what evaluation uses.
        **kwargs: passed to :func:`make_sample`.
    """
    if balanced:
        return [
            make_sample(seed, i, qtype=QUESTION_TYPES[i % len(QUESTION_TYPES)], **kwargs)
            for i in range(start, start + n)
        ]
    return [make_sample(seed, i, **kwargs) for i in range(start, start + n)]


def normalize_answer(text: str) -> str:
    """Lower-case, strip spaces and a trailing period: how answers are compared."""
    return " ".join(text.strip().lower().rstrip(".").split())


def score(predictions: list[str], references: list[Sample]) -> dict[str, dict[str, float]]:
    """Accuracy per question type and overall.

    Args:
        predictions: generated answers, one per sample.
        references: the samples, in the same order.

    Returns:
        ``{qtype: {"accuracy": float in [0, 1], "n": int}}`` plus ``"overall"``
        (mean over samples).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} samples")
    hits: Counter = Counter()
    totals: Counter = Counter()
    for pred, ref in zip(predictions, references):
        ok = normalize_answer(pred) == normalize_answer(ref.answer)
        for key in (ref.qtype, "overall"):
            hits[key] += ok
            totals[key] += 1
    return {k: {"accuracy": hits[k] / totals[k], "n": totals[k]} for k in totals}


def chance_accuracy(references: list[Sample]) -> dict[str, float]:
    """Accuracy of the best constant answer per question type (the chance level).

    Returns:
        ``{qtype: fraction of samples of that type whose answer is its most common answer}``.
    """
    by_type: dict[str, Counter] = {}
    for s in references:
        by_type.setdefault(s.qtype, Counter())[normalize_answer(s.answer)] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}


def corpus(n: int = 4000, seed: int = 12345) -> list[str]:
    """Question and answer lines for training a tokenizer (no images rendered)."""
    lines = []
    for s in samples(seed, n):
        lines.append(s.question)
        lines.append(s.answer)
    lines.extend(WORDS)
    lines.extend(QUADRANTS)
    return lines
