"""Triton kernels (imported as textcraftor_fast.kernels)."""
