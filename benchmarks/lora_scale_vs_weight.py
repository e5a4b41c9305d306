"""How far a LoRA scale s (weight space) and the interpolation weight w = s (embedding space) disagree, measured on
a tuned encoder LoRA and prompts: for each s, ||e(W + s dW) - ((1 - s) e(W) + s e(W + dW))|| / ||e(W + dW) - e(W)||
over the prompts' conditioning (all tokens). 0 at s = 0 and s = 1 by construction; in between it is the bend of
the path that layer norms, softmax and GELU put between the two knobs.

    python benchmarks/lora_scale_vs_weight.py --config builtin:tiny --lora RUN [--prompts builtin:tiny_world:test]
        --out DIR     # DIR/lora_scale_vs_weight.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SCALES = (0.25, 0.5, 0.75, 1.5)


@torch.no_grad()
def measure(config: str, lora: str, prompts_spec: str, max_prompts: int) -> dict:
    from textcraftor_fast import load_config
    from textcraftor_fast.evaluation.prompts import eval_prompts
    from textcraftor_fast.models import load_components
    from textcraftor_fast.models.encoder_lora import stack_loras
    from textcraftor_fast.models.text import encode_prompts

    cfg = load_config(config)
    comp = load_components(cfg.model, seed=cfg.seed)
    prompts = eval_prompts(prompts_spec, "prompt", max_prompts)
    base = comp.text_encoder.float().eval()
    e0 = encode_prompts(base, comp.tokenizer, prompts)
    e1 = encode_prompts(stack_loras(base, [(lora, 1.0)]), comp.tokenizer, prompts)
    span = float((e1 - e0).norm())
    rows = []
    for s in SCALES:
        scaled = encode_prompts(stack_loras(base, [(lora, s)]), comp.tokenizer, prompts)
        interpolated = (1 - s) * e0 + s * e1
        rows.append({"s": s, "relative_gap": float((scaled - interpolated).norm()) / span,
                     "cosine": float(torch.nn.functional.cosine_similarity(
                         (scaled - e0).flatten(), (interpolated - e0).flatten(), dim=0))})
    return {"lora": str(Path(lora).resolve()), "prompts": prompts_spec, "n_prompts": len(prompts),
            "update_norm_over_base_norm": span / float(e0.norm()), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="builtin:tiny")
    ap.add_argument("--lora", required=True, help="an encoder LoRA folder or run")
    ap.add_argument("--prompts", default="builtin:tiny_world:test")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = measure(args.config, args.lora, args.prompts, args.max_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_scale_vs_weight.json").write_text(json.dumps(result, indent=1))
    for row in result["rows"]:
        print(f"s = w = {row['s']}: gap {row['relative_gap']:.4f} of the full update, cosine {row['cosine']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
