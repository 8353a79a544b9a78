"""cProfile of GFM's attempts (``GFMCallback._jump``) on one dev task's run at the benchmark's defaults:

    python -m benchmarks.experiments.profile_attempt mnist1d-mlp --seed 0

Prints each attempt's step, seconds and outcome, then the profile sorted by cumulative time (E44's figures).
Dev tasks only: held-out tasks are measured by the benchmark, never probed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import lightning_gfm.callback as callback
from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS, TUNABLE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args(argv)
    if TASKS[args.task].split not in TUNABLE:
        raise SystemExit(f"`task`: {args.task!r} is a held-out task; profile dev tasks only.")
    _quiet()
    torch.set_num_threads(1)
    prof, original = cProfile.Profile(), callback.GFMCallback._jump

    def profiled(self, *a, **k):
        prof.enable()
        try:
            return original(self, *a, **k)
        finally:
            prof.disable()

    callback.GFMCallback._jump = profiled
    try:
        run, _ = run_one(args.task, "gfm", args.seed, False)
    finally:
        callback.GFMCallback._jump = original
    print([(j["step"], round(j["seconds"], 3), j["outcome"]) for j in run["jumps"]])
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.rows)
    print(out.getvalue())


if __name__ == "__main__":
    main()
