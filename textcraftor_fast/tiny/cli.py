"""`textcraftor-fast demo`: the tiny-world demo, or with --seeds/--threads its robustness sweep (registered as a
command by plugin.py; the CLI adds --config, default builtin:tiny, and --set)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, load_config

DEMO_OUT = "outputs/demo"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_arguments(d: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .sweep import run_sweep

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
