"""What a text-encoder LoRA costs on SD1.5's CLIP ViT-L/14 text encoder (123M parameters), measured, not computed:
trainable parameters, the checkpoint's weight file as written, and the optimizer state held after one step, for
torch AdamW and bitsandbytes' 8-bit AdamW, beside the full encoder's.

    python benchmarks/encoder_lora_sizes.py --out DIR     # DIR/encoder_lora_sizes.json and .md (about a minute)

The encoder is random-initialised in the exact architecture (the shipped SD1.5 config); sizes do not depend on the
values. bitsandbytes keeps fp32 state for tensors under 4,096 elements (its `min_8bit_size`): a LoRA matrix of CLIP-L
has r x 768 elements, so at ranks up to 5 its 8-bit AdamW state is plain fp32.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from textcraftor_fast.config import OptimConfig
from textcraftor_fast.memory.saved_bytes import optimizer_state_bytes
from textcraftor_fast.models.components import SD15_CONFIG_DIR
from textcraftor_fast.models.encoder_lora import add_encoder_lora, save_encoder_lora
from textcraftor_fast.training.optim import build_optimizer

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
SETTINGS = [(4, ATTENTION), (8, ATTENTION), (16, ATTENTION), (32, ATTENTION), (16, ATTENTION + ("fc1", "fc2"))]


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder")
    return CLIPTextModel(config).float()


def state_bytes_after_one_step(model: torch.nn.Module, name: str) -> int:
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-4), torch.device("cpu"))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer_state_bytes(optimizer)


def measure(base, rank: int, targets: tuple[str, ...], folder: Path) -> dict:
    row = {"rank": rank, "targets": list(targets)}
    for name in ("adamw", "adamw8bit"):
        model = copy.deepcopy(base)
        row["params"] = add_encoder_lora(model, rank, float(rank), targets)
        row[f"{name}_state_bytes"] = state_bytes_after_one_step(model, name)
        if name == "adamw":
            save_encoder_lora(model, folder / f"r{rank}-{len(targets)}")
            row["file_bytes"] = (folder / f"r{rank}-{len(targets)}" / "pytorch_lora_weights.safetensors").stat().st_size
    smallest = min(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    row["smallest_tensor"] = smallest
    return row


def run(out: Path) -> dict:
    base = clip_l()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        full = {"params": sum(p.numel() for p in base.parameters())}
        base.save_pretrained(folder / "full")
        full["file_bytes"] = (folder / "full" / "model.safetensors").stat().st_size
        for name in ("adamw", "adamw8bit"):
            full[f"{name}_state_bytes"] = state_bytes_after_one_step(copy.deepcopy(base).requires_grad_(True), name)
        rows = [measure(base, rank, targets, folder) for rank, targets in SETTINGS]
    result = {"encoder": "CLIP ViT-L/14 text encoder (SD1.5 config), fp32", "full": full, "lora": rows,
              "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_lora_sizes.json").write_text(json.dumps(result, indent=1))
    (out / "encoder_lora_sizes.md").write_text(format_table(result) + "\n")
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(result: dict) -> str:
    f = result["full"]
    lines = ["| encoder | trainable params | checkpoint weights MiB | AdamW state MiB | 8-bit AdamW state MiB |",
             "|---|---|---|---|---|",
             f"| full | {f['params']:,} | {_mib(f['file_bytes'])} | {_mib(f['adamw_state_bytes'])} | "
             f"{_mib(f['adamw8bit_state_bytes'])} |"]
    for r in result["lora"]:
        where = "attention" if len(r["targets"]) == 4 else "attention + MLP"
        lines.append(f"| LoRA r={r['rank']} ({where}) | {r['params']:,} | {_mib(r['file_bytes'])} | "
                     f"{_mib(r['adamw_state_bytes'])} | {_mib(r['adamw8bit_state_bytes'])} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    print(format_table(run(ap.parse_args().out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
