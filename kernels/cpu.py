"""Native CPU kernels for sab layers (installed as ``vllm_sab.kernels.cpu``).

The C++ sources in ``csrc/`` are compiled against the installed torch with
``torch.utils.cpp_extension`` (g++ and ninja), once per (torch version, source
hash), into a cache folder; torch's build lock makes concurrent first uses
safe. ``python -m vllm_sab.kernels.cpu`` builds ahead of time (the CPU setup
script does). Where the build fails the caller falls back to the torch
reference, and one warning says why.

Kernels (``csrc/sab_kernels.inc``, one source over AVX-512 / AVX2 / scalar
backends, chosen from the CPU's flags at run time, never ``-march=native``):

* decode, ``M <= decode_max_m`` (default 8): each group of 16 (AVX-512) or 8
  (AVX2) weights is built in a register from the packed words (sign plane,
  zone planes, residual plane, row and column scales, offsets) and multiplied
  with the activations as it is built; ``W_hat`` is never stored. The sign
  profile uses ``sum_j s_j x_j = 2 * sum_{s_j = +1} x_j - sum_j x_j``: one
  masked add per 16 weights.
* decode on bfloat16 dot products (``csrc/sab_kernels_bf16.inc``): bfloat16
  activations on a CPU with AVX512-BF16 meet the built weights rounded to
  bfloat16, 32 products per ``vdpbf16ps``; the sign profile builds exact +-1
  there and decodes this way up to ``sign_bf16_decode_max_m`` (16), the other
  profiles from ``bf16_decode_min_m`` (4). :meth:`CpuKernelConfig.path` is the
  table.
* decode with int8 activations (``csrc/sab_kernels_int8.inc``, AVX512-VNNI), the
  default for the profiles without offsets at ``M <= int8_decode_max_m`` (2): each
  token's activations are quantized once per call per (block, scale slot), absmax /
  127, and ``vpdpbusd`` sums +-q exactly in int32, 64 weights per instruction; row
  scale times activation scale is applied once per block. ``int8_activations`` (or
  ``SAB_CPU_INT8_ACTIVATIONS=0``) switches it off.
* prefill, larger ``M``: rows of ``W_hat`` are dequantized into a tile of
  ``tile_rows`` rows (bfloat16 for bfloat16 activations on CPUs with a native
  bfloat16 dot product, float32 otherwise) and multiplied by torch's GEMM
  (oneDNN / MKL), one tile per task.

Numerics: the weights the kernels build equal ``format.dequantize`` bit for
bit (same float32 evaluation order); the float32 decode accumulates in float32
and differs from :func:`reference_linear` only in the order of the sum.
Prefill with float32 tiles is exact in the same sense. With ``bf16_weights``
(bfloat16 activations on a CPU with a native bfloat16 dot product) the
bfloat16 tiles and the bfloat16 decode use ``W_hat`` rounded to bfloat16
(round to nearest even), what a dense bfloat16 layer stores, with exact
products and float32 accumulation; the sign profile's bfloat16 decode stays
exact (+-1 times bfloat16 activations, row scale applied in float32). The int8
decode is exact for its quantized activations (integer sums, float32 scaling) and
differs from the exact paths by the activation quantization (at most d / 2 per
activation, d = block absmax / 127).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vllm_sab import format as fmt

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("sab_cpu.cpp", "isa_avx512.cpp", "isa_avx512bf16.cpp", "isa_avx512vnni.cpp", "isa_avx2.cpp",
           "isa_scalar.cpp")
HEADERS = ("sab_cpu.h", "avx512_backend.inc", "sab_kernels.inc", "sab_kernels_bf16.inc", "sab_kernels_int8.inc")


#: Kernel paths of one call (the binding's ``path`` argument, sab_cpu.cpp).
PATH_TILES, PATH_DECODE_F32, PATH_DECODE_BF16, PATH_DECODE_INT8 = 0, 1, 2, 3
#: Most activation rows the decode kernels take (sab_cpu::kMaxDecodeM).
MAX_DECODE_M = 16
#: Largest block size the int8 decode takes (csrc/sab_kernels_int8.inc kInt8MaxBlock).
INT8_MAX_BLOCK = 4096


def is_sign_profile(profile: fmt.LayerProfile) -> bool:
    """Whether ``profile`` is the plain sign profile (one zone, no salient columns, no
    column scales, no offset), which has decode loops of its own."""
    return (profile.zone_bits == 0 and profile.salient == 0 and not profile.col_scale
            and not profile.offset)


@dataclass(frozen=True)
class CpuKernelConfig:
    """Launch parameters of the native CPU kernel.

    Attributes:
        decode_max_m: largest ``M`` (tokens) that runs the decode kernel; larger
            ``M`` runs the prefill tiles. At most 16. 8 is the measured crossover on
            this project's AMD EPYC (4096x4096, bf16, 2 threads): the decode kernel
            takes activations 8 rows per pass, so M = 9..16 builds the weights twice,
            and there the tiles were faster (sign M = 16: 2.9 against 5.4 ms).
        sign_bf16_decode_max_m: the same bound for the sign profile where its decode
            runs on bfloat16 dot products (see ``bf16_weights``): two passes of 8 rows
            still beat the tiles there (M = 16, 4096x4096: 1.14x against 0.56x bf16).
        bf16_decode_min_m: smallest ``M`` at which the other profiles' decode uses the
            bfloat16 dot product. Below it every built weight meets one or two
            activation rows, the multiplies are a small part of the work and the
            float32 decode was as fast or faster (M = 1-2); from M = 4 the dot product
            was 1.1-1.4x faster (4096x4096, 2 threads, A/B in one process).
        tile_bytes: target size of one dequantized prefill tile (bytes); the
            tile has ``max(16, tile_bytes // (K * element size))`` rows. 2 MiB
            (256 rows of a bf16 K = 4096 tile): oneDNN's GEMM on 256-row tiles ran
            at 115-430 GFLOP/s against 96-340 on 64-row (L2-sized) ones (measured).
        bf16_weights: whether bfloat16 activations meet ``W_hat`` rounded to
            bfloat16 (round to nearest even, as a dense bfloat16 layer stores it):
            in the prefill tiles, and in the decode where the CPU has AVX512-BF16
            (``vdpbf16ps``: 32 products per instruction against 16 for a float32
            FMA); otherwise exact float32 weights (activations widened once, output
            rounded back). The sign profile's +-1 weights are exact either way.
            ``None``: bfloat16 exactly where the CPU has a native bfloat16 dot product
            (AVX512-BF16 or AMX), see :func:`native_bf16_gemm`. Without one, torch's
            bfloat16 GEMM converts on the fly and is far slower than float32: on an
            AVX2-only AMD EPYC (2 threads, 4096x4096) dense bf16 took 404 ms at M = 256
            against 85 ms in float32 (``benchmarks/kernels_cpu.py --quick``).
        int8_activations: whether the decode of the profiles without offsets (ARB-RC,
            SAB, Bi-VLM) quantizes its activations to int8 on a CPU with AVX512-VNNI
            (``csrc/sab_kernels_int8.inc``: per (token, block, scale slot) absmax / 127,
            exact int32 sums of +-q by ``vpdpbusd``). On by default: on the shipped model
            it moved the next-token distribution by KL 5e-6-1.3e-5 nats against the exact
            kernels, 75-800x less than the binarization itself, with the same greedy
            answers on 899-900 of 900 questions (``benchmarks/results/int8_quality.md``),
            and made the ARB-RC / SAB M = 1 decode about 1.7x faster
            (4096x4096 cold, A/B in one process, ``benchmarks/results/kernels_cpu.md``). ``SAB_CPU_INT8_ACTIVATIONS=0``
            in the environment switches it off for :data:`DEFAULT_CONFIG` (the exact
            float32 decode then serves every M).
        int8_decode_max_m: largest ``M`` on the int8 decode. It takes activation rows one
            at a time over the same weights, so its cost grows with M; it beat the other
            decodes at M = 1-2 and lost at M = 4 (4096x4096, 2 threads).
    """

    decode_max_m: int = 8
    tile_bytes: int = 2 * 1024 * 1024
    bf16_weights: bool | None = None
    sign_bf16_decode_max_m: int = 16
    bf16_decode_min_m: int = 4
    int8_activations: bool = True
    int8_decode_max_m: int = 2

    def int8_supported(self, profile: fmt.LayerProfile) -> bool:
        """Whether the int8-activation decode can take ``profile``: no offsets, block size a
        multiple of 64 up to :data:`INT8_MAX_BLOCK`, not the sign profile (the same test as
        csrc/sab_kernels_int8.inc ``int8_supports``, which the binding applies again)."""
        return (not profile.offset and profile.block_size % 64 == 0 and profile.block_size <= INT8_MAX_BLOCK
                and not is_sign_profile(profile) and profile.num_slots <= 16)

    def use_bf16_weights(self, dtype: torch.dtype) -> bool:
        """Whether activations of ``dtype`` meet bfloat16-rounded weights (see ``bf16_weights``)."""
        if dtype != torch.bfloat16:
            return False
        return native_bf16_gemm() if self.bf16_weights is None else self.bf16_weights

    def path(self, m: int, dtype: torch.dtype, profile: fmt.LayerProfile, bf16_dot: bool,
             int8_dot: bool = False) -> int:
        """Which kernel serves ``M = m`` rows of ``dtype`` activations for ``profile``.

        Args:
            bf16_dot: whether the chosen instruction set has the bfloat16 dot-product
                decode (AVX-512 on a CPU with AVX512-BF16, :func:`has_bf16_dot`).
            int8_dot: whether it has the int8-activation decode (AVX-512 on a CPU with
                AVX512-VNNI, :func:`has_int8_dot`).

        Returns:
            ``PATH_TILES`` (prefill tiles), ``PATH_DECODE_F32`` (decode, float32
            weights and activations), ``PATH_DECODE_BF16`` (decode, bfloat16 dot
            products) or ``PATH_DECODE_INT8`` (decode, int8 activations).
        """
        if (self.int8_activations and int8_dot and 0 < m <= self.int8_decode_max_m
                and self.int8_supported(profile)):
            return PATH_DECODE_INT8
        bf16 = bf16_dot and self.use_bf16_weights(dtype)
        sign = is_sign_profile(profile)
        limit = min(self.sign_bf16_decode_max_m if bf16 and sign else self.decode_max_m, MAX_DECODE_M)
        if m > limit:
            return PATH_TILES
        if bf16 and (sign or m >= self.bf16_decode_min_m):
            return PATH_DECODE_BF16
        return PATH_DECODE_F32

    def tile_rows(self, k: int, dtype: torch.dtype) -> int:
        """Rows of ``W_hat`` per prefill tile for ``K = k`` and activations of ``dtype``."""
        elem = 2 if self.use_bf16_weights(dtype) else 4
        return max(16, self.tile_bytes // (k * elem) // 16 * 16)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the operating system reports (``/proc/cpuinfo``, Linux).

    Lower-case names as Linux spells them (``avx512_bf16``, ``amx_bf16``); an empty set
    where the file is missing or has no ``flags`` line (not Linux), so callers then
    assume the feature is absent.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 ``vdpbf16ps`` or AMX-BF16).

    Read from :func:`cpu_flags` (torch 2.13 exposes no probe for either: the
    ``torch._C._cpu`` names an earlier version of this function asked for do not exist
    there, so it answered False on an AVX512-BF16 CPU and prefill ran 2.5x slower).
    """
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


#: Environment switch of the int8-activation decode for :data:`DEFAULT_CONFIG` ("0" / "1").
INT8_ENV = "SAB_CPU_INT8_ACTIVATIONS"


def config_from_env(env: Mapping[str, str] = os.environ) -> CpuKernelConfig:
    """The default :class:`CpuKernelConfig` with ``int8_activations`` from ``SAB_CPU_INT8_ACTIVATIONS``.

    Raises:
        ValueError: the variable is set to something other than ``0``/``1``/``false``/``true``.
    """
    raw = env.get(INT8_ENV)
    if raw is None or raw == "":
        return CpuKernelConfig()
    value = {"0": False, "false": False, "off": False, "1": True, "true": True, "on": True}.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"{INT8_ENV}={raw!r}: expected 0 or 1 (int8 activations off / on)")
    return CpuKernelConfig(int8_activations=value)


#: The configuration used unless a caller passes another (benchmarks/kernels_cpu.py
#: measures the decode/prefill crossover that sets ``decode_max_m``).
DEFAULT_CONFIG = config_from_env()


def _build_dir(digest: str) -> Path:
    root = os.environ.get("SAB_CPU_BUILD_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm_sab"
    return base / f"cpu-ext-torch{torch.__version__.replace('+', '_')}-{digest}"


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Any, str]:
    """Build (first use) and import the extension: ``(module, "")`` or ``(None, why)``."""
    missing = [n for n in SOURCES + HEADERS if not (CSRC / n).is_file()]
    if missing:
        return None, f"sources missing from the installed package: {missing} in {CSRC}"
    try:
        from torch.utils import cpp_extension

        digest = _digest()
        build = _build_dir(digest)
        build.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=f"sab_cpu_{digest}",
            sources=[str(CSRC / n) for n in SOURCES],
            extra_cflags=["-O3", "-std=c++17", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build),
            verbose=os.environ.get("SAB_CPU_BUILD_VERBOSE") == "1",
        )
    except Exception as e:  # noqa: BLE001 -- any build failure means: use the fallback
        lines = str(e).strip().splitlines()
        # A compiler failure's message is the whole command line; its "error:" lines say why.
        errors = [ln.strip() for ln in lines if "error" in ln.lower()][-3:]
        return None, f"{type(e).__name__}: {'; '.join(errors or lines[:1] or [type(e).__name__])}"
    return module, ""


def extension() -> Any | None:
    """The compiled extension module, or None (with one warning) if it cannot be built."""
    module, why = _load()
    if module is None:
        _warn_once(why)
    return module


@functools.lru_cache(maxsize=None)
def _warn_once(why: str) -> None:
    warnings.warn(
        f"vllm_sab: native CPU kernels unavailable ({why}); sab layers on CPU use the much slower "
        "torch reference. Needs g++ and ninja; set SAB_CPU_BUILD_VERBOSE=1 to see the build.",
        RuntimeWarning,
        stacklevel=3,
    )


def build_error() -> str:
    """Why the extension cannot be built ("" when it can); builds it if not yet done."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def available_isas() -> tuple[str, ...]:
    """Instruction sets the extension can run on this CPU, best first (empty if not built).

    Values: ``"avx512"`` (AVX-512 F/BW/VL/DQ + FMA + F16C), ``"avx2"`` (AVX2 + FMA +
    F16C), ``"scalar"`` (any CPU).
    """
    module, _ = _load()
    return tuple(module.available_isas()) if module is not None else ()


@functools.lru_cache(maxsize=None)
def has_int8_dot() -> bool:
    """Whether the extension's AVX-512 backend has its int8-activation (VNNI) decode here
    (the CPU has AVX512-VNNI; False where the extension is not built)."""
    module, _ = _load()
    return bool(module.has_int8_dot()) if module is not None else False


@functools.lru_cache(maxsize=None)
def has_bf16_dot() -> bool:
    """Whether the extension's AVX-512 backend has its bfloat16 dot-product decode here
    (the CPU has AVX512-BF16; False where the extension is not built)."""
    module, _ = _load()
    return bool(module.has_bf16_dot()) if module is not None else False


def kernel_path(m: int, dtype: torch.dtype, profile: fmt.LayerProfile, isa: str = "",
                config: CpuKernelConfig | None = None) -> int:
    """The ``PATH_*`` :func:`cpu_linear` takes for ``m`` rows of ``dtype`` activations on
    instruction set ``isa`` (``""``: the best available) with ``config`` (default
    :data:`DEFAULT_CONFIG`): :meth:`CpuKernelConfig.path` with this CPU's dot-product decodes.

    Raises:
        IndexError: ``isa`` is ``""`` and the extension is not built (no instruction set).
    """
    config = DEFAULT_CONFIG if config is None else config
    avx512 = (isa or available_isas()[0]) == "avx512"
    return config.path(m, dtype, profile, has_bf16_dot() and avx512, has_int8_dot() and avx512)


def cpu_linear(
    x: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    profile: fmt.LayerProfile,
    isa: str = "",
    config: CpuKernelConfig | None = None,
) -> torch.Tensor:
    """``y = x @ W_hat^T`` for one sab layer on CPU with the native kernels (no bias).

    Args:
        x: activations ``[M, K]``, float32, bfloat16 or float16, on CPU.
        tensors: the layer's format-v1 tensors ``{suffix: tensor}``, contiguous
            CPU tensors already validated (values are not re-read here).
        profile: the layer's storage profile.
        isa: ``"avx512"``, ``"avx2"``, ``"scalar"`` or ``""`` (best available).
        config: decode / prefill parameters (default: :data:`DEFAULT_CONFIG`, read at
            each call).

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        RuntimeError: the extension is not built, ``isa`` is not available on
            this CPU, or a tensor has the wrong dtype, shape, device or layout.
    """
    module = extension()
    if module is None:
        raise RuntimeError(f"vllm_sab native CPU kernels are not available: {build_error()}")
    config = DEFAULT_CONFIG if config is None else config
    path = kernel_path(x.shape[0] if x.dim() == 2 else 0, x.dtype, profile, isa, config)
    return module.linear(
        x, *fmt.flat_layer(tensors, profile), isa, path,
        config.tile_rows(x.shape[-1], x.dtype), config.use_bf16_weights(x.dtype),
    )


def dequantize_stored(
    tensors: Mapping[str, torch.Tensor], profile: fmt.LayerProfile, isa: str = "", bf16: bool = False
) -> torch.Tensor:
    """``W_stored`` ``[N, K]`` (stored column order) as the prefill tiles hold it.

    float32, or bfloat16 (round to nearest even) with ``bf16=True``. For tests.

    Raises:
        RuntimeError: as :func:`cpu_linear`.
    """
    module = extension()
    if module is None:
        raise RuntimeError(f"vllm_sab native CPU kernels are not available: {build_error()}")
    return module.dequantize_stored(*fmt.flat_layer(tensors, profile), isa, bf16)


def main() -> int:
    """``python -m vllm_sab.kernels.cpu``: build now, print the ISAs; exit 1 if it cannot build."""
    module, why = _load()
    if module is None:
        print(f"vllm_sab native CPU kernels: build failed: {why}", file=sys.stderr)
        return 1
    print(f"vllm_sab native CPU kernels: built; instruction sets {', '.join(available_isas())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
