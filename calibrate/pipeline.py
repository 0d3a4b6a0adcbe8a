"""The calibration pipeline: load a VLM, binarize its linears layer by layer, write the checkpoint.

Flow: :func:`calibrate` resolves the architecture adapter and the method, loads
the model on CPU, then walks the language model's decoder layers in order
(each moved to the compute device only while it is processed), quantizes each
fused group of linears with the method, packs the result into format v1
tensors and finally writes the checkpoint atomically with a per-layer report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_sab import format as fmt

from .methods import get_method
from .models import adapter_for, fused_groups
from .writer import atomic_output, check_output, write_checkpoint

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def calibrate(
    model: str | Path,
    output: str | Path,
    *,
    method: str = "sign",
    block_size: int = 128,
    quantize_vision: bool = False,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Binarize a Hugging Face VLM and write a sab checkpoint.

    Args:
        model: local folder or hub id of a LLaVA-1.5, Qwen2-VL or Qwen2.5-VL model.
        output: checkpoint folder to create (written atomically).
        method: binarization method name (see ``vllm_sab.calibrate.methods.METHODS``).
        block_size: input columns per scale block (multiple of 32).
        quantize_vision: also binarize the vision tower and projector/merger
            (linears whose K is not a multiple of ``block_size`` stay dense, with a warning).
        device: compute device for the per-layer work (default: CUDA if available).
        dtype: dtype of the unquantized tensors: ``auto`` (the model's), ``float16``,
            ``bfloat16`` or ``float32``.
        overwrite: replace an existing ``output``.
        progress: show a progress bar over layers.

    Returns:
        The output folder.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        UnsupportedArchitectureError: the model type is not supported.
        ValueError: unknown method or dtype; the model is already quantized.
        FormatError: a language-model linear has K not a multiple of ``block_size``.
    """
    t0 = time.time()
    check_output(output, overwrite)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    adapter = adapter_for(model)
    quantizer = get_method(method, block_size=block_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    hf = adapter.load(model, _DTYPES[dtype]).eval()
    if getattr(hf.config, "quantization_config", None):
        raise ValueError(f"{model}: already quantized (config.json has a quantization_config)")
    state = hf.state_dict()

    work: list[tuple[nn.Module | None, list[list[tuple[str, nn.Linear]]]]] = []
    for layer_name, layer in adapter.layers(hf):
        linears = {f"{layer_name}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for name, lin in linears.items():
            if lin.in_features % block_size:
                raise fmt.FormatError(
                    f"{name}: K={lin.in_features} is not a multiple of block_size={block_size}; "
                    "pass a --block-size that divides every decoder linear's input size"
                )
        work.append((layer, [[(n, linears[n]) for n in g] for g in fused_groups(linears)]))
    if quantize_vision:
        vision = adapter.vision_linears(hf)
        kept = {}
        for name, lin in vision.items():
            if lin.in_features % block_size:
                logger.warning("%s: K=%d is not a multiple of %d; kept dense", name, lin.in_features, block_size)
            else:
                kept[name] = lin
        work.append((None, [[(n, kept[n]) for n in g] for g in fused_groups(kept)]))

    profiles: dict[str, fmt.LayerProfile] = {}
    modules: dict[str, fmt.QuantizedModule] = {}
    layer_reports: list[dict[str, Any]] = []
    bar = tqdm(work, desc=f"sab {method}", unit="layer", disable=not progress)
    for layer, groups in bar:
        if layer is not None:
            layer.to(device)
        for group in groups:
            weight = torch.cat([lin.weight.detach().to(device, torch.float32) for _, lin in group])
            sizes = [lin.out_features for _, lin in group]
            parts = quantizer.quantize(weight).split_rows(sizes)
            for (name, lin), comp, w in zip(group, parts, weight.split(sizes)):
                tensors = fmt.pack(comp, where=name)
                rel_err = float((w - fmt.compose(comp)).norm() / w.norm().clamp_min(1e-30))
                if not torch.isfinite(torch.tensor(rel_err)):
                    raise FloatingPointError(f"{name}: non-finite reconstruction (NaN/Inf in weights?)")
                p = comp.profile
                profiles[p.key] = p
                modules[adapter.checkpoint_name(name)] = fmt.QuantizedModule(p.key, comp.shape)
                del state[f"{name}.weight"]
                state.update({f"{adapter.checkpoint_name(name)}.{s}": t.cpu() for s, t in tensors.items()})
                n, k = comp.shape
                layer_reports.append(
                    {
                        "name": adapter.checkpoint_name(name),
                        "shape": [n, k],
                        "profile": p.key,
                        "true_bits_per_weight": fmt.true_bits_per_weight(p, n, k),
                        "paper_weight_bits": fmt.paper_weight_bits(p),
                        "rel_error": rel_err,
                    }
                )
        if layer is not None:
            layer.to("cpu")

    state = {adapter.checkpoint_name(k): v for k, v in state.items()}
    quant_config = fmt.SabQuantizationConfig(profiles, modules, method=method, extra={"block_size": block_size})
    report = _report(model, method, layer_reports, state, time.time() - t0)
    with atomic_output(output, overwrite) as tmp:
        hf.config.architectures = [type(hf).__name__]
        write_checkpoint(tmp, state, hf.config.to_diff_dict(), quant_config, report)
        _save_processor(model, hf, tmp)
    out = Path(output).resolve()
    logger.info(
        "wrote %s: %d quantized linears, %.3f true bits/weight, %.1f MB",
        out,
        len(modules),
        report["summary"]["true_bits_per_weight"],
        report["summary"]["checkpoint_tensor_bytes"] / 1e6,
    )
    return out


def _report(model, method, layers, state, seconds) -> dict[str, Any]:
    n_weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
    bits = sum(r["true_bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers)
    paper = sum(r["paper_weight_bits"] * r["shape"][0] * r["shape"][1] for r in layers)
    seen: set[int] = set()
    total = 0
    for t in state.values():
        if t.data_ptr() not in seen:  # tied tensors are stored once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {
        "source_model": str(model),
        "method": method,
        "format_version": fmt.FORMAT_VERSION,
        "summary": {
            "quantized_linears": len(layers),
            "quantized_weights": n_weights,
            "true_bits_per_weight": bits / max(n_weights, 1),
            "paper_weight_bits": paper / max(n_weights, 1),
            "quantized_bytes": bits / 8,
            "fp16_bytes_of_quantized": n_weights * 2,
            "checkpoint_tensor_bytes": total,
            "calibration_seconds": seconds,
        },
        "layers": layers,
    }


def _save_processor(model: str | Path, hf: nn.Module, folder: Path) -> None:
    """Copy processor/tokenizer and generation config so the checkpoint is self-contained."""
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(str(model)).save_pretrained(folder)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(folder)
