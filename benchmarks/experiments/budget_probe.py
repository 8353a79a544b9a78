"""What the do-no-harm budget decides at each of GFM's attempts on a dev task (E45):

    python -m benchmarks.experiments.budget_probe digits-cnn --seeds 0 1
    python -m benchmarks.experiments.budget_probe digits-cnn --seeds 0 1 2 --repeats 3 --attempts-only

Prints every budget check (the predicted seconds, what GFM has spent, its allowance, the run's seconds per
optimizer step, the answer), every evaluation's batches and seconds, then the attempts' outcomes; with
``--attempts-only`` only the outcomes, patching nothing (so it runs on older checkouts of the callback too, for
the budget's timing coin: the same seed, repeated). Dev tasks only: held-out tasks are measured by the benchmark,
never probed.
"""

from __future__ import annotations

import argparse
import time

import torch

import lightning_gfm.callback as callback
from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS, TUNABLE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--attempts-only", action="store_true")
    args = parser.parse_args(argv)
    if TASKS[args.task].split not in TUNABLE:
        raise SystemExit(f"`task`: {args.task!r} is a held-out task; probe dev tasks only.")
    _quiet()
    torch.set_num_threads(1)
    cls = callback.GFMCallback
    affordable, evaluate_from = cls._affordable, getattr(cls, "_evaluate_from", None)  # None before E45

    def checked(self, trainer, pl_module, predicted, start):
        ok = affordable(self, trainer, pl_module, predicted, start)
        step_s = self._step_seconds(trainer, start)
        allow = self.budget.allowance(step_seconds=step_s, planned_steps=self._total_steps(trainer) or 1)
        print(
            f"  budget step {trainer.global_step}: predicted {predicted * 1e3:.1f} ms, spent {self._spent * 1e3:.1f}"
            f" ms, allowance {allow * 1e3:.1f} ms, {step_s * 1e3:.2f} ms/step -> {'yes' if ok else 'no'}"
        )
        return ok

    def timed(self, trainer, pl_module, resume, n):
        t = time.perf_counter()
        out = evaluate_from(self, trainer, pl_module, resume, n)
        done = 0 if resume is None or resume.sums is None else resume.done
        ms = (time.perf_counter() - t) * 1e3
        print(f"  evaluate step {trainer.global_step}: batches {done}..{out.done}, {ms:.1f} ms")
        return out

    if not args.attempts_only:
        cls._affordable, cls._evaluate_from = checked, timed
    try:
        for repeat in range(args.repeats):
            for seed in args.seeds:
                print(f"{args.task} seed {seed} repeat {repeat}", flush=True)
                run, _ = run_one(args.task, "gfm", seed, False)
                attempts = [(j["step"], round(j["seconds"], 3), j["outcome"], j["horizon"]) for j in run["jumps"]]
                print("  attempts:", attempts, flush=True)
    finally:
        if not args.attempts_only:
            cls._affordable, cls._evaluate_from = affordable, evaluate_from


if __name__ == "__main__":
    main()
