"""One training step at SDXL scale on CPU: ours vs the official recipe applied to SDXL, each arm in its own process,
arms interleaved: sd15_step.py's machinery (`run`, the arms, the child processes) on an SDXL model.

The official recipe's choices applied to SDXL (baseline_official.py): UNet and reward tower left requires_grad=True,
every graph-carrying UNet call checkpointed, plain VAE decode, no heap trims, stock ops. Both arms run in ONE
precision, the run's: an fp32 SDXL UNet is 9.6 GiB and the official arm adds a gradient of the same size, which
with encoder 2 (2.6 GiB) and the tower does not fit a 24 GiB box. The default configuration is the one that fits:
frozen modules in bf16 (`train.mixed_precision=bf16`, in both arms) and encoder 1 trained, encoder 2 frozen
(`encoder.train=["text_encoder"]`); `--precision no --train text_encoder` runs ours in fp32 (the baseline alone
would need its computed peak: `memory_need`).
Models: random weights in the SDXL base 1.0 architecture written as a diffusers folder (random_towers.py:
`write_random_sdxl`) and read by the real loader (model.kind=pretrained); a clip_score reward on a CLIP ViT-L/14
tower (its text half is encoder 1, as SDXL's encoder 1 is ViT-L/14's text transformer; it resizes SDXL's images).

  python benchmarks/sdxl_step.py --out DIR [--rounds 1 --steps 2 --threads 2 --latent 16 --num-steps 25 --k 5]
                                           [--arms baseline,lean,fast] [--precision bf16] [--train text_encoder]

writes DIR/sdxl_step.json (sd15_step.py's summary: step times, whole-process and steps-only peak RSS per arm,
ratios to the baseline). test_bench_sdxl_step.py calls `run` at this size; under `--benchmark-disable` (make test)
on tiny random SDXL-architecture models.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sd15_step import ALL_ARMS, format_table, run, sd15_overrides, step_arguments, tiny_overrides

GIB = 2**30
PRECISION = "bf16"  # both arms: what lets the official arm fit 24 GiB
TRAINED = ("text_encoder",)  # encoder 1 (CLIP ViT-L) learns, encoder 2 (bigG) is frozen and shared


def _sdxl(precision: str, train: tuple[str, ...]) -> list[str]:
    return ["model.family=sdxl", f"train.mixed_precision={precision}",
            "encoder.train=[" + ", ".join(f'"{n}"' for n in train) + "]"]


def sdxl_overrides(model: Path, tower: Path, latent: int, num_steps: int, k: int, batch: int,
                   precision: str = PRECISION, train: tuple[str, ...] = TRAINED) -> list[str]:
    return [*sd15_overrides(model, tower, latent, num_steps, k, batch), *_sdxl(precision, train)]


def tiny_sdxl_overrides(tower: Path, num_steps: int, k: int, batch: int, precision: str = PRECISION,
                        train: tuple[str, ...] = TRAINED) -> list[str]:
    """The same code path on tiny random SDXL-architecture models (make test)."""
    return [*tiny_overrides(tower, num_steps, k, batch), *_sdxl(precision, train)]


def memory_need(params: dict[str, int], precision: str, train: tuple[str, ...], optimizer_bytes: int = 8) -> dict:
    """Resident bytes each arm holds before any activation, from parameter counts {unet, vae_decoder,
    text_encoder, text_encoder_2, tower_vision, tower_text}: frozen modules in the run's precision, trained
    encoders in fp32 with a frozen copy (the early steps' conditioning) and Adam's two moments; the official arm
    adds the UNet's and the tower's weight gradients (same dtype as the weights) and the trained encoders' gradients
    (ours steps each tensor inside backward: none held). Ours runs the tower's text transformer as the original
    encoder 1 (the same CLIP ViT-L weights: share_text_transformers); the official arm holds it twice."""
    frozen = 2 if precision in ("bf16", "fp16") else 4
    trained = [n for n in ("text_encoder", "text_encoder_2") if n in train]
    base = frozen * (params["unet"] + params["vae_decoder"] + params["tower_vision"]
                     + params["text_encoder"] + params["text_encoder_2"])
    base += sum((4 + optimizer_bytes) * params[n] for n in trained)
    official = base + frozen * (params["unet"] + params["tower_vision"] + 2 * params["tower_text"])
    official += sum(4 * params[n] for n in trained)
    return {"ours_resident_bytes": base, "official_resident_bytes": official}


def main() -> int:
    ap = step_arguments(__doc__, rounds=1)
    ap.add_argument("--precision", choices=("no", "bf16", "fp16"), default=PRECISION)
    ap.add_argument("--train", type=lambda s: tuple(s.split(",")) if s else (), default=TRAINED,
                    help="comma-separated encoders that learn (empty: both)")
    args = ap.parse_args()
    unknown = set(args.arms) - set(ALL_ARMS)
    if unknown:
        ap.error(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ALL_ARMS)}")
    from random_towers import write_sdxl_in_child

    models = args.out / "models"
    model, tower = models / "sdxl", models / "vit_l14"
    if not (model / "model_index.json").exists() or not tower.exists():
        write_sdxl_in_child(model, tower)
    overrides = sdxl_overrides(model, tower, args.latent, args.num_steps, args.k, args.batch, args.precision,
                               args.train)
    summary = run(overrides, args.out, args.rounds, args.steps, args.threads, args.arms)
    (args.out / "sdxl_step.json").write_text(json.dumps(summary, indent=1))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
