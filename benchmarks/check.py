"""Baseline checks of the task budgets: is the baseline's test loss still falling at the end of its budget?

    python -m benchmarks.check [--split dev|heldout] [--tasks ...] [--seeds 0 1 2] [--extend 1.5]

Prints, per task and seed, the baseline's test loss at the start, at 3/4 of the budget, at the end and its best,
where it first reaches its own target (the mean of its last three evaluations; a baseline that reaches it long
before the end is on a plateau, and steps saved there measure evaluation noise), and the run's training seconds (the
cost estimate of :mod:`benchmarks.run` comes from these). Checking a baseline measures the task, not a method: it is
allowed on the held-out split (benchmarks/heldout.py).

With ``--extend > 1`` the baselines of constant-learning-rate tasks train ``extend`` times their budget: the
test loss must still be falling there too, because a method that saves a fraction ``s`` of the steps has, at
the end of the budget, trained about as far as the baseline does in ``budget / (1 - s)`` steps (``extend=2``
covers savings up to 50 %). Otherwise the final-quality check measures over-training, not the method.
(Moved here from ``benchmarks/tasks.py``, which imported the runner that imports it.)
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.run import _quiet, first_crossing, run_one
from benchmarks.suite import TASKS, tasks_in


def check(names, seeds, extend: float = 1.0, log=print) -> list[dict]:
    """Train each task's baseline and print the test loss over the last quarter; return one summary per run."""
    _quiet()
    torch.set_num_threads(1)
    out = []
    for name in names:
        task = TASKS[name]
        if extend > 1:
            if not task.constant_lr:
                log(f"{name}: skipped, its learning-rate schedule ends with the budget")
                continue
            task = dataclasses.replace(
                task, full=dataclasses.replace(task.full, max_steps=round(extend * task.full.max_steps))
            )
        for seed in seeds:
            run, _ = run_one(name, "baseline", seed, quick=False, task=task)
            c = run["curve"]
            n = len(c["loss"])
            q = (3 * n) // 4 - 1
            best = min(range(n), key=lambda i: c["loss"][i])
            budget = TASKS[name].full.max_steps
            at_budget = max(i for i in range(n) if c["step"][i] <= budget)
            # where the baseline first reaches its own target (the benchmark's: its last three evaluations'
            # mean): early means a plateau, where steps saved would measure evaluation noise, not a method
            crossed, _ = first_crossing(c, sum(c["loss"][-3:]) / 3)
            log(
                f"{name} seed {seed}: {run['train_seconds']:.1f}s, test loss {c['loss'][0]:.4f} -> step "
                f"{c['step'][q]} {c['loss'][q]:.4f} -> step {c['step'][-1]} {c['loss'][-1]:.4f} (best "
                f"{c['loss'][best]:.4f} at step {c['step'][best]}); "
                f"last-quarter change {c['loss'][-1] - c['loss'][q]:+.4f}"
                f"; final acc {run['final_acc']}; reaches its target at step {crossed} "
                f"({crossed / c['step'][-1]:.2f} of the run)"
                + (
                    f"; at the budget ({c['step'][at_budget]}) {c['loss'][at_budget]:.4f}, best step / budget "
                    f"{c['step'][best] / budget:.2f}"
                    if extend > 1
                    else ""
                )
            )
            out.append(
                {
                    "task": name,
                    "seed": seed,
                    "train_seconds": run["train_seconds"],
                    "last_quarter_change": c["loss"][-1] - c["loss"][q],
                    "best_step": c["step"][best],
                    "target_step": crossed,
                }
            )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="accepted for `python -m benchmarks.tasks --check`")
    parser.add_argument("--split", nargs="+", default=["dev"])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--extend", type=float, default=1.0, help="train constant-lr baselines this many budgets")
    args = parser.parse_args(argv)
    check(args.tasks or tasks_in(*args.split), args.seeds, args.extend, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
