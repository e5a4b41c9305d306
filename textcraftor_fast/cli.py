"""`textcraftor-fast train|evaluate|generate|export|demo`: the only place that configures logging.

Bad input exits with status 2 and a one-line error (no traceback); `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from safetensors import SafetensorError

from .config import ConfigError, load_config
from .registry import COMMANDS, MODEL_KINDS, PROMPT_SETS, import_target

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
    from .training.trainer import train

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


def _switch_step_arg(args: argparse.Namespace) -> int | float:
    """--switch-step, or generate's and evaluate's shared default (imported here: `--help` loads no torch)."""
    from .inference import DEFAULT_SWITCH_STEP

    return DEFAULT_SWITCH_STEP if args.switch_step is None else args.switch_step


def _cmd_generate(args: argparse.Namespace) -> int:
    from .inference import GRID_NAME, GenerateOptions, generate

    cfg = load_config(args.config, list(args.set or []))
    opts = GenerateOptions(num_steps=args.steps or cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
                           switch_step=_switch_step_arg(args), weight=args.weight, seed=args.seed,
                           timestep_spacing=cfg.sampler.timestep_spacing)
    paths = generate(cfg.model, _read_prompt_args(args), args.out, args.text_encoder or [], args.weights, opts,
                     cfg.train.device, grid=args.grid, unet=args.unet)
    print(f"wrote {len(paths)} images to {args.out}" + (f" and the contact sheet {GRID_NAME}" if args.grid else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .models.export import export

    cfg = load_config(args.config, list(args.set or []))
    path = export(cfg, args.out, args.text_encoder, args.unet, layout=args.layout, full=args.full, dtype=args.dtype)
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


def _kind_eval_prompts(kind: str) -> str:
    return MODEL_KINDS.get(kind).eval_prompts if kind in MODEL_KINDS else "builtin:parti"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvalOptions, Tuned, evaluate

    cfg = load_config(args.config, list(args.set or []))
    prompts = args.prompts or _kind_eval_prompts(cfg.model.kind)
    opts = EvalOptions(prompts=prompts, max_prompts=args.max_prompts, seeds_per_prompt=args.seeds_per_prompt,
                       weights=tuple(args.weights) if args.weights is not None else EvalOptions.weights,
                       switch_steps=tuple(args.switch_steps) if args.switch_steps is not None else None,
                       switch_step=_switch_step_arg(args), num_steps=args.steps, batch_size=args.batch_size,
                       grid_prompts=args.grid_prompts, device=cfg.train.device, compare=tuple(args.compare or ()))
    entries = [path if kind == "text_encoder" else Tuned.from_folder(path) for kind, path in args.entries or []]
    result = evaluate(cfg, entries, args.out, opts, names=args.name)
    print(result.files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


def _number_list(kind, example: str = "0,1", what: str | None = None):
    def parse(text: str) -> list:
        if text.strip().lower() == "none":
            return []
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what or kind.__name__ + 's'} such as "
                                             f"{example} (or 'none'), got {text!r}") from None
    return parse


def _switch_step(text: str) -> int | float:
    """--switch-step: an integer is a step ('10'), a decimal a fraction of the steps ('0.4'); the range is checked
    against the step count (inference.resolve_switch_step)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a step such as 10 or a fraction of the steps such as 0.4, got {text!r}")


_SWITCH_HELP = ("an integer is that step (0..steps-1), a decimal a fraction of the steps, rounded down (0.4 of 25 "
                "steps: step 10, the paper's late switch)")


def _common(sp: argparse.ArgumentParser, config_required: bool = True) -> None:
    sp.add_argument("--config", required=config_required,
                    help="TOML config file (e.g. configs/tiny.toml) or a built-in one (builtin:<name>)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=3 (repeatable)")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune the text encoder (or the UNet: --set train.stage=unet)")
    _common(t)
    t.add_argument("--resume", metavar="PATH|latest", help="resume from a checkpoint folder or the latest one")
    t.set_defaults(func=_cmd_train)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate images with tuned encoder(s): switch step, interpolation, mixing")
    _common(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="prompts file (.txt/.jsonl/.csv/.parquet)")
    g.add_argument("--text-encoder", action="append", help="tuned encoder folder/checkpoint/.safetensors, or an "
                   "encoder LoRA (folder or run) with an optional scale, LoRAs stacked with +: 'a:0.8+b:0.5' "
                   "(repeatable)")
    g.add_argument("--unet", help="tuned UNet (UNet stage): a LoRA folder, a UNet folder, or a run holding unet_lora/ "
                                  "or unet/; used at every step")
    g.add_argument("--weights", type=float, nargs="+", help="one mixing weight per --text-encoder")
    g.add_argument("--weight", type=float, default=1.0, help="interpolation w for a single encoder (default 1)")
    g.add_argument("--switch-step", type=_switch_step, metavar="S",
                   help="the tuned encoder(s) from this step on, the original before it; default 0: the tuned "
                        f"encoder at every step, a drop-in replacement as in an exported pipeline; {_SWITCH_HELP}")
    g.add_argument("--steps", type=int, help="DDIM steps (default: sampler.num_steps)")
    g.add_argument("--seed", type=int, default=0, help="image i starts from seed + i's noise (default 0)")
    g.add_argument("--out", default="outputs/generate",
                   help="output folder for PNGs (each records its prompt, seed and settings as PNG text)")
    g.add_argument("--grid", action="store_true", help="also write grid.png: every image labelled with its prompt")
    g.set_defaults(func=_cmd_generate)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="export a tuned text encoder and/or UNet: a component folder, a UNet LoRA, a "
                                      "whole diffusers pipeline, or the original single-file layout")
    _common(e)
    e.add_argument("--text-encoder", help="tuned encoder folder/run/checkpoint/.safetensors, or an encoder LoRA "
                   "(merged into the weights for every layout but lora; 'PATH:SCALE' / 'a+b' as in generate)")
    e.add_argument("--unet", help="tuned UNet (UNet stage): a LoRA folder, a UNet folder, or a run/checkpoint folder "
                                  "holding unet_lora/ or unet/")
    e.add_argument("--layout", choices=["diffusers", "pipeline", "single_file", "lora"], default="diffusers",
                   help="diffusers: the tuned component's folder (a text_encoder/ folder for CLIPTextModel."
                        "from_pretrained, or a merged unet/ folder); lora: the encoder's and/or the UNet's LoRA in one "
                        "file for pipe.load_lora_weights; "
                        "pipeline: the base model's folder with the tuned parts (StableDiffusionPipeline."
                        "from_pretrained); single_file: the tuned parts' original-layout keys in one .safetensors "
                        "(default diffusers)")
    e.add_argument("--full", action="store_true",
                   help="with --layout single_file: the whole original-layout checkpoint (base parts + tuned "
                        "ones), for StableDiffusionPipeline.from_single_file and other SD1.5 tools")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="dtype of the written weights (default fp32)")
    e.add_argument("--out", required=True,
                   help="output folder (diffusers, lora, pipeline) or .safetensors file (single_file)")
    e.set_defaults(func=_cmd_export)


def _add_evaluate(sub) -> None:
    v = sub.add_parser("evaluate", help="paired evaluation of tuned encoder(s) and/or UNet(s) against the original: "
                                        "table with 95%% intervals, picture grid, interpolation and switch-step curves")
    _common(v)
    v.add_argument("--text-encoder", action=_Entry, const="text_encoder", dest="entries", metavar="PATH",
                   help="tuned encoder: text_encoder folder, run folder, or .safetensors, or an encoder LoRA with "
                        "an optional scale, stacked with +: 'a:0.8+b:0.5' (repeatable; none: the original alone)")
    v.add_argument("--model", action=_Entry, const="model", dest="entries", metavar="PATH",
                   help="a tuned model: a run folder holding text_encoder/ and/or unet_lora/ (or unet/), e.g. a "
                        "UNet-stage run, or a UNet LoRA/UNet folder alone (repeatable)")
    v.add_argument("--name", action="append", help="a column name per --text-encoder / --model, in their order "
                                                   "(default: the run folder's name)")
    v.add_argument("--compare", action="append", type=_compare_pair, metavar="A:B",
                   help="also the paired difference A - B between two evaluated models, e.g. both:encoder "
                        "(repeatable)")
    v.add_argument("--prompts", help=f"a prompt file or a registered set ({', '.join(PROMPT_SETS.names())}; default: "
                                     "the model kind's evaluation set, builtin:parti for SD models)")
    v.add_argument("--max-prompts", type=int, metavar="N", help="the first N distinct prompts")
    v.add_argument("--seeds-per-prompt", type=int, default=1, metavar="N", help="paired noise seeds per prompt")
    v.add_argument("--weights", type=_number_list(float), metavar="W,W,...",
                   help="interpolation weights of the w-curve (default 0,0.25,0.5,0.75,1; 'none' skips it)")
    v.add_argument("--switch-steps", type=_number_list(_switch_step, "0,5 or 0,0.5", "steps or fractions"),
                   metavar="S,S,...",
                   help="switch steps of the switch-step curve, steps or fractions as --switch-step (default "
                        "0,n/4,n/2,3n/4; 'none' skips it)")
    v.add_argument("--switch-step", type=_switch_step, metavar="S",
                   help="where tuned encoders take over in the table; default 0: at every step, as generate and an "
                        f"exported pipeline; {_SWITCH_HELP}")
    v.add_argument("--steps", type=int, help="DDIM steps (default: sampler.num_steps)")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--grid-prompts", type=int, default=8, metavar="N", help="rows of the picture grid")
    v.add_argument("--out", default="outputs/evaluate", help="output folder (its cache/ makes reruns resume)")
    v.set_defaults(func=_cmd_evaluate)


def _add_plugin_command(sub, name: str) -> None:
    """A command a plugin registered (registry.COMMANDS: the tiny world's demo)."""
    command = COMMANDS.get(name)
    sp = sub.add_parser(name, help=command.help)
    _common(sp, config_required=command.default_config is None)
    if command.default_config is not None:
        sp.set_defaults(config=command.default_config)
    import_target(command.add_arguments, f"command '{name}'")(sp)
    sp.set_defaults(func=lambda args: import_target(command.run, f"command '{name}'")(args))


BUILTIN_COMMANDS = {"train": _add_train, "evaluate": _add_evaluate, "generate": _add_generate, "export": _add_export}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="textcraftor-fast", description=(
        "TextCraftor: fine-tune Stable Diffusion's text encoder with differentiable rewards."))
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment is
    # what we read, so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log on every rank")
    plugins = [name for name in COMMANDS.names() if name not in BUILTIN_COMMANDS]
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*BUILTIN_COMMANDS, *plugins]) + "}")
    for add in BUILTIN_COMMANDS.values():
        add(sub)
    for name in plugins:
        _add_plugin_command(sub, name)
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
