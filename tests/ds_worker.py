"""Run by tests/test_distributed.py and tests/faults/test_rank_counts.py under torchrun or the deepspeed launcher
(not collected by pytest).

Usage: ds_worker.py OUT JOB [JOB ...], JOB = NAME:STAGE:STEPS[:CHECKPOINT]
Trains the tiny random world once per JOB in ONE launch (imports and process-group set-up are most of a
tiny run's time): ZeRO stage STAGE for STEPS steps in OUT/NAME, resuming from CHECKPOINT when given, and
writes per rank the final encoder weights (OUT/NAME/rank<R>.safetensors), the optimizer-state bytes this
rank holds and the loss history (OUT/NAME/rank<R>.json). DS_WORKER_GLOBAL_BATCH (environment): the global batch,
split over the ranks (default 1 per rank); DS_WORKER_SET: more config overrides, ';'-separated.
"""
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from textcraftor_fast import load_config
from textcraftor_fast.parallel.distributed import shutdown
from textcraftor_fast.training.trainer import Trainer

# The settings every test run shares; tests/test_distributed.py builds its single-process reference from them.
BASE = ["sampler.num_steps=4", "sampler.grad_steps=2", "train.progress_bar=false", "data.max_prompts=8",
        "train.checkpointing_steps=2", "train.checkpoints_total_limit=5",
        "distributed.timeout_s=120",
        "output.overwrite=true"]


def main(argv: list[str]) -> None:
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, jobs = Path(argv[0]), [job.split(":", 3) for job in argv[1:]]
    rank = int(os.environ["RANK"])
    trainer = None
    for name, stage, steps, *resume in jobs:
        folder = out / name
        world = int(os.environ["WORLD_SIZE"])
        per_rank = int(os.environ.get("DS_WORKER_GLOBAL_BATCH", world)) // world
        more = [kv for kv in os.environ.get("DS_WORKER_SET", "").split(";") if kv]
        extra = [f"train.steps={steps}", f"train.batch_size={per_rank}", "distributed.backend=deepspeed",
                 f"distributed.zero_stage={stage}", f'output.dir="{folder}"', *more]
        if resume:
            extra.append(f'train.resume_from_checkpoint="{resume[0]}"')
        trainer = Trainer(load_config("configs/tiny_random.toml", BASE + extra))
        result = trainer.train()
        weights = {k: v.detach().contiguous() for k, v in trainer.text_encoder.state_dict().items()}
        save_file(weights, str(folder / f"rank{rank}.safetensors"))
        (folder / f"rank{rank}.json").write_text(json.dumps({
            "optimizer_state_bytes": trainer.ds.optimizer_state_bytes(), "world_size": trainer.dist.world_size,
            "losses": [m["loss"] for m in result.history]}))
    if trainer is not None:
        shutdown(trainer.dist)

if __name__ == "__main__":
    main(sys.argv[1:])
