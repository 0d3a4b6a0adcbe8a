"""``sab-calibrate``: command-line front end of :func:`vllm_sab.calibrate.calibrate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .methods import METHODS
from .writer import REPORT_NAME


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog="sab-calibrate",
        description="Binarize a vision-language model (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) into a "
        "packed sab checkpoint that `vllm serve OUT --quantization sab` serves.",
    )
    p.add_argument("--model", required=True, help="local folder or Hugging Face id of the full-precision model")
    p.add_argument("--output", required=True, help="checkpoint folder to create (written atomically)")
    p.add_argument("--method", default="sign", choices=sorted(METHODS), help="binarization method")
    p.add_argument("--block-size", type=int, default=128, help="input columns per scale block (multiple of 32)")
    p.add_argument("--quantize-vision", action="store_true", help="also binarize the vision tower and projector")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
        help="dtype of the tensors kept unquantized",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    data = p.add_argument_group("calibration data (methods that use Hessians)")
    data.add_argument(
        "--data", default=None,
        help="required by every method but sign: a .jsonl file of {image, text | conversations}, a Hugging Face "
        "datasets name or saved folder with image and text columns, or 'builtin' (the offline synthetic "
        "ShapesQA samples: for models/shapes-llava and tests only)",
    )
    data.add_argument("--image-root", default=None, help="folder that relative image paths in a JSONL file or dataset refer to")
    data.add_argument("--split", default="train", help="Hugging Face dataset: the split to draw from (default: train)")
    data.add_argument(
        "--image-column", default="image",
        help="Hugging Face dataset: the image column (default: image; 'none' for text-only data)",
    )
    data.add_argument(
        "--text-column", default=None,
        help="Hugging Face dataset: the prompt or conversation column (default: the first of "
        "conversations, messages, text, question, caption, prompt that exists)",
    )
    data.add_argument("--num-samples", type=int, default=128, help="calibration samples")
    data.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sample at most (image tokens are never cut)")
    data.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    data.add_argument("--skip-bad-samples", action="store_true", help="skip missing/corrupt samples (counted) instead of failing")
    data.add_argument(
        "--token-pool", default=None, choices=["all", "text", "atv"],
        help="tokens of the compensation Hessian: all, text only, or ATV-Pruning's text + drift-selected visual tokens "
             "(default: atv for atv-prune and atv-prune+sab, all otherwise)",
    )
    data.add_argument("--atv-alpha", type=float, default=1.0, help="ATV pool: visual share multiplier alpha")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="method option (repeatable), e.g. --option percdamp=0.01 --option salient_columns=4",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (finished layers are not recomputed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse_options(items: list[str]) -> dict:
    """``["k=v", ...]`` -> ``{k: v}`` with v parsed as JSON when possible (numbers, true/false, null)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 on a user error, with a one-line message)."""
    from . import calibrate
    from .methods.hessian import HessianError
    from .models import UnsupportedArchitectureError
    from .writer import OutputExistsError
    from vllm_sab.format import FormatError

    args = build_parser().parse_args(argv)
    try:
        options = _parse_options(args.option)
    except ValueError as e:
        print(f"sab-calibrate: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = calibrate(
            args.model,
            args.output,
            method=args.method,
            block_size=args.block_size,
            quantize_vision=args.quantize_vision,
            device=args.device,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            data=args.data,
            num_samples=args.num_samples,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            skip_bad_samples=args.skip_bad_samples,
            image_root=args.image_root,
            split=args.split,
            image_column=None if args.image_column.lower() == "none" else args.image_column,
            text_column=args.text_column,
            token_pool=args.token_pool,
            atv_alpha=args.atv_alpha,
            method_options=options,
            resume=args.resume,
        )
    except (OutputExistsError, UnsupportedArchitectureError, FormatError, ValueError, OSError,
            HessianError, FloatingPointError) as e:
        # User errors (bad input, data or settings; a layer the data cannot calibrate): the
        # message names the file, layer or option. Anything else is a bug and keeps its traceback.
        message = " ".join(str(e).splitlines())
        print(f"sab-calibrate: error: {message}", file=sys.stderr)
        return 2
    summary = json.loads((out / REPORT_NAME).read_text())["summary"]
    print(
        f"{out}: {summary['quantized_linears']} linears, "
        f"{summary['true_bits_per_weight']:.3f} true bits/weight "
        f"(papers' convention: {summary['paper_weight_bits']:.3f}), "
        f"{summary['checkpoint_tensor_bytes'] / 1e6:.1f} MB of tensors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
