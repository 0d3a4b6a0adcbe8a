"""The interface every binarization method implements, and the statistics it may use."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from vllm_sab.format import BinaryComponents, LayerProfile


@dataclass
class CalibrationStats:
    """Input statistics of one linear (or one fused group: they share the input).

    Accumulated by the pipeline's forward hooks over the calibration tokens of
    the layer's (already quantized-upstream) inputs ``x`` (``[tokens, K]``).
    All tensors are float32 on the compute device.

    Attributes:
        hessian: ``[K, K]`` ``H = (2 / n_tokens) * sum_t x_t x_t^T`` over the
            compensation token pool (GPTQ, arXiv 2210.17323 eq. 2; BiLLM and
            ARB-LLM use it for saliency and block error compensation).
        n_tokens: tokens behind ``hessian``.
        hessian_text: ``[K, K]`` the same over text tokens only, or None.
        hessian_visual: ``[K, K]`` the same over visual (image) tokens only, or None.
        n_text: tokens behind ``hessian_text``.
        n_visual: tokens behind ``hessian_visual``.
        sample_energy_sum: ``[K]`` ``sum_z e_z`` over calibration samples ``z``
            of the per-sample column energy ``e_z[j] = mean_t x_{z,t,j}^2``, or None.
        sample_energy_sq: ``[K]`` ``sum_z e_z^2``, or None. With
            ``sample_energy_sum`` it gives the Hoyer sparsity of every weight's
            per-sample significance ``h_ij(z) = w_ij^2 e_z[j]`` without storing
            a per-sample tensor (SAB-LVLM, arXiv 2607.01876, spatial significance map).
        n_samples: number of calibration samples ``z``.
    """

    hessian: torch.Tensor
    n_tokens: int
    hessian_text: torch.Tensor | None = None
    hessian_visual: torch.Tensor | None = None
    n_text: int = 0
    n_visual: int = 0
    sample_energy_sum: torch.Tensor | None = None
    sample_energy_sq: torch.Tensor | None = None
    n_samples: int = 0


@dataclass(frozen=True)
class MethodOptions:
    """The options of a method family: one frozen dataclass, checked when built.

    Each method family declares one subclass (its fields are the ``--option KEY=VALUE``
    keys it accepts, in order; a family that refines another inherits its fields) and
    names it as its method's ``Options``. Values are checked in ``__post_init__``, base
    class first, so an out-of-range option fails before any weight is read; a check may
    normalize a value (e.g. fill in a default that depends on ``block_size``).

    Attributes:
        block_size: input columns per scale block (multiple of 32).

    Raises:
        FormatError: a bad ``block_size``.
    """

    block_size: int = 128

    def __post_init__(self) -> None:
        LayerProfile(block_size=self.block_size)  # validates

    @classmethod
    def names(cls) -> list[str]:
        """The option keys a caller may pass, in declaration order (fields fixed by the family excluded)."""
        return [f.name for f in fields(cls) if f.init]

    def _set(self, name: str, value: Any) -> None:
        """Normalize one field inside ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)


class Method:
    """Base class of a binarization method.

    Subclasses set ``name`` (the ``--method`` value), ``needs_stats`` (whether
    :meth:`quantize` needs :class:`CalibrationStats`; data-free methods do not,
    and the pipeline then skips calibration forwards), optionally
    ``default_token_pool``, and implement
    :meth:`quantize`. A method sees one weight matrix at a time (a fused group
    is passed stacked along rows) and returns format v1 components; it never
    touches modules, hooks or files.

    A method's options are one :class:`MethodOptions` subclass, its ``Options``:
    construct with keywords (``SABMethod(block_size=64, significance="modality")``,
    checked by ``Options``) or with a built options object (``SABMethod(opts)``). Every
    option is then also an attribute of the method (``self.block_size``), and the object
    is ``self.options``.

    Args:
        options: a built ``Options``, or None to build one from ``kwargs``.
        kwargs: the options as keywords (see ``Options``).

    Raises:
        TypeError: ``options`` is not this method's ``Options``, or given with ``kwargs``;
            an unknown keyword.
        ValueError, FormatError: an option out of range (from ``Options``).
    """

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    #: The calibration token pool used when the caller does not choose one
    #: (``sab-calibrate --token-pool``): ``"all"``, ``"text"`` or ``"atv"``.
    default_token_pool: ClassVar[str] = "all"
    #: This method family's options (the ``--option`` keys it accepts).
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs or not isinstance(options, self.Options):
            raise TypeError(
                f"{type(self).__name__} takes one {self.Options.__name__} or keyword options, "
                f"got {options!r} and {sorted(kwargs)}"
            )
        self.options = options
        # Methods read their options as attributes (self.percdamp); copied once, the options are frozen.
        for f in fields(options):
            setattr(self, f.name, getattr(options, f.name))
        #: Extra fields of the last :meth:`quantize` call for its layer's report entry
        #: (e.g. ``{"percdamp": d}``, the damping actually used after retries); the
        #: pipeline clears it before each call and copies it into ``sab_report.json``.
        self.last_report: dict[str, Any] = {}

    def quantize(self, weight: torch.Tensor, stats: CalibrationStats | None = None) -> BinaryComponents:
        """Binarize ``weight`` (float32 ``[N, K]``, K a multiple of ``block_size``).

        Args:
            weight: float32 ``[N, K]`` on the compute device.
            stats: input statistics (required when ``needs_stats``).

        Returns:
            Format v1 components (stored column order) whose
            ``vllm_sab.format.compose`` is the quantized weight.
        """
        raise NotImplementedError
