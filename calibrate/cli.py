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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 on a user error, with a one-line message)."""
    from . import calibrate
    from .models import UnsupportedArchitectureError
    from .writer import OutputExistsError
    from vllm_sab.format import FormatError

    args = build_parser().parse_args(argv)
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
        )
    except (OutputExistsError, UnsupportedArchitectureError, FormatError, ValueError, OSError) as e:
        print(f"sab-calibrate: error: {e}", file=sys.stderr)
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
