"""Host-side integer helpers for the launchers.

Plain Python on purpose: in recent Triton, ``triton.cdiv`` / ``triton.next_power_of_2`` are jit functions
whose host call costs microseconds each, and a launcher calls them several times per op.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
