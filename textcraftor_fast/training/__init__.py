"""The TextCraftor training loop and what it is made of.

    trainer.py      Trainer (build, train_step, forward, train) and `train`
    stages.py       what a run fine-tunes: the text encoder, or the UNet (LoRA or full)
    steppers.py     how an optimizer step is taken: plain, DeepSpeed, or inside backward
    optim.py        optimizers (torch AdamW, bitsandbytes 8-bit) and the lr schedule
    checkpoints.py  resumable run checkpoints that survive crashes and files from strangers
    signals.py      stopping on Ctrl-C / SIGTERM without losing a run
    monitor.py      collapse and loss-spike monitors
    run_log.py      TrainResult, metrics.jsonl, TensorBoard, summary.json
"""
