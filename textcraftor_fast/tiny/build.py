"""Pretrain the tiny world: VAE -> judge -> UNet + text encoder (jointly), then save a diffusers folder.

    python -m textcraftor_fast.tiny.build [--out textcraftor_fast/tiny/weights] [--unet-steps N]
        [--held-out-seed N | --held-out-test PAIRS --held-out-validation PAIRS]

Deterministic: every random draw flows from `--seed` through torch.Generator / random.Random, and the
thread count is pinned (float reductions depend on it). Budget: 20-40 minutes on 2 CPU cores (world 4: 21 unloaded; world 5: 40 on a shared box).
The output folder has SD's layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
plus judge/ (safetensors + config.json) and build_info.json (steps, losses, timings, base accuracies, and the
held-out split under "held_out", which everything that evaluates the world reads). Without a --held-out-* flag
the split is world 5's (WORLD5_HELD_OUT), so the plain command rebuilds the shipped world.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from . import models as M
from .split import HeldOut, draw_held_out, parse_pairs
from .tokenizer import load_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The shipped world's split: the build's default, so `python -m textcraftor_fast.tiny.build` rebuilds world 5. Only
# the build reads it; evaluation reads a world's split from its build_info.json.
WORLD5_HELD_OUT = HeldOut(
    test=parse_pairs("red circle,cyan circle,green square,pink square,blue triangle,lime triangle"),
    validation=parse_pairs("purple circle,navy circle,orange square,brown square,yellow triangle,teal triangle"))


def _adamw(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def _lr_at(step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up then cosine to 10%: the multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """Yield `steps` index batches drawn from randperm epochs."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def train_vae(images: torch.Tensor, steps: int, seed: int, batch: int = 32, lr: float = 2e-3):
    """Reconstruction (L1 + MSE) + a tiny KL, as SD's VAE; returns the VAE with scaling_factor set."""
    torch.manual_seed(seed)
    vae = M.build_vae()
    opt = _adamw(vae.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    x_all = images * 2 - 1
    for step, idx in enumerate(_batches(len(x_all), batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_at(step, steps)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.4f", step, steps, loss.item())
    vae.eval().requires_grad_(False)
    std = M.latent_stats(vae, images[:512])
    vae.register_to_config(scaling_factor=1.0 / std)
    logger.info("vae latent std %.4f -> scaling_factor %.4f", std, 1.0 / std)
    return vae


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append((vae(images[i:i + batch] * 2 - 1).sample * 0.5 + 0.5).clamp(0, 1))
    return torch.cat(out)


def train_judge(images: torch.Tensor, labels: dict[str, torch.Tensor], vae, steps: int, seed: int,
                batch: int = 64, lr: float = 2e-3) -> M.Judge:
    """Cross-entropy on every attribute, on clean images and VAE reconstructions (half each), with
    a little pixel noise so decoded samples (slightly soft, slightly noisy) stay in distribution."""
    torch.manual_seed(seed)
    judge = M.Judge()
    recon = reconstruct(vae, images)
    pool = torch.cat([images, recon])
    pool_labels = {a: torch.cat([v, v]) for a, v in labels.items()}
    opt = _adamw(judge.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    for step, idx in enumerate(_batches(len(pool), batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_at(step, steps)
        x = (pool[idx] + 0.03 * torch.randn(pool[idx].shape, generator=gen)).clamp(0, 1)
        logits = judge(x)
        # Label smoothing keeps the judge's probabilities off 0/1, so the reward's gradient stays informative.
        loss = sum(F.cross_entropy(logits[a], pool_labels[a][idx], label_smoothing=0.1) for a in D.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("judge step %d/%d loss %.4f", step, steps, loss.item())
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_accuracy(judge: M.Judge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = judge(images)
    return {a: (logits[a].argmax(1) == labels[a]).float().mean().item() for a in D.ATTRIBUTES}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached posterior (mean, std) of every training image, in scaled latent units."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


class _EMA:
    def __init__(self, modules, decay: float) -> None:
        self.modules = list(modules)
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p, 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange model and shadow weights (call twice to restore): snapshots without copies."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train_generator(lat_mean, lat_std, prompts: list[str], tokenizer, steps: int, seed: int,
                    batch: int = 64, lr: float = 1e-3, drop: float = 0.1, ema: float = 0.995,
                    on_snapshot=None, snapshot_every: int = 0):
    """SD's epsilon-prediction objective, UNet and text encoder trained jointly; `drop` of the captions
    are replaced by "" (the unconditional prompt CFG needs). Returns (unet, text_encoder, loss curve)."""
    torch.manual_seed(seed)
    unet, te = M.build_unet(), M.build_text_encoder(tokenizer)
    sched = M.build_scheduler()
    ids_all = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
    ids, empty = ids_all[:-1], ids_all[-1]
    params = list(unet.parameters()) + list(te.parameters())
    opt = _adamw(params, lr)
    avg = _EMA([unet, te], ema)
    gen = torch.Generator().manual_seed(seed)
    acp = sched.alphas_cumprod
    curve, t0 = [], time.time()
    for step, idx in enumerate(_batches(len(ids), batch, steps, gen)):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_at(step, steps, warmup=100)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        keep = torch.rand(len(idx), generator=gen) >= drop
        batch_ids = torch.where(keep[:, None], ids[idx], empty[None])
        emb = te(batch_ids)[0]  # (B, L, 64)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=emb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg.update(step)
        curve.append(loss.item())
        if snapshot_every and on_snapshot is not None and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            on_snapshot(step + 1, avg)
        if step % 100 == 0 or step == steps - 1:
            logger.info("generator step %d/%d loss %.4f (%.0f s)", step, steps,
                        sum(curve[-100:]) / len(curve[-100:]), time.time() - t0)
    avg.copy_to_model()
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False), curve


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }


def save_judge(judge: M.Judge, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": 32, "attributes": D.ATTRIBUTES}, indent=2) + "\n")


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m textcraftor_fast.tiny.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package's weights/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--judge-steps", type=int, default=600)
    p.add_argument("--judge-images", type=int, default=4096, help="jittered drawings of every caption")
    p.add_argument("--unet-steps", type=int, default=1600)
    p.add_argument("--n-images", type=int, default=8192, help="jittered training images (train captions)")
    p.add_argument("--reuse", default="", help="comma list of stages to load from --out instead of training "
                                               "(vae, judge): for experiments on the generator only")
    p.add_argument("--snapshot-every", type=int, default=0, help="save EMA generator snapshots under "
                   "--out/snapshots/<step> every N steps (experiments)")
    p.add_argument("--eval-seeds", type=int, default=9, help="seeds per held-out caption in the final check "
                                                             "(0 skips it)")
    p.add_argument("--held-out-test", metavar="PAIRS", help="the test split's colour-shape pairs, comma-separated "
                   "('red circle,cyan circle,...'); with --held-out-validation. Default: world 5's split")
    p.add_argument("--held-out-validation", metavar="PAIRS", help="the validation split's pairs (as --held-out-test)")
    p.add_argument("--held-out-seed", type=int, metavar="N", help="draw a fresh split from seed N by the rule "
                   "(every colour held out once, two pairs of every shape per split) instead of giving the pairs")
    args = p.parse_args(argv)
    try:
        args.held_out = held_out_from_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def held_out_from_args(args: argparse.Namespace) -> HeldOut:
    """The split the --held-out-* flags name (checked against the rule); world 5's when none is given."""
    pairs = (args.held_out_test, args.held_out_validation)
    if args.held_out_seed is not None:
        if any(pairs):
            raise ValueError("--held-out-seed draws the split; drop --held-out-test/--held-out-validation, or the seed")
        return draw_held_out(args.held_out_seed)
    if any(pairs):
        if not all(pairs):
            raise ValueError("--held-out-test and --held-out-validation go together (a split needs both)")
        return HeldOut(test=parse_pairs(args.held_out_test), validation=parse_pairs(args.held_out_validation))
    return WORLD5_HELD_OUT


def _stage_vae(args, out: Path, train_images):
    from diffusers import AutoencoderKL

    if "vae" in args.reuse:
        return AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    vae = train_vae(train_images, args.vae_steps, args.seed + 1)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return vae


def _stage_judge(args, out: Path, vae) -> tuple[M.Judge, dict]:
    all_imgs, all_caps = D.make_dataset(D.all_captions(), args.judge_images, args.seed + 2)
    test_imgs, test_caps = D.make_dataset(D.all_captions(), max(1, args.judge_images // 4), args.seed + 3)
    if "judge" in args.reuse:
        judge = M.read_judge(out / "judge")
    else:
        judge = train_judge(all_imgs, D.labels(all_caps), vae, args.judge_steps, args.seed + 4)
        save_judge(judge, out / "judge")
    acc = {"clean": judge_accuracy(judge, test_imgs, D.labels(test_caps)),
           "vae_recon": judge_accuracy(judge, reconstruct(vae, test_imgs), D.labels(test_caps))}
    logger.info("judge accuracy on fresh drawings: %s", acc)
    return judge, acc


def _snapshot_saver(out: Path):
    def save(step: int, avg: _EMA) -> None:
        unet_te = avg.modules
        avg.swap()
        unet_te[0].save_pretrained(out / "snapshots" / str(step) / "unet", safe_serialization=True)
        unet_te[1].save_pretrained(out / "snapshots" / str(step) / "text_encoder", safe_serialization=True)
        avg.swap()
    return save


def main(argv=None) -> dict:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    held_out: HeldOut = args.held_out
    t0 = time.time()
    info = {"args": {k: str(v) for k, v in vars(args).items() if k != "held_out"}, "seconds": {},
            "held_out": held_out.to_json()}
    tok = load_tokenizer(save_tokenizer(out / "tokenizer"))
    M.build_scheduler().save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    logger.info("held out: test %s; validation %s", *held_out.to_json().values())
    images, caps = D.make_dataset(held_out.train_captions(), args.n_images, args.seed)
    vae = _stage_vae(args, out, images)
    info["seconds"]["vae"] = time.time() - t0
    judge, info["judge_accuracy"] = _stage_judge(args, out, vae)
    info["seconds"]["judge"] = time.time() - t0
    mean, std = encode_latents(vae, images)
    unet, te, curve = train_generator(mean, std, [c.text for c in caps], tok, args.unet_steps, args.seed + 5,
                                      on_snapshot=_snapshot_saver(out), snapshot_every=args.snapshot_every)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    info["seconds"]["generator"] = time.time() - t0
    info["generator_loss_last100"] = sum(curve[-100:]) / len(curve[-100:])
    if args.eval_seeds > 0:
        from ..models import SDComponents
        from .evaluate import base_accuracy

        comp = SDComponents(unet, vae, te, tok, M.build_scheduler())
        info["base_held_out"] = base_accuracy(comp, judge, held_out, seeds_per_caption=args.eval_seeds)
    info["seconds"]["total"] = time.time() - t0
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("built the tiny world in %.0f s -> %s\n%s", info["seconds"]["total"], out,
                json.dumps(info.get("base_held_out", {}), indent=2))
    return info


if __name__ == "__main__":
    main()
