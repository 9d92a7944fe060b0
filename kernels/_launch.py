"""Host-side launch arithmetic shared by the kernels. Plain Python on purpose: some Triton
versions wrap ``triton.cdiv`` and ``triton.next_power_of_2`` in a JIT function that costs
microseconds per call from the host, on every launch."""
import os

# Read once at import: triton.jit picks interpretation when the kernels are decorated, too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
