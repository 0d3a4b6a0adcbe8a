"""Native CPU kernels (vllm_sab.kernels.cpu) and the kernel chooser.

The oracle is ``ref_dequantize`` from test_format.py: docs/format.md evaluated
element by element in Python, independent of ``format.dequantize`` (which is
itself one of the kernels, the torch fallback). Every instruction set this CPU
has is forced in turn; CI's machine has AVX-512, so all three run there.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from test_format import ref_dequantize
from test_kernels import CASE_IDS, CASES, random_layer
from vllm_sab import format as fmt
from vllm_sab import ops
from vllm_sab.kernels import chooser, cpu

ISAS = cpu.available_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U32 = torch.finfo(torch.float32).eps / 2
#: The default paths without int8 activations (those have their own tests below).
EXACT = cpu.CpuKernelConfig(int8_activations=False)


def test_extension_builds_here():
    """CI's machines have g++ and ninja: the kernels must build, not silently fall back."""
    assert cpu.build_error() == ""
    assert ISAS and ISAS[-1] == "scalar"


def stored_index(p: fmt.LayerProfile, k: int, tensors: dict) -> torch.Tensor:
    """idx[j]: the original column of stored column j (format.md section 3.1)."""
    j = torch.arange(k)
    if fmt.PERM not in tensors:
        return j
    return p.block_size * (j // p.block_size) + tensors[fmt.PERM].long()


@pytest.fixture(scope="module")
def layers():
    """Random layers of every CASES profile with their independent dense W_hat (float64)."""
    out = []
    for seed, (n, k, p) in enumerate(CASES):
        t = random_layer(p, n, k, seed)
        out.append((n, k, p, t, ref_dequantize(t, p).double()))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_dequantized_tile_bit_exact(layers, case, isa):
    """The weights the kernels build equal docs/format.md's, bit for bit (fp32), and RNE in bf16."""
    n, k, p, t, w_ref = layers[case]
    idx = stored_index(p, k, t)
    w_stored_ref = w_ref.float()[:, idx]
    assert torch.equal(cpu.dequantize_stored(t, p, isa), w_stored_ref)
    assert torch.equal(cpu.dequantize_stored(t, p, isa, bf16=True), w_stored_ref.to(torch.bfloat16))


def _bound(x: torch.Tensor, w_ref: torch.Tensor, y_ref: torch.Tensor, out_dtype: torch.dtype, w_round: float):
    """Elementwise error bound of a float32-accumulated dot against the exact float64 one.

    ``S = |x| @ |W|^T``: the weights may be rounded first (``w_round * S``: 0 for the exact
    paths, ``u(bf16)`` for the bf16 prefill tile), float32 accumulation in any order errs by
    at most ``K u32 S`` (plus the float32 activation products), and the result is rounded
    once to ``out_dtype`` (``u(out) |y|``), one more for the activation's own rounding slack.
    """
    k = x.shape[-1]
    s = x.double().abs() @ w_ref.abs().t()
    u_out = torch.finfo(out_dtype).eps / 2
    return (w_round + (k + 2) * U32) * s + 2 * u_out * y_ref.abs() + 1e-30


def _w_round(cfg: cpu.CpuKernelConfig, m: int, dtype: torch.dtype, p: fmt.LayerProfile, isa: str) -> float:
    """Relative rounding of W_hat on the path ``cfg`` takes: u(bf16) where the weights are
    rounded to bfloat16 (bf16 tiles; the bf16 decode except the sign profile's exact +-1)."""
    path = cfg.path(m, dtype, p, cpu.has_bf16_dot() and isa == "avx512")
    rounded = (path == cpu.PATH_TILES and cfg.use_bf16_weights(dtype)) or (
        path == cpu.PATH_DECODE_BF16 and not cpu.is_sign_profile(p))
    return torch.finfo(torch.bfloat16).eps / 2 if rounded else 0.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_linear_against_independent_reference(layers, case, dtype, isa):
    """y = x W^T within the float32 rounding bound, for decode (M <= 16) and prefill (M > 16) sizes."""
    n, k, p, t, w_ref = layers[case]
    g = torch.Generator().manual_seed(case)
    for m in (1, 2, 3, 5, 8, 9, 16, 17, 40):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = cpu.cpu_linear(x, t, p, isa, config=EXACT)
        assert y.dtype == dtype and y.shape == (m, n)
        y_ref = x.double() @ w_ref.t()
        bound = _bound(x, w_ref, y_ref, dtype, _w_round(EXACT, m, dtype, p, isa))
        err = (y.double() - y_ref).abs()
        assert bool((err <= bound).all()), f"M={m}: max error / bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_prefill_tile_dtype_for_bf16_activations(layers, bf16_weights):
    """bf16 prefill: float32 tiles are exact (the float32 bound); bfloat16 tiles hold W_hat
    rounded to bfloat16, so they equal a float32-accumulated GEMM on W_hat.bfloat16()."""
    n, k, p, t, w_ref = layers[2]
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    cfg = cpu.CpuKernelConfig(decode_max_m=0, sign_bf16_decode_max_m=0, bf16_weights=bf16_weights)
    y = cpu.cpu_linear(x, t, p, config=cfg).double()
    w_used = w_ref.float().to(torch.bfloat16).double() if bf16_weights else w_ref
    y_ref = x.double() @ w_used.t()
    assert bool(((y - y_ref).abs() <= _bound(x, w_used, y_ref, torch.bfloat16, 0.0)).all())
    if not bf16_weights:  # and rounding W to bfloat16 is visible at this size: the test can tell
        y_bf16w = x.double() @ w_ref.float().to(torch.bfloat16).double().t()
        assert not bool(((y_bf16w - y_ref).abs() <= _bound(x, w_ref, y_ref, torch.bfloat16, 0.0)).all())


def test_bf16_weights_follow_the_cpu(monkeypatch):
    """Auto (None) rounds W to bfloat16 exactly where the CPU multiplies bfloat16 natively."""
    for native in (False, True):
        monkeypatch.setattr(cpu, "native_bf16_gemm", lambda native=native: native)
        assert cpu.CpuKernelConfig().use_bf16_weights(torch.bfloat16) is native
        assert cpu.CpuKernelConfig().use_bf16_weights(torch.float16) is False
        assert cpu.CpuKernelConfig(bf16_weights=not native).use_bf16_weights(torch.bfloat16) is (not native)


SIGN, BITMAP = fmt.LayerProfile(128), fmt.LayerProfile(128, zone_bits=1, salient=8, salient_zoned=True,
                                                         col_scale=True)


@pytest.mark.parametrize("m, dtype, p, dot, want", [
    (1, torch.bfloat16, SIGN, True, cpu.PATH_DECODE_BF16),     # sign: exact +-1, every M
    (16, torch.bfloat16, SIGN, True, cpu.PATH_DECODE_BF16),
    (17, torch.bfloat16, SIGN, True, cpu.PATH_TILES),
    (16, torch.bfloat16, SIGN, False, cpu.PATH_TILES),         # float32 decode stops at 8
    (8, torch.bfloat16, SIGN, False, cpu.PATH_DECODE_F32),
    (1, torch.bfloat16, BITMAP, True, cpu.PATH_DECODE_F32),    # below bf16_decode_min_m
    (4, torch.bfloat16, BITMAP, True, cpu.PATH_DECODE_BF16),
    (9, torch.bfloat16, BITMAP, True, cpu.PATH_TILES),
    (4, torch.float32, BITMAP, True, cpu.PATH_DECODE_F32),     # only bf16 activations
    (1, torch.float16, SIGN, True, cpu.PATH_DECODE_F32),
])
def test_kernel_path_choice(monkeypatch, m, dtype, p, dot, want):
    """The path table: decode / bf16 dot / tiles by M, activation dtype, profile and CPU."""
    monkeypatch.setattr(cpu, "native_bf16_gemm", lambda: True)
    assert cpu.CpuKernelConfig().path(m, dtype, p, dot) == want


needs_bf16_dot = pytest.mark.skipif(not cpu.has_bf16_dot(), reason="this CPU has no AVX512-BF16")


@needs_bf16_dot
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_bf16_decode_uses_bf16_rounded_weights(layers, case):
    """The bfloat16 dot-product decode equals a float32-accumulated product with W_hat rounded
    to bfloat16 (the bf16 tiles' weights); the sign profile's +-1 keep it exact. Every M of
    the decode, with the row tiles' remainders (odd N in CASES)."""
    n, k, p, t, w_ref = layers[case]
    cfg = cpu.CpuKernelConfig(decode_max_m=16, bf16_decode_min_m=1, bf16_weights=True,
                              int8_activations=False)
    exact = cpu.is_sign_profile(p)
    w_used = w_ref if exact else w_ref.float().to(torch.bfloat16).double()
    g = torch.Generator().manual_seed(100 + case)
    for m in (1, 2, 3, 4, 7, 8, 9, 16):
        assert cfg.path(m, torch.bfloat16, p, True) == cpu.PATH_DECODE_BF16
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = cpu.cpu_linear(x, t, p, "avx512", config=cfg).double()
        y_ref = x.double() @ w_used.t()
        err = (y - y_ref).abs()
        bound = _bound(x, w_used, y_ref, torch.bfloat16, 0.0)
        assert bool((err <= bound).all()), f"M={m}: max error / bound {float((err / bound).max()):.3g}"


@needs_bf16_dot
def test_bf16_decode_differs_from_exact_where_rounding_shows(layers):
    """The test above can tell: for a bitmap profile the bf16 decode is outside the exact
    path's float32 bound, and inside it with the float32 decode of the same layer."""
    n, k, p, t, w_ref = layers[2]
    assert not cpu.is_sign_profile(p)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y_ref = x.double() @ w_ref.t()
    bound = _bound(x, w_ref, y_ref, torch.bfloat16, 0.0)
    for weights, inside in ((True, False), (False, True)):
        cfg = cpu.CpuKernelConfig(decode_max_m=16, bf16_decode_min_m=1, bf16_weights=weights,
                                  int8_activations=False)
        y = cpu.cpu_linear(x, t, p, "avx512", config=cfg).double()
        assert bool(((y - y_ref).abs() <= bound).all()) is inside


def test_bf16_decode_refuses_other_activations(layers):
    """The binding checks the path it is told to take: bf16 decode needs bf16 activations."""
    n, k, p, t, w_ref = layers[0]
    module = cpu.extension()
    x = torch.randn(2, k)
    with pytest.raises(RuntimeError, match="bfloat16 decode needs bfloat16 activations"):
        module.linear(x, *fmt.flat_layer(t, p), "", cpu.PATH_DECODE_BF16, 256, True)
    with pytest.raises(RuntimeError, match="path must be 0"):
        module.linear(x, *fmt.flat_layer(t, p), "", 7, 256, True)


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "amx_bf16", "amx_tile"}, True),
    ({"avx2", "avx512f", "avx512_vnni"}, False),
    (set(), False),
])
def test_native_bf16_gemm_reads_the_cpu_flags(monkeypatch, flags, native):
    """AVX512-BF16 or AMX-BF16 in the flags makes the CPU a native bfloat16 multiplier."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert cpu.native_bf16_gemm() is native


def test_native_bf16_gemm_on_this_machine():
    """The probe agrees with the flags line the kernel reports for this CPU (grep, not the parser)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo: the flags cannot be read independently here")
    flags_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    if not flags_line:
        pytest.skip("/proc/cpuinfo has no flags line on this system")
    expected = " avx512_bf16" in flags_line or " amx_bf16" in flags_line
    assert cpu.native_bf16_gemm() is expected


@pytest.mark.parametrize("decode_max_m", [0, 16])
def test_decode_and_prefill_paths_agree(layers, decode_max_m):
    """The same M through either path (forced by the config) gives the same fp32 result up to order."""
    n, k, p, t, w_ref = layers[2]
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(3))
    cfg = cpu.CpuKernelConfig(decode_max_m=decode_max_m, tile_bytes=4096)  # tiny tiles: many tasks
    y = cpu.cpu_linear(x, t, p, config=cfg)
    y_ref = x.double() @ w_ref.t()
    assert bool(((y.double() - y_ref).abs() <= _bound(x, w_ref, y_ref, torch.float32, 0.0)).all())


def test_threads_do_not_change_the_result(layers):
    """Rows are split over torch's intra-op threads; each output is computed by one thread."""
    n, k, p, t, _ = layers[1]
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu.cpu_linear(x, t, p)
        torch.set_num_threads(2)
        y2 = cpu.cpu_linear(x, t, p)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_bad_tensors_are_named():
    """A tensor of the wrong dtype or a missing one is refused with its name, not read as garbage."""
    p = fmt.LayerProfile(block_size=32, zone_bits=1, col_scale=True)
    t = random_layer(p, 8, 64, 0)
    x = torch.randn(1, 64)
    bad = dict(t, **{fmt.SCALE: t[fmt.SCALE].float()})
    with pytest.raises(RuntimeError, match="weight_scale"):
        cpu.cpu_linear(x, bad, p)
    missing = {k: v for k, v in t.items() if k != fmt.ZONE}
    with pytest.raises(RuntimeError, match="weight_zone"):
        cpu.cpu_linear(x, missing, p)
    with pytest.raises(RuntimeError, match="K=64"):
        cpu.cpu_linear(torch.randn(1, 32), t, p)
    with pytest.raises(RuntimeError, match="not available"):
        cpu.cpu_linear(x, t, p, isa="avx9000")


# ---------------------------------------------------------------------------------------
# The custom op and the chooser
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [f"cpu-{isa}" for isa in ISAS] + ["torch"])
def test_opcheck_sab_linear(layers, kernel):
    """torch.library.opcheck: schema, fake (meta) shapes incl. leading dims, and compile tracing agree."""
    n, k, p, t, _ = layers[2]
    for shape in ((3, k), (2, 5, k)):
        x = torch.randn(*shape)
        torch.library.opcheck(torch.ops.sab.linear.default, (x, *fmt.flat_layer(t, p), kernel))


def test_op_leading_dims_equal_flat(layers):
    """The real op and ops.linear accept [..., K], as the fake implementation says."""
    n, k, p, t, _ = layers[3]
    x = torch.randn(2, 3, k)
    y = torch.ops.sab.linear(x, *fmt.flat_layer(t, p), "cpu-" + ISAS[0])
    assert y.shape == (2, 3, n)
    assert torch.equal(y.reshape(6, n), ops.linear(x.reshape(6, k), t, p, "cpu-" + ISAS[0]))


def test_op_compiles_fullgraph(layers):
    """The op stays one opaque call under torch.compile(fullgraph=True), as vLLM compiles layers."""
    n, k, p, t, _ = layers[1]

    def f(x):
        return ops.linear(x, t, p, "cpu-" + ISAS[0]) * 2

    x = torch.randn(4, k)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_chooser_prefers_native_on_cpu(monkeypatch):
    """On CPU the best native ISA wins, ahead of Triton's interpreter and the torch reference."""
    monkeypatch.delenv(chooser.FORCE_ENV, raising=False)
    p = fmt.LayerProfile()
    for dtype in DTYPES:
        assert chooser.choose("cpu", dtype, p).name == f"cpu-{ISAS[0]}"
    lines = chooser.explain("cpu", torch.float32, p)
    assert any(line.startswith(f"cpu-{ISAS[0]}: yes") for line in lines)
    assert any(line.startswith("torch: yes") for line in lines)


def test_chooser_forcing(monkeypatch):
    """SAB_KERNEL forces by name; a kernel that cannot run the layer is an error that says why."""
    p = fmt.LayerProfile()
    monkeypatch.setenv(chooser.FORCE_ENV, "torch")
    assert chooser.choose("cpu", torch.float32, p).name == "torch"
    monkeypatch.setenv(chooser.FORCE_ENV, "cpu")
    assert chooser.choose("cpu", torch.float32, p).name == f"cpu-{ISAS[0]}"
    monkeypatch.setenv(chooser.FORCE_ENV, "cpu-scalar")
    assert chooser.choose("cpu", torch.bfloat16, p).name == "cpu-scalar"
    monkeypatch.setenv(chooser.FORCE_ENV, "cpu-avx512")
    with pytest.raises(ValueError, match="native CPU kernel runs CPU tensors"):
        chooser.choose("cuda", torch.float16, p, where="model.layers.0.mlp")
    monkeypatch.setenv(chooser.FORCE_ENV, "fast")
    with pytest.raises(ValueError, match="SAB_KERNEL='fast'"):
        chooser.choose("cpu", torch.float32, p)


def test_fallback_when_the_build_fails(monkeypatch):
    """Without a compiler the torch reference serves, after one warning that says why."""
    monkeypatch.delenv(chooser.FORCE_ENV, raising=False)
    monkeypatch.setattr(cpu, "_load", lambda: (None, "RuntimeError: g++: not found"))
    cpu._warn_once.cache_clear()
    monkeypatch.setattr(cpu, "available_isas", lambda: ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = chooser.choose("cpu", torch.float32, fmt.LayerProfile())
    assert k.name == "torch"
    assert [str(w.message) for w in caught if "g++: not found" in str(w.message)]
    cpu._warn_once.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_under_inference_mode(dtype):
    """vLLM runs forwards under torch.inference_mode: the prefill tiles are written by torch's
    worker threads, which must run in the caller's mode (else: 'Inplace update to inference
    tensor outside InferenceMode'). Several tiles, so the workers really share the output."""
    p = fmt.LayerProfile(block_size=64, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)
    n, k = 256, 512
    t = random_layer(p, n, k, 7)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    cfg = cpu.CpuKernelConfig(tile_bytes=16 * k * 4)  # 16-row tiles: 16 tasks
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            y = cpu.cpu_linear(x, t, p, config=cfg)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, cpu.cpu_linear(x, t, p, config=cfg))


@pytest.mark.parametrize(("has", "want"), [(("avx2", "scalar"), "cpu-avx2"), (("scalar",), "cpu-scalar")])
def test_chooser_on_a_cpu_without_avx512(monkeypatch, layers, has, want):
    """On a CPU without AVX-512 (or without AVX2) the chooser picks the best backend it has, and
    that backend serves the layer correctly (it runs here too: this CPU has every backend)."""
    monkeypatch.delenv(chooser.FORCE_ENV, raising=False)
    monkeypatch.setattr(cpu, "available_isas", lambda: has)
    n, k, p, t, w_ref = layers[7]
    kernel = chooser.choose("cpu", torch.bfloat16, p)
    assert kernel.name == want
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    y_ref = x.double() @ w_ref.t()
    err = (kernel.run(x, t, p).double() - y_ref).abs()
    assert bool((err <= _bound(x, w_ref, y_ref, torch.float32, 0.0)).all())


def test_float8_row_scales_go_to_the_reference_unless_widened():
    """The compiled kernels read float16 row scales: a float8 profile falls back to the torch
    reference (exact), and the same layer widened to float16 runs natively with the same result."""
    import dataclasses

    from test_kernels import random_layer

    p = fmt.LayerProfile(block_size=64, zone_bits=1, salient=8, salient_zoned=True, col_scale=True,
                         scale_dtype="float8_e4m3fn")
    t = random_layer(p, 32, 128, seed=5)
    assert chooser.choose("cpu", torch.float32, p, 1).name == "torch"
    ok, why = chooser.BY_NAME["cpu-scalar"].can_implement(torch.device("cpu"), torch.float32, p, 1)
    assert not ok and "float8" in why
    wide = dataclasses.replace(p, scale_dtype="float16")
    tw = dict(t, weight_scale=t["weight_scale"].to(torch.float16))
    assert chooser.choose("cpu", torch.float32, wide, 1).name.startswith("cpu-")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ ref_dequantize(t, p).double().T
    torch.testing.assert_close(ops.linear(x, t, p).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear(x, tw, wide).double(), ref, rtol=1e-5, atol=1e-5)


# ---- int8-activation decode (AVX512-VNNI) ---------------------------------------------
# Profiles the int8 decode takes (no offsets, block % 64 == 0): packed salient slots
# (s <= 8; zoned with 2 and 4 zones, not zoned; 8 < s <= 16), salient slots through the chunks (s > 16,
# residual bytes across chunks), no salient columns, s == B (no non-salient slot); odd N
# for the row tiles' remainder.
INT8_CASES = [
    (37, 256, P8 := fmt.LayerProfile(128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)),
    (20, 384, fmt.LayerProfile(128, zone_bits=2, col_scale=True)),
    (19, 256, fmt.LayerProfile(64, zone_bits=2, salient=5, salient_zoned=True, col_scale=True)),
    (18, 256, fmt.LayerProfile(128, zone_bits=1, salient=8)),
    (21, 384, fmt.LayerProfile(192, zone_bits=1, salient=70, salient_zoned=True, col_scale=True)),
    (15, 512, fmt.LayerProfile(256, salient=13, col_scale=True)),
    (9, 128, fmt.LayerProfile(64, zone_bits=1, salient=64, salient_zoned=True, col_scale=True)),
    # 16-byte packed salient slots (8 < s <= 16): zoned with 2 zones, one salient zone; and
    # 4 salient zones, which do not fit and take the chunks
    (23, 256, fmt.LayerProfile(128, zone_bits=1, salient=13, salient_zoned=True, col_scale=True)),
    (13, 256, fmt.LayerProfile(128, zone_bits=2, salient=16, col_scale=True)),
    (11, 256, fmt.LayerProfile(128, zone_bits=2, salient=11, salient_zoned=True, col_scale=True)),
]
INT8_IDS = [f"{p.key}-N{n}-K{k}" for n, k, p in INT8_CASES]
needs_int8_dot = pytest.mark.skipif(not cpu.has_int8_dot(), reason="this CPU has no AVX512-VNNI")
INT8_CFG = cpu.CpuKernelConfig(int8_activations=True, int8_decode_max_m=16)


def _slot_weights(t: dict, p: fmt.LayerProfile) -> list[torch.Tensor]:
    """W_t [N, K] float64 per scale slot t, original column order: a_r[n, b, t] * (+-1) where
    slot t applies, 0 elsewhere (ref_dequantize with every other slot's row scale zeroed and
    unit column scales; profiles without offsets, so sum_t W_t * a_c[t] = W_hat)."""
    out = []
    for slot in range(p.num_slots):
        scale = torch.zeros_like(t[fmt.SCALE])
        scale[..., slot] = t[fmt.SCALE][..., slot]
        ts = dict(t, **{fmt.SCALE: scale})
        if p.col_scale:
            ts[fmt.COL_SCALE] = torch.ones_like(t[fmt.COL_SCALE])
        out.append(ref_dequantize(ts, p).double())
    return out


def _int8_expected(x: torch.Tensor, t: dict, p: fmt.LayerProfile, w_slots: list[torch.Tensor]):
    """The int8 decode's result from its definition (csrc/sab_kernels_int8.inc): per
    (activation row, block, slot) d = max |a_c[t] x| / 127 over the positions of t's class,
    q = round_half_even(a_c[t] x / d) in float32, y = sum_t (q d) @ W_t^T, here in float64.
    Returns (y, s) with s = sum_t |q d| @ |W_t|^T for the rounding bound."""
    m, k = x.shape
    B, s_cnt = p.block_size, p.salient
    idx = stored_index(p, k, t)
    xs = x.float()[:, idx]  # stored order
    salient_pos = (torch.arange(k) % B) < s_cnt
    n_ns = p.num_nonsalient_zones
    y = torch.zeros(m, w_slots[0].shape[0], dtype=torch.float64)
    s = torch.zeros_like(y)
    for slot, w in enumerate(w_slots):
        ac = t[fmt.COL_SCALE][slot].float() if p.col_scale else torch.ones(k)
        keep = salient_pos if slot >= n_ns else ~salient_pos
        v = torch.where(keep, xs * ac, torch.zeros(()))
        amax = v.abs().view(m, k // B, B).amax(-1, keepdim=True)
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
        q = torch.round(v.view(m, k // B, B) * inv)
        xq_stored = (q.double() * (amax / 127.0).double()).view(m, k)
        xq = torch.empty_like(xq_stored)
        xq[:, idx] = xq_stored
        y += xq @ w.t()
        s += xq.abs() @ w.abs().t()
    return y, s


@needs_int8_dot
@pytest.mark.parametrize("case", range(len(INT8_CASES)), ids=INT8_IDS)
def test_int8_decode_equals_its_definition(case):
    """The int8 decode equals the quantize-then-multiply definition above (independent of
    the kernel: element-wise W_t from docs/format.md), up to float32 rounding of the
    per-block scale products and sums; and its distance from the exact product is the
    quantization error, far above that rounding (the test can tell the two apart)."""
    n, k, p = INT8_CASES[case]
    t = random_layer(p, n, k, 500 + case)
    w_slots = _slot_weights(t, p)
    w_ref = ref_dequantize(t, p).double()
    g = torch.Generator().manual_seed(case)
    for m in (1, 2, 3):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=g).to(dtype)
            assert INT8_CFG.path(m, dtype, p, True, True) == cpu.PATH_DECODE_INT8
            y = cpu.cpu_linear(x, t, p, "avx512", config=INT8_CFG).double()
            y_def, s = _int8_expected(x, t, p, w_slots)
            y_def_out = y_def.to(dtype).double()
            # float32: a_r * d (one rounding), float(S) exact (|S| < 2^24), the fma chains
            # and the final sum over slots and blocks (K/64 + T terms per lane < K rounding
            # steps); then the output rounding to dtype.
            bound = (k + 4) * U32 * s + torch.finfo(dtype).eps * y_def.abs() + 1e-30
            err = (y - y_def).abs()
            assert bool((err <= bound).all()), f"M={m} {dtype}: max err/bound {float((err / bound).max()):.3g}"
            exact = x.double() @ w_ref.t()
            if dtype == torch.float32:
                assert float((exact - y_def).abs().max()) > 10 * float(bound.max())
            del y_def_out


@needs_int8_dot
def test_int8_decode_error_is_small_against_exact():
    """Quantization costs what int8 with per-block absmax scales should: relative error of
    the outputs well under 1 % on Gaussian activations (arb-rc/sab profile, K = 1024)."""
    p = P8
    n, k = 64, 1024
    t = random_layer(p, n, k, 7)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    y = cpu.cpu_linear(x, t, p, "avx512", config=INT8_CFG).double()
    exact = cpu.cpu_linear(x, t, p, "avx512", config=EXACT).double()
    rel = float((y - exact).norm() / exact.norm())
    assert 1e-5 < rel < 1e-2, rel


@needs_int8_dot
def test_int8_decode_refuses_what_it_cannot_take():
    """Offsets, blocks not a multiple of 64, the sign profile: the config never picks the
    int8 path for them, and the binding refuses it by name if told to."""
    module = cpu.extension()
    for p in (fmt.LayerProfile(128, zone_bits=1, salient=8, offset=True), fmt.LayerProfile(96, zone_bits=1),
              fmt.LayerProfile(128)):
        assert INT8_CFG.path(1, torch.float32, p, True, True) != cpu.PATH_DECODE_INT8
        t = random_layer(p, 8, 384, 0)
        with pytest.raises(RuntimeError, match="int8 decode needs"):
            module.linear(torch.randn(1, 384), *fmt.flat_layer(t, p), "", cpu.PATH_DECODE_INT8, 256, False)
    # a block larger than the kernel's stack buffer (INT8_MAX_BLOCK) stays on the exact decode
    assert INT8_CFG.path(1, torch.float32, fmt.LayerProfile(2 * cpu.INT8_MAX_BLOCK, zone_bits=1), True, True) \
        != cpu.PATH_DECODE_INT8
    assert INT8_CFG.path(1, torch.float32, P8, True, False) != cpu.PATH_DECODE_INT8  # no VNNI
    for isa in ISAS[1:]:  # AVX2 / scalar hosts (forced here) take the exact decode
        assert cpu.kernel_path(1, torch.float32, P8, isa, INT8_CFG) == cpu.PATH_DECODE_F32
    assert cpu.CpuKernelConfig(int8_activations=False).path(1, torch.float32, P8, True, True) != cpu.PATH_DECODE_INT8


def test_int8_switch_from_the_environment():
    """SAB_CPU_INT8_ACTIVATIONS turns the int8 decode off or on for the default config; a
    value that is neither is refused with the variable's name."""
    assert cpu.config_from_env({}).int8_activations is True
    assert cpu.config_from_env({cpu.INT8_ENV: "0"}).int8_activations is False
    assert cpu.config_from_env({cpu.INT8_ENV: "true"}).int8_activations is True
    with pytest.raises(ValueError, match="SAB_CPU_INT8_ACTIVATIONS='maybe'"):
        cpu.config_from_env({cpu.INT8_ENV: "maybe"})


@needs_int8_dot
def test_default_decode_is_int8_at_m1_and_exact_without_it():
    """The default config sends M <= 2 of the ARB-RC / SAB profile to the int8 decode (its
    result is the int8 definition's, not the exact product), M = 3 to the exact kernels."""
    n, k, p = INT8_CASES[0]
    t = random_layer(p, n, k, 11)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    for m in (1, 2):
        assert cpu.DEFAULT_CONFIG.path(m, torch.float32, p, True, True) == cpu.PATH_DECODE_INT8
    y_default = cpu.cpu_linear(x[:1], t, p, "avx512")
    y_int8 = cpu.cpu_linear(x[:1], t, p, "avx512", config=INT8_CFG)
    y_exact = cpu.cpu_linear(x[:1], t, p, "avx512", config=EXACT)
    assert torch.equal(y_default, y_int8) and not torch.equal(y_default, y_exact)
    assert cpu.DEFAULT_CONFIG.path(3, torch.float32, p, True, True) != cpu.PATH_DECODE_INT8
