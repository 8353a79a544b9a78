"""Probe: GFM's wall-clock cost on a run it cannot speed up, measured as alternating pairs of full runs.

    python -m benchmarks.experiments.overhead long-charlm-gru --pairs 4

Runs the task's baseline and GFM at its defaults (seed 0) ``pairs`` times each, alternating which goes first so
that machine drift hits both alike, and prints every run's training seconds (the test-set measurement excluded,
as in :mod:`benchmarks.run`) with GFM's own attempt seconds, then the median ratio. A single pair is too noisy
(single runs vary by several per cent here); the do-no-harm bound is about 3 %.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {"baseline": [], "gfm": []}
    for i in range(args.pairs):
        for method in ("baseline", "gfm") if i % 2 == 0 else ("gfm", "baseline"):
            run, _ = run_one(args.task, method, args.seed, False)
            seconds[method].append(run["train_seconds"])
            spent = ""
            if method == "gfm":
                spent = f" (attempts {sum(j['seconds'] for j in run['jumps']):.2f} s, {len(run['jumps'])} of them)"
            print(f"{method:8s} train {run['train_seconds']:.2f} s{spent}", flush=True)
    base, gfm = statistics.median(seconds["baseline"]), statistics.median(seconds["gfm"])
    print(f"median baseline {base:.2f} s, gfm {gfm:.2f} s, ratio {gfm / base:.3f}")


if __name__ == "__main__":
    main()
