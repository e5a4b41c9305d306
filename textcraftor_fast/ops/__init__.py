"""How the models' ops run, never what they compute.

    backend.py    ops.backend / ops.attention: the implementation choice and the module swaps (Triton, native)
    native.py     the native op library built from csrc/ (`make ext`): loading, autograd, fake kernels
    gemm_conv.py  small-map convolutions as one GEMM on the CPU (ops.gemm_conv_max_pixels)
    speed.py      TF32, channels-last and torch.compile (ops.tf32, ops.channels_last, ops.compile)
"""
