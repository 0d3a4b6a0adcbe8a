"""sab packed checkpoint format, version 1: the single owner of the bit layout.

Everything that knows how a binarized linear layer is stored lives in this
package, one seam per module (``docs/format.md`` is the prose specification):

* :mod:`~vllm_sab.format.layout`: tensor names, shapes, dtypes and the
  summary of the layout and the dequantization formula (:class:`LayerProfile`,
  :func:`tensor_specs`), true bits per weight, :func:`validate`;
* :mod:`~vllm_sab.format.codec`: :class:`BinaryComponents`, :func:`pack`,
  :func:`unpack`, :func:`compose`, :func:`dequantize`, the permutation's gather
  indices and :func:`flat_layer` (the reference implementation);
* :mod:`~vllm_sab.format.codec_jit`: the codec's Triton twin (imported only
  where Triton is wanted, never from here);
* :mod:`~vllm_sab.format.checkpoint`: ``quantization_config``
  (:class:`SabQuantizationConfig`), the safetensors header reader and
  :func:`validate_checkpoint`.

Callers import the names from here (``from vllm_sab import format as fmt``;
``fmt.pack``, ``fmt.LayerProfile``); the submodules are where they are defined.
"""

from vllm_sab.format.checkpoint import (
    QuantizedModule,
    SabQuantizationConfig,
    load_quantization_config,
    read_safetensors_headers,
    validate_checkpoint,
)
from vllm_sab.format.codec import (
    BinaryComponents,
    compose,
    dequantize,
    flat_layer,
    inverse_column_index,
    pack,
    stored_column_index,
    unpack,
    zone_of,
)
from vllm_sab.format.layout import (
    ALL_SUFFIXES,
    COL_SCALE,
    FORMAT_VERSION,
    MAX_ZONE_BITS,
    OFFSET,
    PACKED,
    PERM,
    QUANT_METHOD,
    RESIDUAL,
    SAFETENSORS_DTYPE,
    SCALE,
    SCALE_DTYPES,
    SUPPORTED_FORMAT_VERSIONS,
    WORD_BITS,
    ZONE,
    FormatError,
    LayerProfile,
    TensorSpec,
    bits_by_tensor,
    paper_weight_bits,
    tensor_specs,
    true_bits_per_weight,
    validate,
)

__all__ = [
    "ALL_SUFFIXES", "COL_SCALE", "FORMAT_VERSION", "MAX_ZONE_BITS", "OFFSET", "PACKED", "PERM",
    "QUANT_METHOD", "RESIDUAL", "SAFETENSORS_DTYPE", "SCALE", "SCALE_DTYPES", "SUPPORTED_FORMAT_VERSIONS",
    "WORD_BITS", "ZONE",
    "FormatError", "LayerProfile", "TensorSpec", "bits_by_tensor", "paper_weight_bits", "tensor_specs",
    "true_bits_per_weight", "validate",
    "BinaryComponents", "compose", "dequantize", "flat_layer", "inverse_column_index", "pack",
    "stored_column_index", "unpack", "zone_of",
    "QuantizedModule", "SabQuantizationConfig", "load_quantization_config",
    "read_safetensors_headers", "validate_checkpoint",
]
