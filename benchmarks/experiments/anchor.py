"""Experiment: GFMCallback(anchor="state") vs anchor="velocity" vs linear extrapolation, steps to target.

Same protocol as ``benchmarks.run`` (target = the baseline's test loss averaged over its last 3 evaluations), with
each task's shared jump schedule; prints one line per (seed, task): steps to target (None = never), final test loss,
and for GFM the jumps accepted / tried.

    python -m benchmarks.experiments.anchor digits-cnn,digits-rmsprop
    python -m benchmarks.experiments.anchor mnist1d-mlp,charlm
"""

from __future__ import annotations

import sys
import warnings

import torch

import benchmarks.methods as methods
from benchmarks.run import first_crossing, run_one


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    tasks = argv[0].split(",")
    variants = argv[1].split(",") if len(argv) > 1 else ["state", "velocity"]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    original = methods.TimedGFM.__init__
    try:
        for seed in (0, 1, 2):
            for task in tasks:
                base, _ = run_one(task, "baseline", seed, False)
                target = sum(base["curve"]["loss"][-3:]) / 3

                def steps(run: dict, target: float = target) -> int | None:
                    return first_crossing(run["curve"], target)[0]

                row = {"task": task, "seed": seed, "baseline": steps(base)}
                for anchor in variants:
                    methods.TimedGFM.__init__ = lambda self, anchor=anchor, **kw: original(self, anchor=anchor, **kw)
                    run, _ = run_one(task, "gfm", seed, False)
                    jumps = run["jumps"]
                    row[anchor] = (
                        steps(run),
                        round(run["final_metric"], 4),
                        sum(j["accepted"] for j in jumps),
                        len(jumps),
                    )
                run, _ = run_one(task, "linear", seed, False)
                row["linear"] = (steps(run), round(run["final_metric"], 4))
                print(row, flush=True)
    finally:
        methods.TimedGFM.__init__ = original


if __name__ == "__main__":
    main()
