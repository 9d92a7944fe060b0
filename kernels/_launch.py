"""Host-side launch arithmetic shared by the kernels. Plain Python on purpose: some Triton
versions wrap ``triton.cdiv`` and ``triton.next_power_of_2`` in a JIT function that costs
microseconds per call from the host, on every launch."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
