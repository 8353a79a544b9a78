"""Steps saved with the crossing interpolated between evaluations, for rows of the levers log that keep a curve.

The benchmark counts the first evaluation at or below the target, so on a 50-step grid two methods within 50
steps of each other tie. This reads ``levers.jsonl`` rows (E31 on keep the test-loss curve), finds where the
curve crosses the target by linear interpolation between the two evaluations around it, and prints
``1 - crossing / baseline crossing`` per row and the median per (tag, task, variant):

    python -m benchmarks.experiments.crossings --tags E38 --tasks digits-rmsprop
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.experiments.levers import CACHE, LOG


def interpolated_crossing(steps: list[int], losses: list[float], target: float) -> float | None:
    """First step where the piecewise-linear curve reaches ``target`` (``None`` if it never does).

    Example:
        >>> interpolated_crossing([0, 50, 100], [1.0, 0.6, 0.2], 0.5)
        62.5
    """
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(steps[0])
            a, b = losses[i - 1], loss
            return steps[i - 1] + (steps[i] - steps[i - 1]) * (a - target) / (a - b)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", nargs="+", required=True, help="tag prefixes of the rows to read (e.g. E38)")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--log", type=Path, default=LOG)
    parser.add_argument("--cache", type=Path, default=CACHE, help="the baselines' curves (levers' cache)")
    args = parser.parse_args(argv)
    baselines = json.loads(args.cache.read_text())
    saved: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for line in args.log.read_text().splitlines():
        row = json.loads(line)
        if "curve" not in row or not any(row["tag"].startswith(t) for t in args.tags):
            continue
        if args.tasks and row["task"] not in args.tasks:
            continue
        base = baselines[f"{row['task']}/{row['seed']}"]["curve"]
        target = sum(base["loss"][-3:]) / 3
        b_cross = interpolated_crossing(base["step"], base["loss"], target)
        cross = interpolated_crossing(row["curve"]["step"], row["curve"]["loss"], target)
        value = 0.0 if cross is None else 1 - cross / b_cross
        saved[row["tag"].split()[0], row["task"], row["variant"]].append(value)
        print(
            f"{row['tag'][:4]:5s} {row['task']:15s} s{row['seed']} {row['variant']:14s} grid {row['steps']} "
            f"interpolated {'never' if cross is None else f'{cross:.0f}'} saved {value:.3f}"
        )
    for (tag, task, variant), values in sorted(saved.items()):
        each = " / ".join(f"{v:.3f}" for v in values)
        median = statistics.median(values)
        print(f"{tag:5s} {task:15s} {variant:14s} median interpolated steps saved {median:.3f} ({each})")


if __name__ == "__main__":
    main()
