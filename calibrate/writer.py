"""Write a sab checkpoint folder atomically.

The checkpoint is built in a temporary sibling folder and renamed into place
only when complete, so a failed or killed calibration never leaves a
half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import save_torch_state_dict

from vllm_sab import format as fmt

CONFIG_NAME = "config.json"
REPORT_NAME = "sab_report.json"


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Resolve the output path and refuse an existing one unless ``overwrite``.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
    """
    out = Path(output).resolve()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: output already exists (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_output(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``output`` on success, vanishes on failure.

    Raises:
        OutputExistsError: see :func:`check_output`.
    """
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    quant_config: fmt.SabQuantizationConfig | None,
    report: dict[str, Any],
    max_shard_size: str = "5GB",
) -> None:
    """Write tensors, ``config.json`` (with ``quantization_config``) and the report.

    Args:
        folder: an empty folder (normally from :func:`atomic_output`).
        state_dict: every tensor of the checkpoint, quantized modules already
            replaced by their format v1 tensors (``<module>.<suffix>``).
        config: the model's ``config.json`` content (no quantization_config yet).
        quant_config: the sab quantization config, or None for a dense checkpoint
            (e.g. pruned weights, which stock vLLM serves).
        report: ``sab_report.json`` content.
        max_shard_size: safetensors shard size limit.

    Raises:
        FormatError: a quantized module's tensors do not follow format v1.
    """
    modules = quant_config.modules if quant_config is not None else {}
    for name, entry in modules.items():
        tensors = {s: state_dict[f"{name}.{s}"] for s in fmt.ALL_SUFFIXES if f"{name}.{s}" in state_dict}
        fmt.validate(tensors, quant_config.profiles[entry.profile], *entry.shape, where=name)
    save_torch_state_dict(
        {k: v.contiguous() for k, v in state_dict.items()},
        folder,
        max_shard_size=max_shard_size,
        metadata={"format": "pt", "sab_format_version": str(fmt.FORMAT_VERSION)},
    )
    config = dict(config)
    if quant_config is not None:
        config["quantization_config"] = quant_config.to_dict()
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
