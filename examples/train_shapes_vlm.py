"""Train the small LLaVA-1.5 shipped in ``models/shapes-llava`` on ShapesQA (CPU, about 70 min on 2 cores).

    python examples/train_shapes_vlm.py                       # writes models/shapes-llava
    python examples/train_shapes_vlm.py --out /tmp/m --scale 0.2   # a quick, shorter run

Every hyperparameter (seed, sizes, steps, learning rates) is in :class:`TrainConfig`.

Plain joint training from random initialisation stalls near chance on the
visual questions for a long time, so the run is staged the way LLaVA is, with
the visual signal made easy first:

1. **Vision pretraining.** The CLIP tower alone, with small heads on its
   last-layer patch features: per quadrant (mean of its 2x2 patches) what is
   there (empty / one of four shapes / text), the shape's color and the written
   word; per patch, which quadrant it is in (the language model only sees the
   visual tokens through RoPE, so the features carry their own position).
2. **Alignment + language.** Vision frozen; projector and language model learn
   the questions. LLaVA freezes its (pretrained) language model here; ours
   starts from random, so it trains too, on the text-only questions as well.
   Curriculum: at most one shape per image at first, growing to four.
3. **Joint tuning.** Everything trains, at a lower learning rate.
4. **Binding focus.** Vision frozen; the questions that name one object of
   several (color, shape, position, exists) are drawn three times as often.

Two choices make the questions that name one object among several (the
*binding* questions) learnable; without them the model stalled near 82 %,
with "Is there a purple cross?" at chance:

* **The question comes before the image** (:func:`vllm_sab.demo.shapesqa.chat_content`),
  so each visual token can attend to the question and tell whether its object
  is the one named.
* **Grounding loss** in stages 2-4 (:func:`grounding_loss`): each projected
  visual token's color and shape must be readable through the language
  model's input embeddings of the color and shape words, so a question word
  and an image token can be compared by one attention dot product.

The loss covers the answer tokens (and EOS) only. The output folder loads in
transformers and vLLM (see ``tests/tiny_models.py:save_vlm``), in float16 to stay
under 30 MB; ``train_log.json`` records the losses and held-out accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vllm_sab.demo import shapesqa
from vllm_sab.demo.evaluate import chat_prompt, transformers_answers

# The model builders are development fixtures kept with the tests (tests/tiny_models.py), not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import build_tiny_tokenizer, llava_parts, save_vlm  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    """All hyperparameters of the run (steps are optimizer steps)."""

    seed: int = 0
    # Language model (Llama): wide and shallow, every linear's K a multiple of 128.
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    vocab_size: int = 512
    # Vision tower (CLIP): 64 px images, 16 px patches -> 16 visual tokens.
    vision_width: int = 256
    vision_intermediate: int = 1024
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = shapesqa.IMAGE_SIZE
    patch_size: int = 16
    init_std: float = 0.02
    # Stage 1: vision pretraining.
    vision_steps: int = 2000
    vision_batch: int = 64
    vision_lr: float = 1e-3
    # Stage 2: projector + language model, vision frozen.
    align_steps: int = 4500
    curriculum_frac: float = 0.3  # max shapes grows 1 -> 4 over this fraction of stage 2
    # Stage 3: everything.
    joint_steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    joint_lr: float = 3e-4
    # Stage 4: binding focus, vision frozen again. The questions that name one
    # object among several ("the circle", "a purple cross") are learned last
    # (exists was at 80 % after stage 3 in the shipped run, 100 % after this),
    # so this stage shows them three times as often.
    focus_steps: int = 2000
    focus_lr: float = 5e-4
    focus_weights: tuple[tuple[str, int], ...] = (
        ("color", 3), ("shape", 3), ("position", 3), ("exists", 3),
        ("count", 1), ("read", 1), ("arithmetic", 1), ("compare", 1), ("sequence", 1),
    )
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Grounding, in every question stage: each visual token's color and shape
    # must be readable through the word embeddings (see grounding_loss).
    ground_weight: float = 0.5
    ground_temperature: float = 0.1
    # Evaluation.
    eval_every: int = 1000
    eval_samples: int = 270
    final_eval_samples: int = 900


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_model(cfg: TrainConfig):
    """Tokenizer, randomly initialised ``LlavaForConditionalGeneration`` and processor."""
    tok = build_tiny_tokenizer("llava", vocab_size=cfg.vocab_size, texts=shapesqa.corpus())
    cls, config, processor = llava_parts(
        tok,
        text=dict(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=512,
        ),
        vision=dict(
            hidden_size=cfg.vision_width,
            intermediate_size=cfg.vision_intermediate,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
        ),
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        init_std=cfg.init_std,
    )
    torch.manual_seed(cfg.seed)
    model = cls(config)
    return tok, model, processor


class VisionHeads(nn.Module):
    """Attribute heads of stage 1 on the CLIP tower's last-layer patch features."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(width)
        self.kind = nn.Linear(width, 2 + len(shapesqa.SHAPES))  # empty, shapes..., text
        self.color = nn.Linear(width, len(shapesqa.COLORS))
        self.word = nn.Linear(width, len(shapesqa.WORDS))
        self.quadrant = nn.Linear(width, 4)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, d = feats.shape
        h = self.grid // 2
        f = self.norm(feats)
        quads = f.view(b, 2, h, 2, h, d).mean(dim=(2, 4)).reshape(b, 4, d)  # (row, col) order
        return {"kind": self.kind(quads), "color": self.color(quads), "word": self.word(quads), "quadrant": self.quadrant(f)}


def _patch_quadrants(grid: int) -> torch.Tensor:
    """Quadrant (0 top left, 1 top right, 2 bottom left, 3 bottom right) of each patch, long ``[grid * grid]``, raster order."""
    rows = torch.arange(grid).repeat_interleave(grid) // (grid // 2)
    cols = torch.arange(grid).repeat(grid) // (grid // 2)
    return rows * 2 + cols


def _vision_labels(scenes: list[shapesqa.Scene], grid: int) -> dict[str, torch.Tensor]:
    colors = sorted(shapesqa.COLORS)
    kind = torch.zeros(len(scenes), 4, dtype=torch.long)
    color = torch.full((len(scenes), 4), -100, dtype=torch.long)
    word = torch.full((len(scenes), 4), -100, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for shape, c, q in sc.objects:
            kind[i, q] = 1 + shapesqa.SHAPES.index(shape)
            color[i, q] = colors.index(c)
        if sc.text is not None:
            kind[i, sc.text_quadrant] = 1 + len(shapesqa.SHAPES)
            word[i, sc.text_quadrant] = shapesqa.WORDS.index(sc.text)
    quadrant = _patch_quadrants(grid).expand(len(scenes), -1)
    return {"kind": kind, "color": color, "word": word, "quadrant": quadrant}


def _vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    # The features LLaVA hands the projector: vision_feature_layer of the tower, CLS dropped.
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def train_vision(model, processor, cfg: TrainConfig, log: list) -> None:
    """Stage 1: pretrain the vision tower on per-quadrant attribute labels."""
    grid = cfg.image_size // cfg.patch_size
    heads = VisionHeads(cfg.vision_width, grid)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    t0, ema = time.perf_counter(), None
    for step in range(cfg.vision_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup)
        scenes = [shapesqa.make_scene(rng) for _ in range(cfg.vision_batch)]
        pixels = processor.image_processor([shapesqa.render(s) for s in scenes], return_tensors="pt").pixel_values
        logits = heads(_vision_features(model, pixels))
        labels = _vision_labels(scenes, grid)
        loss = sum(ce(logits[k].flatten(0, 1), labels[k].flatten()) for k in logits)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0 or step == cfg.vision_steps - 1:
            acc = {k: (logits[k].argmax(-1) == labels[k])[labels[k] != -100].float().mean().item() for k in logits}
            entry = {"stage": "vision", "step": step, "loss": round(ema, 4), "seconds": round(time.perf_counter() - t0, 1)}
            entry.update({f"acc_{k}": round(v, 3) for k, v in acc.items()})
            log.append(entry)
            print(json.dumps(entry), flush=True)


def _qa_batch(tok, processor, samples: list[shapesqa.Sample], n_image_tokens: int, image_token_id: int):
    """Right-padded input ids, labels (answer + EOS only) and pixel values of a QA batch."""
    seqs, labels = [], []
    for s in samples:
        prompt = tok(chat_prompt(processor, s)).input_ids
        ids = []
        for t in prompt:
            ids.extend([t] * n_image_tokens if t == image_token_id else [t])
        answer = tok(" " + s.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        seqs.append(ids + answer)
        labels.append([-100] * len(ids) + answer)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    images = [s.image for s in samples if s.scene is not None]
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values if images else None
    return input_ids, label_t, mask, pixels


def _check_formatting(tok, processor, n_image_tokens: int, image_token_id: int) -> None:
    """The training prompts must be token for token what the processor builds at inference."""
    for s in shapesqa.samples(shapesqa.TRAIN_SEED, 9, balanced=True):
        ids, labels, _, _ = _qa_batch(tok, processor, [s], n_image_tokens, image_token_id)
        n_prompt = int((labels[0] == -100).sum())
        ref = processor(text=[chat_prompt(processor, s)], images=[s.image] if s.image else None, return_tensors="pt")
        if ids[0, :n_prompt].tolist() != ref["input_ids"][0].tolist():
            raise RuntimeError(f"training prompt differs from the processor's for {s.question!r}")


def heldout_accuracy(model, processor, n: int) -> dict:
    """Greedy held-out accuracy per question type (balanced split of ``n`` questions)."""
    model.eval()
    samples = shapesqa.samples(shapesqa.HELDOUT_SEED, n, balanced=True)
    answers = transformers_answers(model, processor, samples)
    model.train()
    return {k: round(v["accuracy"], 3) for k, v in shapesqa.score(answers, samples).items()}


def grounding_loss(visual: torch.Tensor, embeddings: torch.Tensor, word_ids: dict[str, list[int]],
                   scenes: list[shapesqa.Scene], grid: int, temperature: float) -> torch.Tensor:
    """Cross-entropy of each object token's color and shape, read through the word embeddings.

    ``visual`` (any float dtype, ``(n_images, grid * grid, hidden)``, raster order) are the projected
    visual tokens the language model reads, ``embeddings`` (``(vocab, hidden)``,
    detached) its input embedding table. For every patch in an object's
    quadrant (one object per quadrant), the logits over the six colors are
    ``cos(v, e(color)) / temperature`` with ``e(w)`` the mean embedding of
    word ``w``'s tokens (``word_ids[w]``, the tokens of ``" " + w``); the same
    for the four shapes. Returns the mean of the two losses (scalar float32).

    It makes an image token's attributes readable along the very directions
    the question's words take in the embedding space, so one attention
    dot product can compare "purple" in the question with a purple object.
    Unlike pulling tokens onto ``e(color) + e(shape)`` (tried: it cost color
    accuracy), it leaves room for the position and written-word features.
    Our own auxiliary loss (no paper); ``scenes`` must be those of ``visual``'s
    images, in order. Raises ``ValueError`` (from ``index``) for a color or
    shape outside ShapesQA's.
    """
    patch_quadrant = _patch_quadrants(grid)
    colors = list(shapesqa.COLORS)
    color_lab = torch.full((len(scenes), grid * grid), -100, dtype=torch.long)
    shape_lab = torch.full_like(color_lab, -100)
    for i, sc in enumerate(scenes):
        for shape, color, q in sc.objects:
            color_lab[i, patch_quadrant == q] = colors.index(color)
            shape_lab[i, patch_quadrant == q] = shapesqa.SHAPES.index(shape)

    def prototypes(words) -> torch.Tensor:
        return nn.functional.normalize(torch.stack([embeddings[word_ids[w]].mean(0) for w in words]), dim=-1)

    v = nn.functional.normalize(visual.float(), dim=-1)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    loss_color = ce((v @ prototypes(colors).T / temperature).flatten(0, 1), color_lab.flatten())
    loss_shape = ce((v @ prototypes(shapesqa.SHAPES).T / temperature).flatten(0, 1), shape_lab.flatten())
    return (loss_color + loss_shape) / 2


def train_qa(model, tok, processor, cfg: TrainConfig, log: list, *, stage: str, sample_offset: int = 0) -> None:
    """Stage 2 (``"align"``), 3 (``"joint"``) or 4 (``"focus"``): answer-only LM loss plus
    ``cfg.ground_weight`` x :func:`grounding_loss` of the projected visual tokens.

    Every stage reads its own range of training samples, so a stage run later
    from a saved model (``--init``) sees the samples it would in one run.
    """
    steps, peak = {"align": (cfg.align_steps, cfg.lr), "joint": (cfg.joint_steps, cfg.joint_lr),
                   "focus": (cfg.focus_steps, cfg.focus_lr)}[stage]
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(stage == "joint")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=cfg.weight_decay)
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    image_token_id = model.config.image_token_index
    starts = {"align": 0, "joint": cfg.align_steps, "focus": cfg.align_steps + cfg.joint_steps}
    offset = sample_offset + starts[stage] * cfg.batch
    types = tuple(t for t, w in cfg.focus_weights for _ in range(w)) if stage == "focus" else shapesqa.QUESTION_TYPES
    grid = cfg.image_size // cfg.patch_size
    word_ids = {w: tok(" " + w, add_special_tokens=False).input_ids for w in (*shapesqa.COLORS, *shapesqa.SHAPES)}
    # The projector's output is what the language model reads as image tokens;
    # a hook keeps it from the forward pass instead of encoding every image twice.
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: projected.append(out))
    t0, ema, ema_ground = time.perf_counter(), None, None
    model.train()
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, peak, cfg.warmup)
            if stage == "align":
                grow = step / max(1, cfg.curriculum_frac * steps)
                max_shapes = min(4, 1 + int(grow * 3))
            else:
                max_shapes = 4
            start = offset + step * cfg.batch
            batch = shapesqa.samples(shapesqa.TRAIN_SEED, cfg.batch, start=start, max_shapes=max_shapes, types=types)
            ids, labels, mask, pixels = _qa_batch(tok, processor, batch, n_img, image_token_id)
            projected.clear()
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
            loss = out.loss
            if pixels is not None and cfg.ground_weight > 0:
                ground = grounding_loss(projected[0], model.get_input_embeddings().weight.detach(), word_ids,
                                        [s.scene for s in batch if s.scene is not None], grid, cfg.ground_temperature)
                loss = loss + cfg.ground_weight * ground
                ema_ground = ground.item() if ema_ground is None else 0.95 * ema_ground + 0.05 * ground.item()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
            last = step == steps - 1
            if step % 100 == 0 or last:
                entry = {"stage": stage, "step": step, "loss": round(ema, 4), "max_shapes": max_shapes,
                         "seconds": round(time.perf_counter() - t0, 1)}
                if ema_ground is not None:
                    entry["ground_loss"] = round(ema_ground, 4)
                if (step and step % cfg.eval_every == 0) or last:
                    entry["heldout"] = heldout_accuracy(model, processor, cfg.eval_samples)
                log.append(entry)
                print(json.dumps(entry), flush=True)
    finally:
        hook.remove()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/shapes-llava", help="model folder to write")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick runs)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--stages", default="vision,align,joint,focus", help="comma-separated stages to run, in order")
    p.add_argument("--init", default=None, help="start from this model folder's weights (continue training)")
    p.add_argument("--joint-steps", type=int, default=None, help="override TrainConfig.joint_steps")
    p.add_argument("--sample-offset", type=int, default=0, help="skip this many training samples (a continued run sees new ones)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = TrainConfig()
    if args.scale != 1.0:
        cfg = replace(
            cfg,
            vision_steps=max(1, round(cfg.vision_steps * args.scale)),
            align_steps=max(1, round(cfg.align_steps * args.scale)),
            joint_steps=max(1, round(cfg.joint_steps * args.scale)),
            focus_steps=max(1, round(cfg.focus_steps * args.scale)),
            eval_every=max(1, round(cfg.eval_every * args.scale)),
        )
    if args.joint_steps is not None:
        cfg = replace(cfg, joint_steps=args.joint_steps)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = set(stages) - {"vision", "align", "joint", "focus"}
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from vision, align, joint, focus")
    random.seed(cfg.seed)
    tok, model, processor = build_model(cfg)
    if args.init is not None:
        from vllm_sab.demo.evaluate import load_transformers

        model.load_state_dict(load_transformers(args.init).state_dict())
        init_log_path = Path(args.init) / "train_log.json"
        init_log = json.loads(init_log_path.read_text()) if init_log_path.exists() else None
    else:
        init_log = None
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    _check_formatting(tok, processor, n_img, model.config.image_token_index)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocabulary {len(tok)}", flush=True)

    log: list = []
    t0 = time.perf_counter()
    if "vision" in stages:
        train_vision(model, processor, cfg, log)
    for stage in ("align", "joint", "focus"):
        if stage in stages:
            train_qa(model, tok, processor, cfg, log, stage=stage, sample_offset=args.sample_offset)
    minutes = (time.perf_counter() - t0) / 60

    out = Path(args.out)
    model = model.to(torch.float16).eval()
    save_vlm(model, out, arch="llava", processor=processor)
    # Final numbers from the float16 weights that ship, run in float32.
    final = heldout_accuracy(model.float(), processor, cfg.final_eval_samples)
    print(json.dumps({"final_heldout": final, "train_minutes": round(minutes, 1)}), flush=True)
    record = {"config": asdict(cfg), "stages": stages, "init": args.init, "sample_offset": args.sample_offset, "train_minutes": round(minutes, 1),
              "threads": args.threads, "final_heldout": final, "log": log}
    if init_log is not None:
        record["init_log"] = init_log  # how the starting model was made
    (out / "train_log.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
