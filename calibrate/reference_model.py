"""Load a sab checkpoint into a dense transformers model (reference and evaluation path).

Every quantized linear gets ``W_hat`` from :func:`vllm_sab.format.dequantize`,
so the model computes exactly what the packed checkpoint encodes. Tests compare
vLLM serving the packed checkpoint against this model token by token.
:func:`load_native` runs the quantized linears on the native CPU kernels instead
(the kernels vLLM CPU serves with, int8 decode included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_sab import format as fmt

from .models import adapter_for


def _read_checkpoint(
    model_dir: Path, qc: fmt.SabQuantizationConfig
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The tensors of a sab checkpoint's ``*.safetensors``, split by ``qc``.

    Returns:
        ``(other, packed)``: ``other`` maps checkpoint keys of the tensors that are not
        format-v1 tensors of a quantized module (embeddings, norms, vision tower) to
        themselves, as stored; ``packed`` maps each quantized module's checkpoint name to
        ``{suffix: tensor}`` (``format.ALL_SUFFIXES``).
    """
    other: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                mod, _, suffix = key.rpartition(".")
                if mod in qc.modules and suffix in fmt.ALL_SUFFIXES:
                    packed.setdefault(mod, {})[suffix] = fh.get_tensor(key)
                else:
                    other[key] = fh.get_tensor(key)
    return other, packed


def load_dequantized(model_dir: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the transformers model of a sab checkpoint with dequantized dense weights.

    Args:
        model_dir: a sab checkpoint folder (``config.json`` + ``*.safetensors``).
        dtype: dtype of the returned model (default: the checkpoint's ``dtype``
            / ``torch_dtype``, else float32). ``W_hat`` is computed in float32
            and cast.

    Returns:
        The model in eval mode on CPU, with the folder's ``generation_config.json``
        (stop tokens) when it has one.

    Raises:
        FormatError: the checkpoint is not valid format v1.
        ValueError: a tensor of the model is missing from the checkpoint.
    """
    return _build(Path(model_dir), dtype)[0]


def _build(model_dir: Path, dtype: torch.dtype | None):
    """:func:`load_dequantized`'s model, with what it read: ``(model, qc, adapter, packed)``
    (``packed``: ``{checkpoint module name: {suffix: tensor}}``), so :func:`load_native`
    reads and validates the checkpoint once."""
    import transformers

    qc = fmt.validate_checkpoint(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**raw)
    adapter = adapter_for(model_dir, config)
    if dtype is None:
        name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) else torch.float32
    cls = getattr(transformers, config.architectures[0])

    state, packed = _read_checkpoint(model_dir, qc)
    state = {adapter.memory_name(key): t.to(dtype) for key, t in state.items()}
    for mod, tensors in packed.items():
        w_hat = fmt.dequantize(tensors, qc.profile_of(mod), where=mod).to(dtype)
        state[adapter.memory_name(f"{mod}.weight")] = w_hat

    # Built on CPU, not on the meta device: non-persistent buffers (rotary
    # inv_freq) are computed in __init__ and would stay on meta.
    model = cls(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if (model_dir / "generation_config.json").is_file():
        # The checkpoint's stop tokens (e.g. Qwen's [im_end, endoftext]); vLLM
        # reads them too, so greedy generation ends at the same token in both.
        model.generation_config = transformers.GenerationConfig.from_pretrained(model_dir)
    return model.to(dtype).eval(), qc, adapter, packed


def load_native(model_dir: str | Path, config=None, max_rows: int | None = None) -> torch.nn.Module:
    """:func:`load_dequantized` (float32), with every quantized linear computed by the native
    CPU kernels on the checkpoint's packed tensors (``vllm_sab.kernels.cpu.cpu_linear``).

    With the default ``config`` the calls take the paths vLLM CPU takes for the same number
    of tokens (prefill tiles, decode kernels, the int8 decode at M <= 2), so greedy tokens
    can be compared with vLLM's.

    Args:
        model_dir: a sab checkpoint folder.
        config: a ``CpuKernelConfig`` (default: the kernels' default, read at each call).
        max_rows: if set, each call is split into chunks of at most this many token rows
            (e.g. 16 with ``int8_decode_max_m=16``: every row on the int8 decode).

    Raises:
        FormatError: the checkpoint is not valid format v1.
        ValueError: a quantized module is missing from the model or is not an ``nn.Linear``.
        RuntimeError: (at the first forward) the native kernels are not built.
    """
    from vllm_sab.kernels import cpu

    model_dir = Path(model_dir)
    model, qc, adapter, packed = _build(model_dir, torch.float32)
    for mod, tensors in packed.items():
        name = adapter.memory_name(f"{mod}.weight").removesuffix(".weight")
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{model_dir}: {mod} is not a linear layer of the model ({type(linear).__name__})")
        tensors = {suffix: t.contiguous() for suffix, t in tensors.items()}
        profile = qc.profile_of(mod)

        def forward(x, tensors=tensors, profile=profile, bias=linear.bias):
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            step = max_rows or max(flat.shape[0], 1)
            y = torch.cat([cpu.cpu_linear(flat[i : i + step], tensors, profile, config=config)
                           for i in range(0, max(flat.shape[0], 1), step)])
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y + bias if bias is not None else y

        linear.forward = forward
    return model
