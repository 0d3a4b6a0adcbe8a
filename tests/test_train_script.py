"""examples/train_shapes_vlm.py: the grounding loss of the shipped model's recipe, against brute force."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import torch

from vllm_sab.demo import shapesqa

_SPEC = importlib.util.spec_from_file_location(
    "train_shapes_vlm", Path(__file__).resolve().parents[1] / "examples" / "train_shapes_vlm.py"
)
train = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = train  # its dataclasses look their module up there
_SPEC.loader.exec_module(train)


def _brute_force_grounding(visual, embeddings, word_ids, scenes, grid, temperature):
    colors, shapes = list(shapesqa.COLORS), list(shapesqa.SHAPES)

    def unit(x):
        return x / x.norm()

    def proto(w):
        return unit(embeddings[word_ids[w]].mean(0))

    losses = {"color": [], "shape": []}
    for i, sc in enumerate(scenes):
        for shape, color, q in sc.objects:
            for r in range(grid):
                for c in range(grid):
                    if (r // (grid // 2)) * 2 + c // (grid // 2) != q:
                        continue
                    v = unit(visual[i, r * grid + c])
                    for kind, words, want in (("color", colors, color), ("shape", shapes, shape)):
                        logits = [float(v @ proto(w)) / temperature for w in words]
                        log_z = math.log(sum(math.exp(x) for x in logits))
                        losses[kind].append(log_z - logits[words.index(want)])
    return (sum(losses["color"]) / len(losses["color"]) + sum(losses["shape"]) / len(losses["shape"])) / 2


def test_grounding_loss_matches_brute_force():
    grid, hidden = 4, 16
    rng = random.Random(0)
    scenes = [shapesqa.make_scene(rng) for _ in range(5)]
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(len(scenes), grid * grid, hidden, generator=g)
    embeddings = torch.randn(40, hidden, generator=g)
    words = (*shapesqa.COLORS, *shapesqa.SHAPES)
    word_ids = {w: [2 * k, 2 * k + 1] if k % 3 == 0 else [2 * k] for k, w in enumerate(words)}
    got = train.grounding_loss(visual, embeddings, word_ids, scenes, grid, temperature=0.1)
    want = _brute_force_grounding(visual, embeddings, word_ids, scenes, grid, 0.1)
    assert abs(float(got) - want) < 1e-4 * max(1.0, abs(want))


def test_grounding_loss_is_low_when_tokens_carry_their_objects_words():
    """Tokens built from their object's color + shape word embeddings score far better than shuffled ones."""
    grid, hidden = 4, 64
    rng = random.Random(1)
    scenes = [shapesqa.make_scene(rng) for _ in range(4)]
    g = torch.Generator().manual_seed(1)
    words = (*shapesqa.COLORS, *shapesqa.SHAPES)
    embeddings = torch.randn(len(words), hidden, generator=g)
    word_ids = {w: [k] for k, w in enumerate(words)}
    quadrant = train._patch_quadrants(grid)
    visual = torch.zeros(len(scenes), grid * grid, hidden)
    for i, sc in enumerate(scenes):
        for shape, color, q in sc.objects:
            visual[i, quadrant == q] = embeddings[word_ids[color]] + embeddings[word_ids[shape]]
    aligned = train.grounding_loss(visual, embeddings, word_ids, scenes, grid, temperature=0.1)
    shuffled = train.grounding_loss(visual.flip(0), embeddings, word_ids, scenes, grid, temperature=0.1)
    assert float(aligned) < 0.1 < float(shuffled)


def test_patch_quadrants_in_raster_order():
    for grid in (2, 4, 8):
        want = [(r // (grid // 2)) * 2 + c // (grid // 2) for r in range(grid) for c in range(grid)]
        assert train._patch_quadrants(grid).tolist() == want
