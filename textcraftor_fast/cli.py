"""`textcraftor-fast train|evaluate|generate|export|demo`: the only place that configures logging.

Bad input exits with status 2 and a one-line error (no traceback); `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from safetensors import SafetensorError

from .config import ConfigError, load_config

logger = logging.getLogger("textcraftor_fast")


def _setup_logging(verbose: bool) -> None:
    # Only rank 0 talks at INFO; other ranks only warn (one place for rank filtering).
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if (rank == 0 or verbose) else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers/diffusers print a progress bar per save/load and advice about optional packages on
    # every model load; our own progress bar and log say what matters. Env vars, because both libraries
    # (re)configure their loggers when first imported, which happens later.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train

    overrides = list(args.set or [])
    if args.resume:
        overrides.append(f'train.resume_from_checkpoint="{args.resume}"')
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result.checkpoint}")
        if result.text_encoder is not None:
            print(f"text encoder: {result.text_encoder}")
        if result.unet is not None:
            print(f"unet: {result.unet}")
    return 0


def _read_prompt_args(args: argparse.Namespace) -> list[str]:
    from .data import load_prompts

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += load_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from .inference import GRID_NAME, GenerateOptions, generate

    cfg = load_config(args.config, list(args.set or []))
    opts = GenerateOptions(num_steps=args.steps or cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
                           switch_step=args.switch_step, weight=args.weight, seed=args.seed,
                           timestep_spacing=cfg.sampler.timestep_spacing)
    paths = generate(cfg.model, _read_prompt_args(args), args.out, args.text_encoder or [], args.weights, opts,
                     cfg.train.device, grid=args.grid, unet=args.unet)
    print(f"wrote {len(paths)} images to {args.out}" + (f" and the contact sheet {GRID_NAME}" if args.grid else ""))
    return 0


EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16"}


def _refuse_overwriting_base(out: str, model_path: str) -> None:
    # A pipeline export into the base folder would replace its original text encoder with the tuned one.
    if model_path and Path(out).resolve() == Path(model_path).resolve():
        raise ConfigError(f"--out '{out}' is the base model (model.path); write the export somewhere else")


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .loaders import load_components
    from .models.export import check_layout, export_tuned
    from .models.loading import load_text_encoder
    from .models.lora import load_unet

    cfg = load_config(args.config, list(args.set or []))
    # Before loading the base model, which takes a while at SD1.5 size.
    check_layout(args.layout, args.full, args.text_encoder is not None, args.unet is not None)
    _refuse_overwriting_base(args.out, cfg.model.path)
    comp = load_components(cfg.model, seed=cfg.seed)
    encoder = load_text_encoder(args.text_encoder, config=comp.text_encoder.config) if args.text_encoder else None
    unet = load_unet(args.unet, comp.unet, merge=args.layout != "lora") if args.unet else None
    dtype = getattr(torch, EXPORT_DTYPES[args.dtype])
    path = export_tuned(comp, encoder, args.out, layout=args.layout, full=args.full, dtype=dtype,
                        timestep_spacing=cfg.sampler.timestep_spacing, unet=unet)
    print(f"exported: {path}")
    return 0


class _Entry(argparse.Action):
    """--text-encoder and --model append to one list, so that --name follows the order they were given in."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = list(getattr(namespace, self.dest) or [])
        entries.append((self.const, value))
        setattr(namespace, self.dest, entries)


def _compare_pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not (sep and a and b):
        raise argparse.ArgumentTypeError(f"expected NAME:NAME such as both:encoder, got {text!r}")
    return a, b


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvalOptions, Tuned, evaluate

    cfg = load_config(args.config, list(args.set or []))
    prompts = args.prompts or ("builtin:tiny_world" if cfg.model.kind == "tiny_world" else "builtin:parti")
    opts = EvalOptions(prompts=prompts, max_prompts=args.max_prompts, seeds_per_prompt=args.seeds_per_prompt,
                       weights=tuple(args.weights) if args.weights is not None else EvalOptions.weights,
                       switch_steps=tuple(args.switch_steps) if args.switch_steps is not None else None,
                       switch_step=args.switch_step, num_steps=args.steps, batch_size=args.batch_size,
                       grid_prompts=args.grid_prompts, device=cfg.train.device, compare=tuple(args.compare or ()))
    entries = [path if kind == "text_encoder" else Tuned.from_folder(path) for kind, path in args.entries or []]
    result = evaluate(cfg, entries, args.out, opts, names=args.name)
    print(result.files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def _number_list(kind: type):
    def parse(text: str) -> list:
        if text.strip().lower() == "none":
            return []
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s such as 0,1 (or 'none'), "
                                             f"got {text!r}") from None
    return parse


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


DEMO_OUT = "outputs/demo"


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .tiny.demo import run_demo
        from .tiny.sweep import run_sweep
    except ImportError as e:
        raise ConfigError(f"the tiny-world demo is not available in this build: {e}") from None
    cfg = load_config(args.config, list(args.set or []))
    if any(t < 1 for t in args.threads or []):
        raise ConfigError(f"--threads: thread counts must be >= 1, got {args.threads}")
    if args.eval_seeds is not None and args.eval_seeds < 1:
        raise ConfigError(f"--eval-seeds: noise seeds per caption must be >= 1, got {args.eval_seeds}")
    if args.seeds or (args.threads and len(args.threads) > 1):
        if args.quick:
            raise ConfigError("--quick runs one shortened demo; drop it or drop --seeds/--threads (the sweep)")
        out = args.out if args.out != DEMO_OUT else DEMO_OUT + "-sweep"
        import torch

        sweep = run_sweep(cfg, args.seeds or [cfg.seed], args.threads or [torch.get_num_threads()], out,
                          split=args.split, seeds_per_caption=args.eval_seeds)
        return 0 if sweep["passed"] == len(sweep["runs"]) else 1
    run_demo(cfg, out_dir=Path(args.out), quick=args.quick, seeds_per_caption=args.eval_seeds, split=args.split,
             threads=args.threads[0] if args.threads else None, paper=args.paper)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="textcraftor-fast", description=(
        "TextCraftor: fine-tune Stable Diffusion's text encoder with differentiable rewards."))
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment is
    # what we read, so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log on every rank")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,evaluate,generate,export,demo}")

    def common(sp: argparse.ArgumentParser, config_required: bool = True) -> None:
        sp.add_argument("--config", required=config_required, help="TOML config file (e.g. configs/tiny.toml) or builtin:tiny")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=3 (repeatable)")

    t = sub.add_parser("train", help="fine-tune the text encoder (or the UNet: --set train.stage=unet)")
    common(t)
    t.add_argument("--resume", metavar="PATH|latest", help="resume from a checkpoint folder or the latest one")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate images with tuned encoder(s): switch step, interpolation, mixing")
    common(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="prompts file (.txt/.jsonl/.csv/.parquet)")
    g.add_argument("--text-encoder", action="append", help="tuned encoder folder/checkpoint/.safetensors (repeatable)")
    g.add_argument("--unet", help="tuned UNet (UNet stage): a LoRA folder, a UNet folder, or a run holding unet_lora/ "
                                  "or unet/; used at every step")
    g.add_argument("--weights", type=float, nargs="+", help="one mixing weight per --text-encoder")
    g.add_argument("--weight", type=float, default=1.0, help="interpolation w for a single encoder (default 1)")
    g.add_argument("--switch-step", type=int, default=10, help="original encoder before this step (default 10)")
    g.add_argument("--steps", type=int, help="DDIM steps (default: sampler.num_steps)")
    g.add_argument("--seed", type=int, default=0, help="image i starts from seed + i's noise (default 0)")
    g.add_argument("--out", default="outputs/generate",
                   help="output folder for PNGs (each records its prompt, seed and settings as PNG text)")
    g.add_argument("--grid", action="store_true", help="also write grid.png: every image labelled with its prompt")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("export", help="export a tuned text encoder and/or UNet: a component folder, a UNet LoRA, a "
                                      "whole diffusers pipeline, or the original single-file layout")
    common(e)
    e.add_argument("--text-encoder", help="tuned encoder folder/run/checkpoint/.safetensors")
    e.add_argument("--unet", help="tuned UNet (UNet stage): a LoRA folder, a UNet folder, or a run/checkpoint folder "
                                  "holding unet_lora/ or unet/")
    e.add_argument("--layout", choices=["diffusers", "pipeline", "single_file", "lora"], default="diffusers",
                   help="diffusers: the tuned component's folder (a text_encoder/ folder for CLIPTextModel."
                        "from_pretrained, or a merged unet/ folder); lora: the UNet LoRA for pipe.load_lora_weights; "
                        "pipeline: the base model's folder with the tuned parts (StableDiffusionPipeline."
                        "from_pretrained); single_file: the tuned parts' original-layout keys in one .safetensors "
                        "(default diffusers)")
    e.add_argument("--full", action="store_true",
                   help="with --layout single_file: the whole original-layout checkpoint (base parts + tuned "
                        "ones), for StableDiffusionPipeline.from_single_file and other SD1.5 tools")
    e.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32)")
    e.add_argument("--out", required=True,
                   help="output folder (diffusers, lora, pipeline) or .safetensors file (single_file)")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("evaluate", help="paired evaluation of tuned encoder(s) and/or UNet(s) against the original: "
                                        "table with 95%% intervals, picture grid, interpolation and switch-step curves")
    common(v)
    v.add_argument("--text-encoder", action=_Entry, const="text_encoder", dest="entries", metavar="PATH",
                   help="tuned encoder: text_encoder folder, run folder, or .safetensors (repeatable; none: the "
                        "original alone)")
    v.add_argument("--model", action=_Entry, const="model", dest="entries", metavar="PATH",
                   help="a tuned model: a run folder holding text_encoder/ and/or unet_lora/ (or unet/), e.g. a "
                        "UNet-stage run, or a UNet LoRA/UNet folder alone (repeatable)")
    v.add_argument("--name", action="append", help="a column name per --text-encoder / --model, in their order "
                                                   "(default: the run folder's name)")
    v.add_argument("--compare", action="append", type=_compare_pair, metavar="A:B",
                   help="also the paired difference A - B between two evaluated models, e.g. both:encoder "
                        "(repeatable)")
    v.add_argument("--prompts", help="prompt file, builtin:parti, or builtin:tiny_world[:validation] (default: "
                                     "builtin:tiny_world for the tiny world, else builtin:parti)")
    v.add_argument("--max-prompts", type=int, metavar="N", help="the first N distinct prompts")
    v.add_argument("--seeds-per-prompt", type=int, default=1, metavar="N", help="paired noise seeds per prompt")
    v.add_argument("--weights", type=_number_list(float), metavar="W,W,...",
                   help="interpolation weights of the w-curve (default 0,0.25,0.5,0.75,1; 'none' skips it)")
    v.add_argument("--switch-steps", type=_number_list(int), metavar="S,S,...",
                   help="switch steps of the switch-step curve (default 0,n/4,n/2,3n/4; 'none' skips it)")
    v.add_argument("--switch-step", type=int, help="where tuned encoders take over in the table (default: the "
                                                   "config's sampler.switch_step, or num_steps - grad_steps)")
    v.add_argument("--steps", type=int, help="DDIM steps (default: sampler.num_steps)")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--grid-prompts", type=int, default=8, metavar="N", help="rows of the picture grid")
    v.add_argument("--out", default="outputs/evaluate", help="output folder (its cache/ makes reruns resume)")
    v.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("demo", help="the embedded tiny world: fine-tune, evaluate before/after, write images; "
                                    "with --seeds/--threads, the robustness sweep (exit status 1 unless every "
                                    "run PASSes)")
    common(d, config_required=False)
    d.set_defaults(config="builtin:tiny")
    d.add_argument("--out", default=DEMO_OUT, help=f"output folder (default {DEMO_OUT}; {DEMO_OUT}-sweep for a sweep)")
    d.add_argument("--quick", action="store_true", help="a shortened run (smoke test)")
    d.add_argument("--seeds", type=_int_list, metavar="S,S,...",
                   help="fine-tuning seeds to sweep, e.g. 0,1,2,3,4 (the main arm only, one table of verdicts)")
    d.add_argument("--threads", type=_int_list, metavar="T,T,...",
                   help="torch thread counts: one sets the demo's; several (or with --seeds) sweep them")
    d.add_argument("--split", choices=["test", "validation"], default="test",
                   help="held-out captions to evaluate on: 'test' (reported) or 'validation' (design work)")
    d.add_argument("--eval-seeds", type=int, metavar="N", help="noise seeds per held-out caption in the evaluation")
    d.add_argument("--paper", action="store_true",
                   help="also fine-tune the paper's recipe (last K = 5 steps, trainable unconditional embedding) on "
                        "the same world and report it beside the main arm (about 4 more minutes on 2 cores)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError, ImportError, RuntimeError, SafetensorError) as e:
        if args.debug:
            raise
        print(f"textcraftor-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
