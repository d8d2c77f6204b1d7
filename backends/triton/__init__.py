"""The torch.compile backend (`torch.compile(qmodel, backend="fxquant")`) and, on CUDA, its Triton kernels."""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run in Triton's CPU interpreter (tests)


def ceil_div(a: int, b: int) -> int:
    """The number of b-sized blocks covering a, for launch grids (triton.cdiv is a constexpr function: called from
    Python it unwraps its arguments, a few microseconds per call on every eager launch)."""
    return -(-a // b)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for a block that covers a row (triton.next_power_of_2 is a constexpr
    function: slow from Python)."""
    return 1 << (n - 1).bit_length()
