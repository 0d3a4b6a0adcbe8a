"""Shared test setup: an offline, in-process vLLM on CPU, and tiny VLM checkpoints.

Fixtures:
    make_llm   -- factory ``make_llm(model_dir, **engine_kwargs) -> vllm.LLM`` with
                  small CPU-friendly defaults; every engine it made is shut down and
                  freed when the test ends.
    tiny_vlm   -- session-cached factory ``tiny_vlm(arch, key_style="transformers")
                  -> Path`` of a tiny random checkpoint (see tests/tiny_models.py).
    tiny_models -- the same factory under the name the end-to-end tests use.

Helper:
    release_llm(llm) -- shut an engine down and free its memory now (the fixture
                        does this for you; use it to free one early).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# Must be set before vLLM / huggingface_hub are imported (some are read at import).
# setdefault: a developer can still override any of them from the shell.
for _key, _value in {
    # Engine core and worker in the test process: ~3 s startup instead of ~20 s,
    # and counters inside a plugin are visible to the test.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

# Without CUDA, Triton kernels run under Triton's interpreter on CPU tensors. Triton
# reads this when a kernel is decorated, so it is set once, before any test imports one.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

# Defaults for engines made by `make_llm`; keyword arguments override them.
LLM_DEFAULTS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=512,
    limit_mm_per_prompt={"image": 1},
    kv_cache_memory_bytes=64 << 20,
    seed=0,
)


@pytest.fixture(scope="session", autouse=True)
def _scratch_caches(tmp_path_factory):
    """Point vLLM's and Inductor's caches into the session's temporary folder."""
    root = tmp_path_factory.mktemp("caches")
    for key, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        if key not in os.environ:
            os.environ[key] = str(root / sub)
    yield root


def release_llm(llm) -> None:
    """Shut down a ``vllm.LLM`` made in this process and free its memory.

    With VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core lives in this process;
    shutting it down tears down vLLM's distributed state (process group, model
    parallel groups). Without that, the next engine in the same process cannot
    initialize. Safe to call twice.
    """
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()


@pytest.fixture
def make_llm():
    """Factory for vLLM engines with small CPU defaults (``LLM_DEFAULTS``).

    ``make_llm(model_dir, **kw)`` returns a ``vllm.LLM``; ``kw`` overrides the
    defaults (e.g. ``quantization="sab"``). All engines made in a test are shut
    down and garbage-collected at its end.
    """
    from vllm import LLM

    made = []

    def _make(model_dir, **kw):
        args = {**LLM_DEFAULTS, **kw}
        llm = LLM(model=str(model_dir), **args)
        made.append(llm)
        return llm

    yield _make
    while made:
        release_llm(made.pop())
    gc.collect()


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Session-cached tiny checkpoints: ``tiny_vlm(arch, key_style="transformers") -> Path``.

    Do not modify the returned directory; copy it first.
    """
    from tiny_models import build_tiny_vlm

    cache: dict[tuple[str, str], Path] = {}

    def _get(arch: str, key_style: str = "transformers") -> Path:
        key = (arch, key_style)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{key_style}")
            cache[key] = build_tiny_vlm(arch, out, key_style=key_style)
        return cache[key]

    return _get


@pytest.fixture(scope="session")
def tiny_models(tiny_vlm):
    """Alias of :func:`tiny_vlm`: ``tiny_models(arch) -> Path`` (session-cached)."""
    return tiny_vlm
