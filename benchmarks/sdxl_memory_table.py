"""docs/model_families.md's memory table: SDXL text-encoder tuning on one GPU at batch 1, 1024 px, K = 5, COMPUTED
from measured parameter counts and measured bytes saved for backward, until a GPU measures it.

Inputs, all measured on CPU with the SDXL base 1.0 architecture (random weights, frozen modules in bf16):
  - `SAVED` (test_bench_sdxl_memory.py --benchmark-only): parameter counts; bytes saved by one guided UNet call and
    by one plain VAE decode at latents 16 and 32;
  - this script: bytes saved by the largest UNet block (checkpoint_unet_blocks) and by the largest VAE decoder stage
    (checkpoint_vae="blocks") at latents 16 and 32, with the latent requiring grad as in the sampler's chain.
Activations are extrapolated to the 128x128 latent linearly in the latent's area (a + b * area through the two
points): true where attention saves no score matrix (SDPA's flash / memory-efficient kernels on GPU, our Triton
attention); the two measured points grow 3.3x (UNet) and 4.0x (VAE) for 4x the area.
Reward towers (the paper's four, bf16): parameter counts of open_clip's docs/model_profile.csv (the same numbers
tests/rewards/test_openclip_convert.py checks the converted towers against).

  python benchmarks/sdxl_memory_table.py --saved SAVED.json --out DIR     # DIR/memory_table.{json,md}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9
MIB = 2**20
BF16 = 2
# open_clip docs/model_profile.csv, millions of parameters (image tower, text tower).
TOWERS = {"aesthetic (ViT-L-14 image)": 303.97e6, "clip_score (ViT-g-14)": (1012.65 + 354.03) * 1e6,
          "pickscore (ViT-H-14)": (632.08 + 354.03) * 1e6, "hpsv2 (ViT-H-14)": (632.08 + 354.03) * 1e6}
SIDE = 128  # SDXL's latent side at 1024 px
# A card "fits" a row when the row's total is under 90% of it: the rest is for what the sum leaves out (the CUDA
# context, the activation gradients that flow through the recomputed block, the towers' checkpointed activations,
# allocator fragmentation).
HEADROOM = 0.9


def measure_blocks() -> dict[str, dict[str, int]]:
    """Bytes saved by the largest UNet block and the largest VAE decoder stage at latents 16 and 32 (bf16, CFG
    batch 2 for the UNet, batch 1 for the decode)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes
    from textcraftor_fast.models.families import CONFIG_DIRS
    from textcraftor_fast.sampler import unet_blocks, vae_decoder_stages

    torch.manual_seed(0)
    folder = CONFIG_DIRS["sdxl"]
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))).to(torch.bfloat16)
    vae.requires_grad_(False).encoder = None
    out: dict[str, dict[str, int]] = {"vae_stage_max": {}, "unet_block_max": {}}
    for side in (16, 32):
        x, largest = torch.randn(1, 4, side, side, dtype=torch.bfloat16), 0
        for stage in vae_decoder_stages(vae):
            x = x.detach().requires_grad_()
            n, x = saved_tensor_bytes(lambda: stage(x), list(vae.parameters()))
            largest = max(largest, n)
        out["vae_stage_max"][str(side)] = largest
    del vae
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
    unet = unet.to(torch.bfloat16).requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    for side in (16, 32):
        per_block: dict[int, dict[int, int]] = {}
        current = [-1]

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in weights and current[0] >= 0:
                per_block.setdefault(current[0], {})[s.data_ptr()] = s.nbytes()
            return t

        hooks = []
        for i, block in enumerate(unet_blocks(unet)):
            hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
            hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
        x = torch.randn(2, 4, side, side, dtype=torch.bfloat16, requires_grad=True)
        emb = torch.randn(2, 77, 2048, dtype=torch.bfloat16, requires_grad=True)
        added = {"text_embeds": torch.randn(2, 1280, dtype=torch.bfloat16),
                 "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, dtype=torch.bfloat16)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, 999, encoder_hidden_states=emb, added_cond_kwargs=added)
        for h in hooks:
            h.remove()
        out["unet_block_max"][str(side)] = max(sum(v.values()) for v in per_block.values())
    return out


def at_side(points: dict[str, int], side: int = SIDE) -> float:
    """Linear in the latent's area through the two measured points."""
    (s0, b0), (s1, b1) = sorted((int(s), v) for s, v in points.items())
    slope = (b1 - b0) / (s1 ** 2 - s0 ** 2)
    return b0 + slope * (side ** 2 - s0 ** 2)


def table(saved: dict, blocks: dict) -> dict:
    p = saved["params"]
    frozen = {"unet": BF16 * p["unet"], "vae_decoder": BF16 * p["vae_decoder"],
              "reward_towers": BF16 * sum(TOWERS.values())}
    acts = {"unet_call": at_side(saved["unet_call_saved_bytes_by_latent"]),
            "unet_block_max": at_side(blocks["unet_block_max"]),
            "vae_decode": at_side(saved["vae_decode_saved_bytes_by_latent"]),
            "vae_stage_max": at_side(blocks["vae_stage_max"])}
    # bytes per trained parameter: fp32 weight, fp32 gradient (none held with step_in_backward), optimizer state
    # (AdamW: two fp32 moments; 8-bit AdamW: two 1-byte moments); plus its frozen bf16 copy (the original).
    optim = {"AdamW": 8, "8-bit AdamW": 2}
    rows = []
    for trained in (("text_encoder",), ("text_encoder_2",), ("text_encoder", "text_encoder_2")):
        for opt, blocks_on, sib, zero in (("AdamW", True, False, 1), ("AdamW", False, False, 1),
                                          ("8-bit AdamW", True, False, 1), ("8-bit AdamW", True, True, 1),
                                          ("AdamW", True, False, 8)):
            n_trained = sum(p[n] for n in trained)
            n_frozen = sum(p[n] for n in ("text_encoder", "text_encoder_2") if n not in trained)
            grad = 0 if sib else 4
            state = n_trained * (4 + (grad + optim[opt]) / zero) + BF16 * n_trained + BF16 * n_frozen
            recompute = max(acts["unet_block_max"] if blocks_on else acts["unet_call"],
                            acts["vae_stage_max"] if blocks_on else acts["vae_decode"])
            total = sum(frozen.values()) + state + recompute
            rows.append({"trained": "+".join(trained), "optimizer": opt, "blocks": blocks_on,
                         "step_in_backward": sib, "zero2_gpus": zero, "encoders_gb": state / GB,
                         "largest_recompute_gb": recompute / GB, "total_gb": total / GB,
                         "fits": [gpu for gpu in (24, 40, 80) if total / GB <= gpu * HEADROOM]})
    return {"frozen_gb": {k: v / GB for k, v in frozen.items()}, "activations_at_128_gb": {k: v / GB for k, v in
            acts.items()}, "measured_blocks": blocks, "rows": rows}


def markdown(t: dict) -> str:
    f = t["frozen_gb"]
    lines = [f"Frozen, bf16: UNet {f['unet']:.2f} GB, VAE decoder {f['vae_decoder']:.2f} GB, the four reward towers "
             f"{f['reward_towers']:.2f} GB. Largest recompute at 1024 px: one UNet call "
             f"{t['activations_at_128_gb']['unet_call']:.1f} GB, its largest block "
             f"{t['activations_at_128_gb']['unet_block_max']:.1f} GB; plain VAE decode "
             f"{t['activations_at_128_gb']['vae_decode']:.1f} GB, its largest stage "
             f"{t['activations_at_128_gb']['vae_stage_max']:.1f} GB.", "",
             "| trained | optimizer | UNet/VAE recompute | step_in_backward | ZeRO-2 GPUs | encoders + state (GB) | "
             "total (GB) | fits (GB cards) |", "|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        lines.append(f"| {r['trained']} | {r['optimizer']} | {'blocks' if r['blocks'] else 'whole call'} | "
                     f"{'yes' if r['step_in_backward'] else 'no'} | {r['zero2_gpus']} | {r['encoders_gb']:.1f} | "
                     f"{r['total_gb']:.1f} | {', '.join(map(str, r['fits'])) or 'none'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saved", type=Path, required=True, help="test_bench_sdxl_memory.py's latest-sdxl-memory.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t = table(json.loads(args.saved.read_text()), measure_blocks())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_table.json").write_text(json.dumps(t, indent=1))
    (args.out / "memory_table.md").write_text(markdown(t))
    print(markdown(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
