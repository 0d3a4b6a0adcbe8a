"""The interface every binarization method implements."""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm_sab.format import BinaryComponents, LayerProfile


class Method:
    """Base class of a binarization method.

    Subclasses set ``name`` and implement :meth:`quantize`. A method sees one
    weight matrix at a time (a fused group is passed stacked along rows) and
    returns format v1 components; it never touches modules, hooks or files.

    Args:
        block_size: input columns per scale block (multiple of 32).
    """

    name: ClassVar[str] = ""

    def __init__(self, block_size: int = 128) -> None:
        LayerProfile(block_size=block_size)  # validates
        self.block_size = block_size

    def quantize(self, weight: torch.Tensor) -> BinaryComponents:
        """Binarize ``weight`` (float32 ``[N, K]``, K a multiple of ``block_size``)."""
        raise NotImplementedError
