"""Resumable calibration: finished layers are kept in ``<output>.partial`` until the checkpoint is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from vllm_sab import format as fmt

__all__ = ["Partial", "ResumeError"]

_SETTINGS = "settings.json"

#: What a differing setting means, for the ResumeError message.
_EXPLAIN = {
    "data_fingerprint": "the calibration samples (as encoded for the model) are not the ones the "
    "interrupted run used, and finished layers were calibrated on those",
    "vllm_sab_version": "the interrupted run was made by another vllm-sab version",
}


class ResumeError(ValueError):
    """``--resume`` found a partial run made with different settings."""


class Partial:
    """Per-layer results of an interrupted run (a folder next to the output).

    Layout: ``settings.json`` (the run's settings; a resume must match them),
    and per finished decoder layer ``<layer>.safetensors`` (its packed format
    v1 tensors) plus ``<layer>.json`` (reports and profiles), the JSON written
    last so a layer counts as finished only when both are complete.

    Args:
        folder: ``<output>.partial`` (created when the first layer finishes;
            kept if the run fails later, removed when the checkpoint is written).
        settings: JSON-serialisable settings of the run.
        resume: reuse an existing folder with equal settings; otherwise any
            existing folder is cleared.

    Raises:
        ResumeError: ``resume`` and the folder's settings differ (the message
            lists the differing keys).
    """

    def __init__(self, folder: Path, settings: dict[str, Any], resume: bool):
        self.folder = folder
        settings = json.loads(json.dumps(settings))
        path = folder / _SETTINGS
        if resume and path.is_file():
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                why = "".join(f"; {_EXPLAIN[k]}" for k in diff if k in _EXPLAIN)
                raise ResumeError(
                    f"{folder}: cannot resume, settings differ in {', '.join(diff)}{why} "
                    "(run without --resume to start over)"
                )
        elif folder.exists():
            shutil.rmtree(folder)
        self.settings = settings

    def _ensure(self) -> None:
        # Created on the first finished layer only, so a run that fails early
        # (bad input) leaves nothing behind.
        if not (self.folder / _SETTINGS).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / _SETTINGS).write_text(json.dumps(self.settings, indent=1))

    def save(self, layer: str, items: list[dict[str, Any]]) -> None:
        """Record a finished layer: ``items`` of ``{"report", "profile", "tensors"}``."""
        self._ensure()
        tensors = {f"{i}.{s}": t.contiguous().cpu() for i, it in enumerate(items) for s, t in it["tensors"].items()}
        save_file(tensors, str(self.folder / f"{layer}.safetensors"))
        meta = [
            {"report": it["report"], "profile": it["profile"].to_dict() if it["profile"] is not None else None}
            for it in items
        ]
        tmp = self.folder / f"{layer}.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.folder / f"{layer}.json")

    def load(self, layer: str) -> list[dict[str, Any]] | None:
        """The items of a finished layer, or None if it was not finished."""
        meta_path = self.folder / f"{layer}.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        flat = load_file(str(self.folder / f"{layer}.safetensors"))
        items = []
        for i, m in enumerate(meta):
            tensors = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(i)}
            profile = fmt.LayerProfile.from_dict(m["profile"]) if m["profile"] is not None else None
            items.append({"report": m["report"], "profile": profile, "tensors": tensors})
        return items

    @property
    def started(self) -> bool:
        """Whether at least one layer was recorded."""
        return (self.folder / _SETTINGS).is_file()

    def remove(self) -> None:
        """Delete the folder (after the checkpoint is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
