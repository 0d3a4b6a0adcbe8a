"""An empty Triton kernel, for timing the launch itself (imported after ``TRITON_INTERPRET`` is set)."""

import triton
import triton.language as tl


@triton.jit
def empty_kernel(ptr, n):
    """Stores nothing (``pid < 0`` is never true): one program, no memory traffic.

    Args: ``ptr``: any float32 pointer; ``n``: any int (launch with 1).
    """
    pid = tl.program_id(0)
    tl.store(ptr + pid, 0.0, mask=pid < n * 0)
