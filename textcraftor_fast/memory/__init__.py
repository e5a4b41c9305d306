"""Activation and host memory: what a training step keeps for backward and how it is kept small.

    policy.py       the checkpoint plan (sampler.checkpoint = 'auto': recompute only what the budget needs)
    layers.py       per-layer checkpointing of the CLIP transformers (sampler.checkpoint_towers)
    host_heap.py    giving freed host memory back to the OS at a step's boundaries (CPU, SD-size models)
    saved_bytes.py  exact byte counts: bytes saved for backward, optimizer state
"""
