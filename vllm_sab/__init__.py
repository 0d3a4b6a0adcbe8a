"""vllm-sab: near-1-bit weight binarization for vision-language models, served by vLLM.

Parts (data flows one way):

- ``vllm_sab.calibrate`` (repo folder ``calibrate/``): binarizes a Hugging Face
  VLM and writes a packed checkpoint (``sab-calibrate``).
- ``vllm_sab.format``: the packed checkpoint format (single owner of the layout;
  ``layout``, ``codec`` and its Triton twin ``codec_jit``, ``checkpoint``).
- ``vllm_sab.config`` / ``vllm_sab.linear_method`` / ``vllm_sab.ops``: the vLLM
  plugin (``--quantization sab``), registered by :func:`register` through the
  ``vllm.general_plugins`` entry point.
- ``vllm_sab.kernels`` (repo folder ``kernels/``): Triton and torch GEMV/GEMM.
- ``vllm_sab.demo``: the shipped demo model's task (ShapesQA) and ``sab-eval``;
  optional, never imported by :func:`register`.

``docs/architecture.md`` says which module owns what. Importing this package
does not import vLLM.
"""

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """Register the ``sab`` quantization method, its custom op and the pruned-LLaVA architecture with vLLM.

    The architecture ``SabPrunedLlavaForConditionalGeneration``
    (:mod:`vllm_sab.llava_pruned`, visual-token pruning) is registered lazily
    by name, so its module is imported only when a model selects it.

    Called by vLLM in every process (front end, engine core, workers) through
    the ``vllm.general_plugins`` entry point; idempotent.

    Raises:
        ImportError: if vLLM is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry

    from . import config, ops  # noqa: F401  (decorators register on import)
    from .token_pruning import VLLM_ARCHITECTURE

    ModelRegistry.register_model(VLLM_ARCHITECTURE, "vllm_sab.llava_pruned:SabPrunedLlavaForConditionalGeneration")

    _REGISTERED = True
