"""Checkpoint level of sab packed format v1: ``quantization_config`` and safetensors headers.

The ``quantization_config`` of ``config.json`` (:class:`SabQuantizationConfig`,
listing every quantized module with its :class:`~vllm_sab.format.layout.LayerProfile`
and shape), reading it (:func:`load_quantization_config`), the safetensors header
reader (:func:`read_safetensors_headers`) and the whole-checkpoint check from
headers only (:func:`validate_checkpoint`), built on
:func:`vllm_sab.format.layout.validate`. ``docs/format.md`` sections 1 and 5 are its
specification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from vllm_sab.format.layout import (
    ALL_SUFFIXES,
    FORMAT_VERSION,
    QUANT_METHOD,
    SUPPORTED_FORMAT_VERSIONS,
    FormatError,
    LayerProfile,
    tensor_specs,
    validate,
)

# ---------------------------------------------------------------------------------------
# Checkpoint-level config (config.json "quantization_config")
# ---------------------------------------------------------------------------------------
@dataclass
class QuantizedModule:
    """One quantized linear as listed in ``quantization_config.modules``."""

    profile: str
    shape: tuple[int, int]


@dataclass
class SabQuantizationConfig:
    """The ``quantization_config`` of a sab checkpoint (format v1).

    Attributes:
        profiles: ``{profile name: LayerProfile}``.
        modules: ``{checkpoint module name: QuantizedModule}``: the explicit
            list of quantized linears, in checkpoint (Hugging Face) naming.
            Every other linear is stored unquantized.
        method: calibration method that produced the checkpoint (informational).
        extra: other informational keys, kept on round trip.
    """

    profiles: dict[str, LayerProfile]
    modules: dict[str, QuantizedModule]
    method: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for ``config.json``."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "profiles": {name: p.to_dict() for name, p in self.profiles.items()},
            "modules": {
                name: {"profile": m.profile, "shape": list(m.shape)} for name, m in self.modules.items()
            },
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "quantization_config") -> "SabQuantizationConfig":
        """Parse and check a ``quantization_config`` dict.

        Raises:
            FormatError: wrong ``quant_method``, unknown ``format_version``,
                unknown profile reference, bad shapes; naming ``where``.
        """
        qm = str(d.get("quant_method", "")).lower()
        if qm != QUANT_METHOD:
            raise FormatError(f"{where}: quant_method is {d.get('quant_method')!r}, expected 'sab'")
        version = d.get("format_version")
        if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"{where}: unknown format_version {version!r}; this vllm-sab reads "
                f"{list(SUPPORTED_FORMAT_VERSIONS)} (upgrade vllm-sab for newer checkpoints)"
            )
        raw_profiles = d.get("profiles")
        raw_modules = d.get("modules")
        if not isinstance(raw_profiles, Mapping) or not isinstance(raw_modules, Mapping):
            raise FormatError(f"{where}: needs 'profiles' and 'modules' mappings")
        profiles = {
            name: LayerProfile.from_dict(p, f"{where}.profiles.{name}") for name, p in raw_profiles.items()
        }
        modules = {}
        for name, m in raw_modules.items():
            if not isinstance(m, Mapping) or not isinstance(m.get("profile"), str) or m["profile"] not in profiles:
                raise FormatError(
                    f"{where}.modules.{name}: profile {m.get('profile') if isinstance(m, Mapping) else m!r} "
                    f"is not one of {sorted(profiles)}"
                )
            shape = m.get("shape")
            if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
                raise FormatError(f"{where}.modules.{name}: 'shape' must be [N, K], got {shape!r}")
            try:
                tensor_specs(profiles[m["profile"]], shape[0], shape[1])
            except FormatError as e:
                raise FormatError(f"{where}.modules.{name}: {e}") from None
            modules[name] = QuantizedModule(m["profile"], (shape[0], shape[1]))
        known = {"quant_method", "format_version", "method", "profiles", "modules"}
        extra = {key: v for key, v in d.items() if key not in known}
        return cls(profiles, modules, str(d.get("method", "unknown")), extra)

    def profile_of(self, module: str) -> LayerProfile:
        """Profile of a quantized module (checkpoint name). Raises KeyError if not quantized."""
        return self.profiles[self.modules[module].profile]


def read_safetensors_headers(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, safetensors dtype string)}`` of all ``*.safetensors`` in a folder.

    Reads only the JSON headers (cheap even for a 72B checkpoint).

    Raises:
        FormatError: no safetensors file in ``model_dir``, or an unreadable header.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir}: no *.safetensors file")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as e:
            raise FormatError(f"{f}: unreadable safetensors header ({e})") from None
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (tuple(info["shape"]), info["dtype"])
    return out


def load_quantization_config(model_dir: str | Path) -> SabQuantizationConfig:
    """Read and parse ``config.json``'s ``quantization_config`` of a sab checkpoint.

    Raises:
        FormatError: missing config.json or quantization_config, or invalid content.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: not found")
    cfg = json.loads(path.read_text())
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if qc is None:
        raise FormatError(f"{path}: no quantization_config (not a sab checkpoint)")
    return SabQuantizationConfig.from_dict(qc, f"{path}:quantization_config")


def validate_checkpoint(model_dir: str | Path) -> SabQuantizationConfig:
    """Check a sab checkpoint folder from its config and safetensors headers.

    Every module of ``quantization_config.modules`` must have exactly the
    tensors of its profile with the right dtypes and shapes, and no leftover
    dense ``.weight``.

    Returns:
        The parsed config.

    Raises:
        FormatError: naming the file, module and tensor at fault.
    """
    qc = load_quantization_config(model_dir)
    headers = read_safetensors_headers(model_dir)
    by_module: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for name, info in headers.items():
        mod, _, suffix = name.rpartition(".")
        if suffix in ALL_SUFFIXES:
            by_module.setdefault(mod, {})[suffix] = info
    for mod, entry in qc.modules.items():
        tensors = by_module.pop(mod, {})
        if f"{mod}.weight" in headers:
            raise FormatError(f"{model_dir}: {mod} is listed as quantized but stores a dense '{mod}.weight'")
        validate(tensors, qc.profiles[entry.profile], *entry.shape, where=f"{model_dir}: {mod}")
    if by_module:
        stray = sorted(by_module)[0]
        raise FormatError(
            f"{model_dir}: {stray} stores sab tensors {sorted(by_module[stray])} but is not listed "
            "in quantization_config.modules"
        )
    return qc
