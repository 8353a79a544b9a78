"""Turn the benchmark JSON into ``docs/benchmark.md`` and plots in ``docs/img/``.

python -m benchmarks.report [--results benchmarks/results/acceleration.json] [--doc docs/benchmark.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.methods import JUMP_METHODS, METHODS

DEFAULT_RESULTS = "benchmarks/results/acceleration.json"
DEFAULT_DOC = "docs/benchmark.md"


def _saved(method_value, base_value) -> float | None:
    """1 - method / baseline; a method that misses the target saves 0; None when the baseline never got there."""
    if base_value is None or base_value <= 0:
        return None
    if method_value is None:
        return 0.0
    return 1.0 - method_value / base_value


def _med_range(values, fmt="{:.1%}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))} – {fmt.format(max(values))})"


def summarize(runs: list[dict]) -> dict:
    """Per task and method: steps/wall-clock saved, final metric, jumps, overheads (lists over seeds)."""
    base = {(r["task"], r["seed"]): r for r in runs if r["method"] == "baseline"}
    out: dict[str, dict[str, dict]] = {}
    for r in runs:
        b = base.get((r["task"], r["seed"]))
        if b is None:
            continue
        s = out.setdefault(r["task"], {}).setdefault(
            r["method"],
            {
                "steps_saved": [],
                "wall_saved": [],
                "final": [],
                "final_acc": [],
                "accepted": 0,
                "attempted": 0,
                "jump_seconds": [],
                "record_share": [],
                "params_per_second": [],
                "buffer_multiple": [],
                "reached": 0,
                "seeds": 0,
            },
        )
        s["seeds"] += 1
        s["reached"] += r["steps_to_target"] is not None
        s["steps_saved"].append(_saved(r["steps_to_target"], b["steps_to_target"]))
        s["wall_saved"].append(_saved(r["seconds_to_target"], b["seconds_to_target"]))
        s["final"].append(r["final_metric"])
        if r.get("final_acc") is not None:
            s["final_acc"].append(r["final_acc"])
        s["accepted"] += sum(j["accepted"] for j in r["jumps"])
        s["attempted"] += len(r["jumps"])
        s["jump_seconds"] += [j["seconds"] for j in r["jumps"]]
        if "record_seconds" in r and r["train_seconds"] > 0:
            s["record_share"].append(r["record_seconds"] / r["train_seconds"])
        if "buffer_bytes" in r:
            s["buffer_multiple"].append(r["buffer_bytes"] / r["model_bytes"])
        s["params_per_second"] += [f["scalars"] / f["seconds"] for f in r.get("forecasts", []) if f["seconds"] > 0]
    return out


def _oracle_fraction(stats: dict) -> str:
    if "gfm" not in stats or "oracle" not in stats:
        return "n/a"
    g = [v for v in stats["gfm"]["steps_saved"] if v is not None]
    o = [v for v in stats["oracle"]["steps_saved"] if v is not None]
    if not g or not o or statistics.median(o) <= 0:
        return "n/a (oracle saves nothing)"
    return f"{statistics.median(g) / statistics.median(o):.2f}"


def headline(stats: dict) -> list[str]:
    """Medians over every (task, seed) per method, and issue 7's checks for ``gfm``, as markdown lines."""
    methods = [m for m in METHODS if m != "baseline" and any(m in by for by in stats.values())]
    lines = [
        "## Headline: all tasks and seeds together",
        "",
        "| method | median steps saved (min – max) | median wall-clock saved (min – max) | runs |",
        "|---|---|---|---|",
    ]
    for m in methods:
        steps = [v for by in stats.values() if m in by for v in by[m]["steps_saved"]]
        wall = [v for by in stats.values() if m in by for v in by[m]["wall_saved"]]
        lines.append(f"| {m} | {_med_range(steps)} | {_med_range(wall)} | {len(steps)} |")
    if "gfm" in methods:
        checks = []
        for task, by in stats.items():
            g, b = by["gfm"], by.get("baseline")
            lin = by.get("linear")
            med = statistics.median([v for v in g["steps_saved"] if v is not None] or [0.0])
            if lin is not None:
                lmed = statistics.median([v for v in lin["steps_saved"] if v is not None] or [0.0])
                checks.append(f"{task}: gfm {med:.1%} vs linear {lmed:.1%} -> {'ok' if med >= lmed else 'BEHIND'}")
            if b is not None:
                worse_median = statistics.median(g["final"]) > statistics.median(b["final"])
                worse_all = max(g["final"]) > max(b["final"])
                checks.append(
                    f"{task}: final test loss gfm median {statistics.median(g['final']):.4f} vs baseline "
                    f"{statistics.median(b['final']):.4f} ({'worse' if worse_median else 'not worse'}); "
                    f"worst seed {max(g['final']):.4f} vs {max(b['final']):.4f} "
                    f"({'worse' if worse_all else 'not worse'})"
                )
        lines += ["", "Checks (issue 7):", ""] + [f"- {c}" for c in checks]
    return lines + [""]


def plot(result: dict, img_dir: Path) -> list[Path]:
    """One PNG per task: test loss vs step and vs seconds for the first seed, accepted jumps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    seed = runs[0]["seed"]
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in dict.fromkeys(r["task"] for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in (r for r in runs if r["task"] == task and r["seed"] == seed):
            c = r["curve"]
            for ax, x in zip(axes, ("step", "seconds"), strict=False):
                (line,) = ax.plot(c[x], c["loss"], label=r["method"], lw=1.2)
                acc = [j["step"] for j in r["jumps"] if j["accepted"]]
                if acc:
                    xs = [c[x][min(range(len(c["step"])), key=lambda i, s=s: abs(c["step"][i] - s))] for s in acc]
                    ys = [c["loss"][min(range(len(c["step"])), key=lambda i, s=s: abs(c["step"][i] - s))] for s in acc]
                    ax.scatter(xs, ys, marker="^", s=28, color=line.get_color(), zorder=3)
        target = next(r["target"] for r in runs if r["task"] == task and r["seed"] == seed)
        for ax, label in zip(axes, ("optimizer step", "seconds (measurement excluded)"), strict=False):
            ax.axhline(target, color="grey", ls="--", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("test loss")
            lo = min(min(r["curve"]["loss"]) for r in runs if r["task"] == task)
            ax.set_ylim(lo * 0.97, target + 3 * (target - lo) + 0.05 * abs(target))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task} (seed {seed}; ▲ accepted jump; dashed: target)")
        fig.tight_layout()
        path = img_dir / f"benchmark_{task}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def render(result: dict, images: list[Path], doc: Path, report_command: str) -> str:
    stats = summarize(result["runs"])
    seeds = sorted({r["seed"] for r in result["runs"]})
    lines = [
        "# Acceleration benchmark",
        "",
        "Protocol: `shared/design/BENCHMARK.md`. Every method trains the same task with the same seed and data",
        "order for the whole budget; the test split (never seen in training) is scored every `val_every` steps,",
        "and that measuring time is excluded from the clock. Target: the baseline's test loss averaged over its",
        "last 3 evaluations. *Saved* = 1 − method / baseline, in steps and in seconds to first reach the target",
        "(a method that never reaches it saves 0 %; a negative value means slower). Median (min – max) over",
        f"seeds {seeds}. Methods: `benchmarks/methods.py` (the oracle jumps to the baseline's recorded weights",
        "h steps ahead of where the run stands on the baseline's trajectory; EMA is scored on its averaged",
        "weights). Tasks and why their budgets: `benchmarks/tasks.py`. Wall-clock figures of runs lasting a few",
        "seconds are noisy (±50 % between identical runs on a shared machine); read them with the spread.",
        "",
        f"Results: `{result['command']}`  ",
        f"Report: `{report_command}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, torch "
        f"{result['machine']['torch']}, lightning {result['machine']['lightning']}"
        + (" — **quick mode: tiny budgets, smoke test only, not a measurement**" if result.get("quick") else ""),
        f"Runtime of that command: {sum(r.get('wall_seconds', 0.0) for r in result['runs']) / 60:.1f} min "
        f"({len(result['runs'])} runs, one after the other).",
        "",
    ]
    lines += headline(stats)
    for task, by_method in stats.items():
        sched = result.get("schedules", {}).get(task, {})
        lines += [
            f"## {task}",
            "",
            f"Budget {sched.get('max_steps', '?')} steps; jump methods record every {sched.get('record_every', '?')}"
            f" steps, try a jump every {sched.get('jump_every', '?')} steps, up to {sched.get('horizon', '?')} "
            f"steps ahead ({sched.get('n_candidates', '?')} candidates, the horizon and its halves, for `gfm` along "
            "each of its paths; accepted only if the validation loss falls below the current weights').",
            "",
            "| method | reached target | steps saved | wall-clock saved | final test loss | final test acc "
            "| jumps accepted / tried |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in [m for m in METHODS if m in by_method]:
            s = by_method[m]
            jumps = f"{s['accepted']} / {s['attempted']}" if m in JUMP_METHODS else "–"
            lines.append(
                f"| {m} | {s['reached']}/{s['seeds']} | {_med_range(s['steps_saved'])} | "
                f"{_med_range(s['wall_saved'])} | {_med_range(s['final'], '{:.4f}')} | "
                f"{_med_range(s['final_acc'], '{:.3f}')} | {jumps} |"
            )
        lines += ["", f"GFM steps saved as a fraction of the oracle's: {_oracle_fraction(by_method)}.", ""]
    lines += [
        "## Overhead",
        "",
        "Snapshot share: `GFMCallback.record_seconds` over the run's training seconds. Seconds per jump attempt:",
        "fit + backtest + forecast + candidate evaluation (`JumpRecord.seconds`). Forecast throughput: tracked",
        "parameters over the seconds of the final integration (`ForecastPath.seconds`). Buffer: `buffer.nbytes`",
        "over the model's parameter bytes.",
        "",
        "| task | method | snapshot share of training time | seconds per jump attempt | forecast params/s "
        "| buffer / model size |",
        "|---|---|---|---|---|---|",
    ]
    for task, by_method in stats.items():
        for m in [m for m in JUMP_METHODS if m in by_method]:
            s = by_method[m]
            pps = _med_range(s["params_per_second"], "{:.3g}") if m == "gfm" else "–"
            lines.append(
                f"| {task} | {m} | {_med_range(s['record_share'])} | {_med_range(s['jump_seconds'], '{:.3f}')} | "
                f"{pps} | {_med_range(s['buffer_multiple'], '{:.1f}x')} |"
            )
    lines += ["", "## Curves", ""]
    for img in images:
        rel = Path("img") / img.name if img.parent.name == "img" else img
        lines += [f"![{img.stem}]({rel.as_posix()})", ""]
    lines += [f"Plots made by `{report_command}` from the results of `{result['command']}`.", ""]
    return "\n".join(lines)


def write_report(results=DEFAULT_RESULTS, doc=DEFAULT_DOC, img_dir=None) -> Path:
    """Write the markdown report and its plots; return the markdown path."""
    results, doc = Path(results), Path(doc)
    img_dir = Path(img_dir) if img_dir is not None else doc.parent / "img"
    result = json.loads(results.read_text())
    command = f"python -m benchmarks.report --results {results} --doc {doc}"
    images = plot(result, img_dir)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(result, images, doc, command))
    return doc


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write docs/benchmark.md from the benchmark results")
    parser.add_argument("--results", default=DEFAULT_RESULTS)
    parser.add_argument("--doc", default=DEFAULT_DOC)
    args = parser.parse_args(argv)
    print(write_report(args.results, args.doc))


if __name__ == "__main__":
    main()
