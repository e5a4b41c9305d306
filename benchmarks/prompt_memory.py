"""Prompt memory per rank on a large .parquet prompt set: a Python list on every rank (load_prompts) against the
memory-mapped Arrow table every rank shares (open_prompts), side by side in one run.

    python benchmarks/prompt_memory.py [--n 2000000] [--out benchmarks/results/<name>]

Generates the file once (OpenPrompts-like prompts of ~60-200 characters, 3% duplicates, 2% blank). Reports
for each: seconds to load, and the memory one rank is charged after touching every prompt: the RSS growth of
the list (private to each rank), the PSS of the table's mapping alone and with a second rank mapping it.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

WORDS = ("portrait landscape city night neon forest river castle dragon astronaut cat dog robot ocean sunset "
         "painting photo render watercolor oil detailed cinematic lighting volumetric fog golden hour "
         "trending artstation highly intricate sharp focus octane unreal engine 8k matte fantasy").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows: list[str] = []
    for i in range(n):
        r = rng.random()
        if r < 0.02:
            rows.append("")
        elif r < 0.05 and rows:
            rows.append(rows[rng.randrange(len(rows))])
        else:
            rows.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 28))))
    pq.write_table(pa.table({"prompt": rows}), path, row_group_size=1 << 17)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hold(path: str, cache: str, ready, done) -> None:
    from textcraftor_fast.data import open_prompts

    table = open_prompts(path, cache_dir=cache)
    sum(len(p) for p in table)
    ready.set()
    done.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/prompt_memory"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from test_prompt_table import _mapped_pss

    from textcraftor_fast.data import load_prompts, open_prompts

    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"prompts-{args.n}.parquet"
    if not src.is_file():
        generate(src, args.n)
    result: dict = {"n_rows": args.n, "file_bytes": src.stat().st_size}

    gc.collect()
    rss0, t0 = _rss(), time.perf_counter()
    as_list = load_prompts(str(src))
    result["list_seconds"] = time.perf_counter() - t0
    result["list_rss_growth_bytes"] = _rss() - rss0
    result["n_prompts"] = len(as_list)
    del as_list
    gc.collect()

    cache = args.work / "cache"
    for f in cache.glob("*"):
        f.unlink()
    t0 = time.perf_counter()
    table = open_prompts(str(src), cache_dir=cache)
    result["table_first_open_seconds"] = time.perf_counter() - t0
    del table
    t0 = time.perf_counter()
    table = open_prompts(str(src), cache_dir=cache)
    result["table_open_seconds"] = time.perf_counter() - t0
    result["table_file_bytes"] = table.path.stat().st_size
    t0 = time.perf_counter()
    sum(len(x) for x in table)
    result["table_touch_all_seconds"] = time.perf_counter() - t0
    result["table_pss_one_rank_bytes"] = _mapped_pss(table.path)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(src), str(cache), ready, done))
    other.start()
    ready.wait(300)
    result["table_pss_per_rank_at_two_ranks_bytes"] = _mapped_pss(table.path)
    done.set()
    other.join()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prompt_memory.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
