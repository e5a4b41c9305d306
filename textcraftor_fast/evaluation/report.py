"""Writing an evaluation: table.md (for people), table.csv / table.json (for tools), grid.png and the curves."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from .result import EvalResult
from .stats import is_monotone


def _interval(row: dict) -> str:
    return f"{row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}]"


def monotone_in_weight(points: list[dict], metric: str) -> bool | None:
    """Whether the metric's mean moves one way over the weights in [0, 1] (None: fewer than three of them)."""
    inside = [p for p in points if 0 <= p["weight"] <= 1]
    return is_monotone([p[metric]["mean"] for p in inside]) if len(inside) >= 3 else None


def _overview(result: EvalResult) -> list[str]:
    """One table of every evaluated model: mean per metric, and its paired difference to the original."""
    names = list(result.table)
    metrics = list(result.table[names[0]])
    lines = ["| metric | original | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for m in metrics:
        cells = [f"{result.table[n][m]['after']:.4f} ({_interval(result.table[n][m])})" for n in names]
        lines.append(f"| {m} | {result.table[names[0]][m]['before']:.4f} | " + " | ".join(cells) + " |")
    return lines + ["", "Each cell: mean (paired difference to the original [95% interval]).", ""]


def _pair_section(label: str, table: dict) -> list[str]:
    a, b = label.split(" vs ", 1)
    lines = [f"### {label}", "", f"| metric | {b} | {a} | paired diff {a} - {b} [95% CI] |", "|---|---|---|---|"]
    for metric, r in table.items():
        lines.append(f"| {metric} | {r['before']:.4f} ± {r['before_hw']:.4f} | {r['after']:.4f} ± {r['after_hw']:.4f} "
                     f"| {_interval(r)} |")
    return lines + [""]


def format_markdown(result: EvalResult, info: dict) -> str:
    lines = [f"Paired evaluation on `{info['prompts']}`: {info['n_prompts']} prompts x {info['seeds_per_prompt']} "
             f"seed(s) = {info['n_samples']} samples, DDIM {info['num_steps']} steps, CFG {info['guidance_scale']:g}, "
             f"tuned encoders from step {info['switch_step']}. Intervals: 95%, on paired per-sample differences.", ""]
    if len(result.table) >= 2:
        lines += _overview(result)
    for label, table in result.pairs.items():
        lines += _pair_section(label, table)
    for name, table in result.table.items():
        lines += [f"### {name} (`{info['encoders'][name]}`)", "",
                  f"| metric | original | {name} | paired diff [95% CI] |", "|---|---|---|---|"]
        for metric, r in table.items():
            lines.append(f"| {metric} | {r['before']:.4f} ± {r['before_hw']:.4f} | {r['after']:.4f} ± "
                         f"{r['after_hw']:.4f} | {_interval(r)} |")
        lines.append("")
        for axis, title in (("weight", "interpolation weight w"), ("switch_step", "switch step")):
            points = result.curves[name][axis]
            if not points:
                continue
            metrics = list(table)
            lines += [f"{name}, mean per {title} (paired diff vs original in brackets):", "",
                      f"| {axis} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
            for p in points:
                cells = [f"{p[m]['mean']:.4f} ({p[m]['diff']:+.4f})" for m in metrics]
                lines.append(f"| {p[axis]:g} | " + " | ".join(cells) + " |")
            if axis == "weight":
                flags = {m: monotone_in_weight(points, m) for m in metrics}
                known = {m: f for m, f in flags.items() if f is not None}
                if known:
                    lines += ["", "Monotone in w over [0, 1]: " + ", ".join(
                        f"{m} {'yes' if f else 'NO'}" for m, f in known.items())]
            lines.append("")
    return "\n".join(lines)


def write_csv(result: EvalResult, path: Path) -> Path:
    fields = ["encoder", "metric", "n", "original", "original_hw", "tuned", "tuned_hw", "diff", "lo", "hi"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        # A compared pair's row reads as its own name ('a vs b'): 'original' is b and 'tuned' is a there.
        for name, table in {**result.table, **result.pairs}.items():
            for metric, r in table.items():
                w.writerow([name, metric, r["n"], r["before"], r["before_hw"], r["after"], r["after_hw"],
                            r["diff"], r["lo"], r["hi"]])
    return path


def _save_grid(result: EvalResult, prompts: list[str], names: list[str], path: Path) -> Path | None:
    from ..reporting.figures import save_grid

    columns = [result.scores[label]["images"].float() / 255 for label in ["original", *names]
               if "images" in result.scores[label]]
    if not prompts or len(columns) != len(names) + 1:
        return None
    rows = [p if len(p) <= 40 else p[:37] + "..." for p in prompts]
    return save_grid(columns, ["original", *names], rows, path)


def _save_curves(result: EvalResult, axis: str, path: Path) -> Path | None:
    from ..reporting.figures import save_curves

    panels: dict[str, dict] = {}
    for name, curves in result.curves.items():
        for metric in result.table[name]:
            points = curves[axis]
            if not points:
                continue
            panels.setdefault(metric, {})[name] = ([p[axis] for p in points], [p[metric]["mean"] for p in points],
                                                   [p[metric]["half_width"] for p in points])
    if not panels:
        return None
    xlabel = "interpolation weight w (0: original, 1: tuned)" if axis == "weight" else "switch step"
    return save_curves(panels, xlabel, path, title="mean per setting; bars: 95% interval of the paired "
                                                   "difference to the original encoder")


def write_all(result: EvalResult, info: dict, grid_prompts: list[str], names: list[str]) -> dict[str, Path]:
    out = result.out_dir
    files = {"markdown": out / "table.md", "csv": out / "table.csv", "json": out / "table.json"}
    files["markdown"].write_text(format_markdown(result, info) + "\n")
    write_csv(result, files["csv"])
    monotone = {name: {m: monotone_in_weight(c["weight"], m) for m in result.table[name]}
                for name, c in result.curves.items()}
    files["json"].write_text(json.dumps({**info, "table": result.table, "curves": result.curves,
                                         "monotone_in_weight": monotone, "pairs": result.pairs}, indent=2) + "\n")
    for key, maker in (("grid", lambda p: _save_grid(result, grid_prompts, names, p)),
                       ("weight_curve", lambda p: _save_curves(result, "weight", p)),
                       ("switch_curve", lambda p: _save_curves(result, "switch_step", p))):
        path = maker(out / f"{key}.png")
        if path is not None:
            files[key] = path
    return files
