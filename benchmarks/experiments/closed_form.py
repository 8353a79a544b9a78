"""Accuracy and cost of the prior's closed-form forecast, at every attempt of a dev task's run.

At each attempt of GFM at its defaults (no budget, so that every scheduled attempt happens), the prior's forecast
is computed three ways from the same window: the closed form the callback uses (:func:`lightning_gfm.forecast.
forecast`), torchdyn's ``rk4`` on the full system on the optimizer's own uniform grid of ``max_step`` (what the
closed form computed up to float32 rounding before E44), and torchdyn on a grid 32 times finer (the reference).
Printed per attempt: the horizons, each forecast's error relative to the reference's move (largest over the
horizons), and the seconds of the closed form and of the uniform torchdyn integration:

    python -m benchmarks.experiments.closed_form --tasks mnist1d-mlp digits-cnn charlm digits-rmsprop --seed 0

Dev tasks only: held-out tasks are measured by the benchmark, never probed (``benchmarks/heldout.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.methods import TimedGFM
from benchmarks.run import _quiet, run_one
from benchmarks.suite import TASKS, TUNABLE
from lightning_gfm.forecast import forecast


def _error(path, ref) -> float:
    """Largest error over the horizons, relative to the reference's move."""
    move = (ref.weights[1:] - ref.weights[:1]).norm(dim=1).clamp_min(1e-30)
    return float(((path.weights[1:] - ref.weights[1:]).norm(dim=1) / move).max())


class _Measured(TimedGFM):
    """GFM at its defaults, without a budget, that also integrates its prior with torchdyn at each attempt."""

    def __init__(self, **kwargs):
        super().__init__(overhead=None, **kwargs)
        self.rows: list[dict] = []

    def forecast_path(self, trainer, pl_module, win, horizons):
        path, info = super().forecast_path(trainer, pl_module, win, horizons)
        field, dyn = self._prior(pl_module.device), self._dyn
        lr_steps = self._lr_steps(trainer, trainer.global_step, horizons[-1])
        tick = time.perf_counter()
        fast = forecast(field, win, dyn, lr_steps, horizons)
        fast_s = time.perf_counter() - tick
        tick = time.perf_counter()
        uniform = forecast(field, win, dyn, lr_steps, horizons, closed_form=False)
        uniform_s = time.perf_counter() - tick
        cls = type(dyn)
        coarse = cls.max_step
        try:
            cls.max_step = property(lambda self: coarse.fget(self) / 32)
            ref = forecast(field, win, dyn, lr_steps, horizons, closed_form=False)
        finally:
            cls.max_step = coarse
        self.rows.append(
            {
                "step": trainer.global_step,
                "horizons": list(horizons),
                "closed_form": _error(fast, ref),
                "uniform": _error(uniform, ref),
                "closed_form_s": fast_s,
                "uniform_s": uniform_s,
            }
        )
        return path, info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["mnist1d-mlp", "digits-cnn", "charlm", "digits-rmsprop"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(1)
    import benchmarks.methods as methods

    for task in args.tasks:
        if TASKS[task].split not in TUNABLE:
            raise SystemExit(f"`--tasks`: {task!r} is a held-out task; probe dev tasks only.")
        made: list[_Measured] = []
        original = methods.TimedGFM

        def make(*a, made=made, **k):
            made.append(_Measured(*a, **k))
            return made[-1]

        methods.TimedGFM = make
        try:
            run_one(task, "gfm", args.seed, False)
        finally:
            methods.TimedGFM = original
        rows = made[0].rows
        for r in rows:
            print(
                f"{task:15s} step {r['step']:5d} horizons {r['horizons']}: error of the move, closed form "
                f"{r['closed_form']:.1e}, uniform rk4 {r['uniform']:.1e}; seconds {r['closed_form_s']:.4f} "
                f"vs {r['uniform_s']:.4f}"
            )
        if rows:
            print(
                f"{task:15s} median: closed form {statistics.median(r['closed_form'] for r in rows):.1e} "
                f"({statistics.median(r['closed_form_s'] for r in rows):.4f} s), uniform rk4 "
                f"{statistics.median(r['uniform'] for r in rows):.1e} "
                f"({statistics.median(r['uniform_s'] for r in rows):.4f} s)"
            )


if __name__ == "__main__":
    main()
