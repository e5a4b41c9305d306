"""Several processes: the torchrun process group and DDP (distributed.py), DeepSpeed ZeRO for the text encoder
(deepspeed_engine.py)."""
