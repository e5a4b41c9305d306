"""Render benchmarks/REPORT.md (tables, and plots under benchmarks/report/) from a pytest-benchmark JSON.

  python benchmarks/report.py [results/latest.json] [--out benchmarks/REPORT.md]

`make bench` runs it after the suites. Every number in the report comes from the JSON it names, measured on the
machine that JSON names; GPU results found under results/ are listed separately, with their device, as not
measured on this run's hardware.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Issue 12's CPU acceptance bars for the SD1.5 step (16x16 latent, batch 1, K = 5, 25 steps).
TARGETS = {"lean": (1.4, 0.45), "fast": (1.6, 0.8)}


def _by_name(data: dict) -> dict[str, dict]:
    return {b["name"]: b for b in data["benchmarks"]}


def _machine(data: dict) -> list[str]:
    m = data["machine_info"]
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    commit = data.get("commit_info", {})
    return [f"- Machine: {m.get('device', 'cpu')} ({cpu}), {m.get('cpu', {}).get('count', '?')} cores, "
            f"torch threads {m.get('torch_threads')}, OMP_NUM_THREADS={m.get('OMP_NUM_THREADS')}",
            f"- Software: Python {m.get('python_version')}, {libs}",
            f"- Run: {data.get('datetime', '?')}, commit {commit.get('id', '?')[:10]}"
            f"{' (dirty)' if commit.get('dirty') else ''}"]


def _sd15_step(bench: dict) -> list[str]:
    arms = {k: v for k, v in bench["extra_info"].items() if isinstance(v, dict) and "median_step_s" in v}
    lines = ["## Training step at SD1.5 scale on CPU: ours vs the official recipe",
             "", "16x16 latent, batch 1, 25 DDIM steps, K = 5, a CLIP ViT-L/14 clip_score tower whose text half is the SD "
             "file's text encoder (as for the published weights); lean also checkpoints the CLIP transformers per "
             "layer; each arm in its own process (peak RSS per process), arms interleaved "
             "(`benchmarks/sd15_step.py`).", "",
             "| arm | median s/step [min, max] | samples/s | peak RSS GiB | x baseline speed | x baseline peak RSS | "
             "target (speed, RSS) | met |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        target = TARGETS.get(arm)
        speed, rss = a.get("speedup_vs_baseline", math.nan), a.get("peak_rss_vs_baseline", math.nan)
        met = "" if target is None else ("yes" if speed >= target[0] and rss <= target[1] else "**no**")
        lines.append(f"| {arm} | {a['median_step_s']:.2f} [{a['min_step_s']:.2f}, {a['max_step_s']:.2f}] | "
                     f"{a['samples_per_s']:.4f} | {a['peak_rss_gib']:.2f} | {speed:.2f} | {rss:.2f} | "
                     f"{'' if target is None else f'>= {target[0]}x, <= {target[1]}x'} | {met} |")
    return lines + [""]


def _memory(bench: dict, figures: Path) -> list[str]:
    info = bench["extra_info"]
    by_k = info["saved_bytes_by_k"]
    ks = list(by_k["step"])  # step runs every K; the other policies may stop earlier
    lines = [f"## Bytes saved for backward vs K ({info['latent']}x{info['latent']} latent, "
             f"{info.get('schedule', '')}, batch 1)", "",
             "| policy | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for policy, row in by_k.items():
        lines.append(f"| {policy} | " + " | ".join(f"{row[k] / 2**20:.1f} MiB" if k in row else "not run"
                                                  for k in ks) + " |")
    key = next(k for k in info if k.startswith("saved_bytes_by_batch"))
    lines += ["", f"By batch ({key.rsplit('_', 1)[1].upper()}): " + "; ".join(
        f"{p}: " + ", ".join(f"batch {b} {v / 2**20:.1f} MiB" for b, v in row.items()) for p, row in info[key].items())]
    step = by_k["step"]
    lines.append(f"\n`step` at K={ks[-1]} / K={ks[0]}: {step[ks[-1]] / step[ks[0]]:.3f}x (issue 12's bar: <= 1.15x).")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for policy, row in by_k.items():
        ax.plot([int(k) for k in row], [v / 2**20 for v in row.values()], marker="o", label=policy)
    ax.set(xlabel="K (denoising steps with a graph)", ylabel="MiB saved for backward", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "memory_vs_k.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![memory vs K](report/memory_vs_k.png)", ""]


def _tiny_step(time_bench: dict | None, memory_bench: dict | None) -> list[str]:
    lines = ["## Training step on tiny models: ours vs the official recipe (one process, interleaved)", ""]
    if time_bench:
        e = time_bench["extra_info"]
        lines.append(f"- Step time median: ours {e['median_s_ours']:.3f} s, official {e['median_s_official']:.3f} s: "
                     f"{e['speedup']:.2f}x faster")
    if memory_bench:
        e = memory_bench["extra_info"]
        held = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in e["official_weight_grad_bytes"].items())
        lines.append(f"- Bytes saved for backward: ours {e['saved_bytes_ours'] / 2**20:.2f} MiB, official "
                     f"{e['saved_bytes_official'] / 2**20:.2f} MiB ({e['saved_ratio']:.2f}x); official `.grad` "
                     f"held: {held}")
    return lines + [""]


def _others(benches: dict[str, dict], shown: set[str]) -> list[str]:
    rest = [b for name, b in benches.items() if name not in shown]
    if not rest:
        return []
    lines = ["## Other suites (median time of the benchmarked call; details in the JSON's extra_info)", "",
             "| benchmark | median | rounds |", "|---|---|---|"]
    for b in rest:
        stats = b.get("stats") or {}
        median = stats.get("median")
        lines.append(f"| {b['name']} | {'' if median is None else f'{median * 1e3:.2f} ms'} | {stats.get('rounds', '')} |")
    return lines + [""]


def _gpu_results() -> list[str]:
    lines = ["## GPU results (not measured on this run's hardware)", ""]
    found = sorted(p for p in (HERE / "results").glob("*/gpu*.json"))
    kernel_runs = sorted(p for p in (HERE / "results").glob("*/kernels-*.json"))
    if not found and not kernel_runs:
        return lines + ["None: no `benchmarks/gpu.sh` results are committed.", ""]
    keys = ("arm", "batch", "s_per_sample", "samples_per_s", "mfu", "peak_gib", "speedup_vs_baseline")
    for p in found:
        data = json.loads(p.read_text())
        lines += [f"`{p.relative_to(HERE)}`: {data.get('device')}, {data.get('date')}, torch {data.get('torch')}", "",
                  "| suite | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for suite, body in data.get("suites", {}).items():
            if "error" in body:
                lines.append(f"| {suite} | failed: see the JSON |" + " |" * (len(keys) - 1))
            for row in body.get("rows", []):
                lines.append(f"| {suite} | " + " | ".join(
                    f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys) + " |")
        lines.append("")
    for p in kernel_runs:
        data = json.loads(p.read_text())
        lines.append(f"- `{p.relative_to(HERE)}`: kernels and Triton-vs-torch step, {data.get('device')}, "
                     f"{data.get('date')} (summarised in docs/kernels.md)")
    return lines + [""]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render(results: Path, out: Path) -> str:
    data = json.loads(results.read_text())
    benches = _by_name(data)
    figures = out.parent / "report"
    figures.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark report", "", f"Rendered by `python benchmarks/report.py {results.relative_to(HERE.parent)}` "
             "from one `make bench` run; every number below the GPU section was measured on this machine:", "",
             *_machine(data), ""]
    shown: set[str] = set()
    sections = (("test_sd15_step_ours_vs_official", _sd15_step), ("test_saved_bytes_vs_k_and_batch",
                                                                   lambda b: _memory(b, figures)))
    for name, section in sections:
        if name in benches:
            lines += section(benches[name])
            shown.add(name)
        else:
            lines += [f"## {name}: not in this run", ""]
    tiny = [benches.get("test_step_time_vs_official"), benches.get("test_step_memory_vs_official")]
    if any(tiny):
        lines += _tiny_step(*tiny)
        shown |= {"test_step_time_vs_official", "test_step_memory_vs_official"}
    lines += _others(benches, shown) + _gpu_results()
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=HERE / "results" / "latest.json")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    args = ap.parse_args()
    if not args.results.exists():
        raise SystemExit(f"{args.results} does not exist: run `make bench` first (it writes it)")
    render(args.results.resolve(), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
